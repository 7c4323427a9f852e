"""Resident set size of this process, from /proc (Linux): each job runs in its
own worker, so a process's peak is one method's."""

from __future__ import annotations


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> dict:
    """Current and peak resident set size of this process."""
    return {"rss": _proc_status_kb("VmRSS") * 1024, "rss_peak": _proc_status_kb("VmHWM") * 1024}


def reset_rss_peak() -> bool:
    """Returns freed heap to the OS and restarts the peak-RSS count, so that a
    peak measured afterwards excludes setup transients (e.g. the float32 base
    that QLoRA quantizes). Linux only; False where it is unavailable."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

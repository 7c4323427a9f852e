"""A run directory's guards: one writer at a time, and nothing written to it
before the run is known to belong there.

    <workdir>/.lock    held (fcntl.flock) by the training process for its
                       whole life; records that process's pid and host
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket

from ftjax.errors import RunDirError
from ftjax.rundir import make_dirs

LOCK_NAME = ".lock"


def prepare(workdir: str) -> None:
    """Creates `workdir` (and its parents), or says in one line why it cannot."""
    make_dirs(workdir, "--workdir")


@contextlib.contextmanager
def locked(workdir: str):
    """Holds an exclusive lock on `workdir` for the duration: a second trainer
    on the same directory is refused with the holder's pid and host. The lock
    dies with its process, so a killed run never leaves a stale lock behind."""
    path = os.path.join(workdir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(
                f"--workdir={workdir}: locked by {_holder(fd)} (another run is training "
                "in it; wait for it to end or use another --workdir)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}"
    except (ValueError, KeyError, OSError):
        return "another process"

"""ftjax: measure what full and parameter-efficient fine-tuning do to a
language model, in JAX. See README.md and ../shared/DESIGN.md."""

import os as _os

# transformers prints "PyTorch was not found..." at import when torch is
# absent: ftjax never needs torch models, so the advice only misleads. This
# silences transformers' advisory warnings, nothing else.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _quiet_libtpu_without_tpu() -> None:
    """With libtpu installed (for the planner's TPU compiles) on a machine
    that has no TPU, JAX's start-up makes libtpu look for TPU metadata and
    print initialization errors before it falls back to the CPU. Where no TPU
    device file exists, say there are no TPU workers to find: the errors go,
    the CPU backend and ahead-of-time TPU compiles are unchanged. A real TPU
    VM (a /dev/accel* or /dev/vfio device) is left alone."""
    import glob
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    _os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    _os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    _os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")


_quiet_libtpu_without_tpu()

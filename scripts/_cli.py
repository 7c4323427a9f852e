"""What every entry point shares: one clear line and a non-zero exit on bad
input, instead of a traceback."""

from __future__ import annotations

import re
import sys

# Errors that mean "the input is wrong", as opposed to a bug in ftjax.
from ftjax.errors import FtjaxError  # noqa: E402

USER_ERRORS = (FtjaxError, ValueError, OSError, KeyError, TypeError, AttributeError)


def one_line(e: BaseException) -> str:
    """The informative line of an error message. Config-file errors arrive as
    whole tracebacks inside absl's message: their last line is the cause."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if len(lines) == 1:
        line = lines[0]
        return line[1:-1] if len(line) > 1 and line[0] == line[-1] and line[0] in "'\"" else line
    last = lines[-1]
    # "ftjax.train.optim.ConfigError: method='x'; ..." -> the message itself.
    return re.sub(r"^[\w.]*(Error|Exception|Mismatch): ", "", last)


def parse_flags(argv):
    """absl's flag parsing, with one `error:` line instead of a usage dump."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except Exception as e:  # any failure here is bad input: flags or config file
        msg = one_line(e)
        if "Unknown command line flag 'config." in msg:
            msg += " (no such field in the config)"
        if isinstance(e, AttributeError):  # ConfigDict: unknown field in an override
            detail = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
            msg = f"--config override names a field the config does not have: {detail}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def quiet_libraries() -> None:
    """orbax and datasets log every checkpoint step and map at INFO; the run's
    own progress lines are what a user wants to read."""
    import logging as py_logging

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    for name in ("orbax", "absl", "datasets", "jax._src.xla_bridge"):
        py_logging.getLogger(name).setLevel(py_logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def enable_compilation_cache() -> None:
    """Runs of a sweep compile the same programs again and again (same shapes
    for every seed, the same generation program for every merged model); a
    persistent cache turns the repeats into disk reads."""
    import os

    import jax

    from ftjax.experiment import cache_dir

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_dir(), "jax-compile")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_main(main_fn, argv) -> None:
    quiet_libraries()
    enable_compilation_cache()
    try:
        main_fn(argv)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)

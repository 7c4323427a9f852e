"""What every entry point shares: one clear line and a non-zero exit on bad
input, instead of a traceback."""

from __future__ import annotations

import sys

# Errors that mean "the input is wrong", as opposed to a bug in ftjax.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError, AttributeError)


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
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

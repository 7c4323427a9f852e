"""What every entry point shares: one clear `error:` line and exit status 2
on bad input (an `FtjaxError`) instead of a traceback, quiet libraries, and
the persistent compilation cache. Scripts and the sweep runner call `run_main`."""

from __future__ import annotations

import re
import sys

from ftjax.errors import FtjaxError

# Errors that mean "the input is wrong": printed as one `error:` line. Any
# other exception is a bug (in ftjax or in an experiment file) and keeps its
# traceback; code that turns user input into an OS call converts its OSError.
USER_ERRORS = (FtjaxError,)


def one_line(e: BaseException) -> str:
    """The informative line of an error message. Config-file errors arrive as
    whole tracebacks inside absl's message: their last line is the cause."""
    # KeyError's str() is the repr of its message, escapes and quotes included.
    text = (
        e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    )
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if len(lines) == 1:
        line = lines[0]
        return line[1:-1] if len(line) > 1 and line[0] == line[-1] and line[0] in "'\"" else line
    last = lines[-1]
    # "ftjax.train.optim.ConfigError: method='x'; ..." -> the message itself.
    return re.sub(r"^[\w.]*(Error|Exception|Mismatch): ", "", last)


def _config_overrides(argv, name: str = "config") -> tuple[str | None, list[str]]:
    """(the value of --config, the dotted paths of the --config.<path>=... overrides)."""
    value, paths = None, []
    for i, arg in enumerate(argv):
        m = re.match(rf"^--?{name}(=(.*))?$", arg)
        if m:
            value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
            continue
        m = re.match(rf"^--?(no)?{name}\.([^=]+)", arg)
        if m:
            paths.append(m.group(2))
    return value, paths


def _type_name(value) -> str:
    return "None" if value is None else type(value).__name__


def check_override_path(cfg, path: str, name: str = "config") -> str | None:
    """The one-line error for an override `--config.<path>` that names no field
    of `cfg` (None when it names one).

    >>> from ftjax.train import default_config
    >>> check_override_path(default_config(), "optimm.lr")
    "--config.optimm.lr: the config has no field 'optimm' (...); did you mean 'optim'?"
    >>> check_override_path(default_config(), "optim.lr") is None
    True
    """
    import difflib

    from ml_collections import ConfigDict, FieldReference

    node, seen = cfg, []
    for part in path.split("."):
        if "[" in part:  # indexing syntax: left to ml_collections
            return None
        if isinstance(node, FieldReference):
            node = node.get()
        where = f"--{name}.{path}"
        if not isinstance(node, (ConfigDict, dict)):
            return (
                f"{where}: {'.'.join(seen)} is a {_type_name(node)}, not a section; "
                f"expected --{name}.{'.'.join(seen)}=<value>"
            )
        if part not in node:
            keys = sorted(node.keys())
            if seen:
                avail = f"fields of {'.'.join(seen)}: {', '.join(keys)}"
            else:
                avail = f"sections: {', '.join(keys)}"
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{where}: the config has no field {part!r} ({avail}){hint}"
        node = node[part]
        seen.append(part)
    return None


def _override_error(argv) -> str | None:
    """Why a --config.<path> override names no field, found by loading the
    config again (absl's own message is a bare KeyError)."""
    from absl import flags

    value, paths = _config_overrides(argv)
    if not value or not paths or "config" not in flags.FLAGS:
        return None
    try:
        cfg = flags.FLAGS["config"].parser.parse(value)
    except Exception:  # the config file itself is broken: absl's message says so
        return None
    if not hasattr(cfg, "keys"):  # --config is not a config-file flag here
        return None
    for path in paths:
        msg = check_override_path(cfg, path)
        if msg:
            return msg
    return None


def _config_file_error() -> str | None:
    """ml_collections defers a config file that cannot be read (missing, a
    directory, an OSError in its get_config) to the first use of the flag's
    value: the one line saying so, found now, or None."""
    from absl import flags

    try:
        from ml_collections.config_flags.config_flags import _ErrorConfig
    except ImportError:  # another ml_collections layout: the error comes at first use
        return None
    for name in list(flags.FLAGS):
        value = flags.FLAGS[name].value
        if isinstance(value, _ErrorConfig):
            error = value.__dict__.get("_error")
            return f"--{name}: {one_line(error) if error is not None else 'cannot be loaded'}"
    return None


def parse_flags(argv):
    """absl's flag parsing, with one `error:` line instead of a usage dump."""
    from absl import flags

    try:
        parsed = flags.FLAGS(argv)
    except Exception as e:  # any failure here is bad input: flags or config file
        msg = None
        if isinstance(e, (KeyError, AttributeError, ValueError, flags.Error)):
            msg = _override_error(argv)
        if msg is None:
            msg = one_line(e)
            if "Unknown command line flag 'config." in msg:
                msg += " (no such field in the config)"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    msg = _config_file_error()
    if msg:
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    return parsed


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
    """Runs `main_fn(argv)`; an `FtjaxError` becomes `error: <its message>` on
    stderr and exit status 2, anything else propagates with its traceback."""
    quiet_libraries()
    enable_compilation_cache()
    try:
        main_fn(argv)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)

"""What every entry point shares: one clear line and a non-zero exit on bad
input, instead of a traceback."""

from __future__ import annotations

import sys

# Errors that mean "the input is wrong", as opposed to a bug in ftjax.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError, AttributeError)


def run_main(main_fn, argv) -> None:
    try:
        main_fn(argv)
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

"""The scripts' shared entry-point helpers live in the library (`ftjax.cli`),
so that the sweep runner can use them without importing from scripts/."""

from ftjax.cli import parse_flags, run_main  # noqa: F401

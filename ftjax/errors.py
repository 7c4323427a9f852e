"""ftjax's exception hierarchy.

Every error that means "the input is wrong" (a config field, a data file, an
adapter file, a checkpoint, a run directory) derives from `FtjaxError`, and its
message is one line naming the file, field or flag and what was expected. The
command-line entry points print exactly those as `error: <message>` with exit
status 2; any other exception is a bug and keeps its traceback.

The area classes also derive from `ValueError`, so callers that caught the
older `ValueError`s keep working.
"""

from __future__ import annotations


class FtjaxError(Exception):
    """Bad user input; the message is meant for the user, on one line."""


class ConfigError(FtjaxError, ValueError):
    """A config field (or flag) with an impossible value; the message names it."""


class DataError(FtjaxError, ValueError):
    """Bad data or a bad data config; the message names the file and line or row."""


class PeftError(FtjaxError, ValueError):
    """Bad PEFT input: a method option, a target, an adapter file."""


class ModelError(FtjaxError, ValueError):
    """A model checkpoint or model config that cannot be loaded as asked."""


class CheckpointError(FtjaxError, ValueError):
    """A training checkpoint that does not fit the run, or that is damaged."""


class RunDirError(FtjaxError, ValueError):
    """A run or sweep directory that cannot be used (a file, locked, foreign)."""

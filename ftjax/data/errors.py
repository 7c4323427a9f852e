"""The one exception type of the data pipeline.

Scripts catch `DataError` and print its message as their one-line failure, so
every message names the file (and line or row where the format has one) and
says what was expected.
"""


class DataError(ValueError):
    """Bad data or a bad data config; the message is meant for the user."""


class DataConfigError(DataError):
    """One or more invalid fields of the data config (one line per field)."""

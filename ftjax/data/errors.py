"""The one exception type of the data pipeline.

Scripts catch `DataError` and print its message as their one-line failure, so
every message names the file (and line or row where the format has one) and
says what was expected.
"""

from ftjax.errors import DataError  # noqa: F401  (re-exported)


class DataConfigError(DataError):
    """One or more invalid fields of the data config, all named on one line."""

"""The one exception type for problems with the user's data or data config."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data problem the user can fix.

    The message is a single line that starts with the config key or path at fault
    and says what would fix it, e.g. ``"data.path: /x/y does not exist; point it at
    a text file or a folder of text files"``. The CLI prints it without a traceback.
    Subclassing ValueError keeps ``except ValueError`` callers working.
    """

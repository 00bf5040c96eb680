"""User-facing errors.

Every error a user can cause (bad name, bad value, missing file) is an
:class:`AutomlPruneError` whose message names the problem and the fix in one line; the
CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations


class AutomlPruneError(Exception):
    """Base class of errors caused by user input, printed by the CLI as one message."""


class UnknownNameError(AutomlPruneError, KeyError):
    """A registry lookup with a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidValueError(AutomlPruneError, ValueError):
    """A value out of range or of the wrong type (ratio, plan, config entry)."""


class DataNotFoundError(AutomlPruneError, FileNotFoundError):
    """A dataset's files could not be found or read."""


class SearchFailedError(AutomlPruneError):
    """Every evaluation of a search failed: nothing worth exporting was found."""


class CheckpointError(AutomlPruneError):
    """A checkpoint that is corrupt or does not match the model it is loaded into."""

"""The one exception type for bad data inputs, so that the CLI can report them plainly."""

from __future__ import annotations

from ..errors import LmdistillError


class DataError(LmdistillError):
    """A data input that cannot be used; the message names the file (and line) and the fix."""

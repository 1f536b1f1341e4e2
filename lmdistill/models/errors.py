"""The error of model and tokenizer arguments that cannot be used."""

from __future__ import annotations

from ..errors import LmdistillError


class ModelError(LmdistillError):
    """A model or tokenizer argument that cannot be resolved; the message names the fix."""

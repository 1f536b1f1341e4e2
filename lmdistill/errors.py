"""The tool's own error class: bad input that the user can fix.

Every error the library raises for something a user typed or handed it (a config value, a
file, a model folder, a run directory, a cache) derives from :class:`LmdistillError`, and its
message names the file or field and the fix. The CLI prints those as one line and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LmdistillError(ValueError):
    """Input the tool cannot use; the message names the file or field and the fix.

    A ``ValueError`` so that callers of the library that catch ``ValueError`` keep working."""


class ConfigError(LmdistillError):
    """A configuration value that is missing, unknown or out of range; the message names the fix."""


class NonFiniteError(LmdistillError):
    """A NaN or an infinity where a number must be finite (a training step, a teacher's
    logits); nothing non-finite was written. The message names the likely cause and the fix."""


class DistributedError(LmdistillError):
    """A torchrun launch that cannot work as asked (environment, devices, ranks that disagree)."""

"""The user cache folder: converted models, tokenizer files, prepared token shards."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache: ``$LMDISTILL_CACHE`` or ``~/.cache/lmdistill``."""
    root = os.environ.get("LMDISTILL_CACHE") or os.path.join(Path.home(), ".cache", "lmdistill")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path

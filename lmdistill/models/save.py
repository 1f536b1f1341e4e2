"""A model written as a normal Hugging Face folder, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..atomic import build_dir_atomic


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: Path,
               state_dict: dict | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write a normal Hugging Face folder (config.json, model.safetensors, tokenizer files) atomically.

    ``state_dict`` replaces the model's own weights (the full weights of a sharded model);
    ``extra`` writes more files into the folder before it appears (a model card)."""

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)

    return build_dir_atomic(Path(out_dir), build)

"""Tiny deterministic models and data for the tests (2-4 layers, width 32)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmdistill.data.corpora import corpus_documents

LOGGED_REL = 2e-6
"""Relative tolerance between losses and gradient norms read back from two runs' metrics.jsonl,
which keeps 7 significant digits: values that agree to ~1e-7 can be written one unit apart in
the 7th digit, at most 1e-6 relative."""


def tiny_gpt2(n_layer: int = 4, dropout: float = 0.0, seed: int = 0, vocab_size: int = 50257) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=2, n_positions=128, vocab_size=vocab_size,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(num_layers: int = 4, seed: int = 0, vocab_size: int = 97) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def save_with_tokenizer(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_text_file(folder: Path, characters: int = 60_000) -> Path:
    """A few chapters of Moby-Dick as a plain .txt source (real English, small enough to be fast)."""
    text = "\n\n".join(doc.text for doc in corpus_documents("moby_dick", "train")[:40])[:characters]
    path = folder / "moby.txt"
    path.write_text(text)
    return path


def tiny_run_overrides(root: Path, tokenizer, teacher_layers: int = 4) -> tuple[Path, Path, list[str]]:
    """``(teacher folder, text file, overrides)`` of a tiny GPT-2 distillation in ``root``: a
    half-depth student, blocks of 32, batch 2, one thread, no checkpoints or validation unless added."""
    text = small_text_file(root)
    teacher = save_with_tokenizer(tiny_gpt2(n_layer=teacher_layers, seed=0), tokenizer, root / "teacher")
    return teacher, text, [f"model.teacher={teacher}", f"model.num_layers={teacher_layers // 2}",
                           f"data.sources=[{text}]", f"data.prepared_dir={root / 'data'}", "data.block_size=32",
                           "train.eval_tokens=128", "train.threads=1", "train.batch_size=2",
                           "train.checkpoint_every=0", "train.eval_every=0"]


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` as a module (the folder is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def softmax64(logits, temperature: float):
    """``softmax(logits / temperature)`` of one row, in float64 numpy, written plainly."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()

"""Teacher correction (Minitron, arXiv 2408.11796): the teacher fine-tuned on the run's data first.

A teacher that never saw the distillation corpus gives soft targets that are off for it, and
a student cut from it starts from weights that are too. With
``model.teacher_correction_tokens=N`` a copy of the teacher is trained for N tokens of the
training split with the causal-LM loss before distilling; the corrected teacher is then the
one the student is cut from and the one that gives the soft targets.

The corrected teacher is a normal Hugging Face folder in the user cache, keyed by the
teacher's weights, the training tokens and every setting of the fine-tuning, so a second
run (or a resumed one) with the same key loads it instead of training again. Its
``config.json`` records the correction (``lmdistill_teacher_correction``: tokens, steps,
learning rate, validation perplexity before and after, folder); a student cut from it
inherits that record, so the run folder's ``student_init/config.json`` shows it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import RunConfig
from ..data.prepare import PreparedData
from ..data.sampler import BlockSampler
from ..errors import NonFiniteError
from ..evaluate.perplexity import PerplexityProtocol, perplexity
from ..loss.terms import causal_lm_loss
from ..models.cache import cache_dir
from ..models.device import resolve_device
from ..models.fingerprint import model_fingerprint
from ..models.load import load_model
from ..models.save import save_model
from ..schedule import lr_factor
from ..teacher_cache.format import data_fingerprint

RECORD_KEY = "lmdistill_teacher_correction"
"""The ``config.json`` key of the corrected teacher (and of students cut from it) recording the correction."""
WARMUP = 0.05
"""Warm-up as a fraction of the correction's steps; then linear decay to 0."""
MAX_GRAD_NORM = 1.0
_VERSION = 1  # bump when the fine-tuning changes, so old cached teachers are not reused


@dataclass(frozen=True)
class CorrectionSettings:
    """Everything that decides the corrected weights besides the teacher and the data."""

    tokens: int
    lr: float
    block_size: int
    batch_size: int
    seed: int

    @classmethod
    def from_config(cls, config: RunConfig) -> CorrectionSettings:
        return cls(config.model.teacher_correction_tokens, config.model.teacher_correction_lr,
                   config.data.block_size, config.train.batch_size, config.train.seed)

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.block_size))


def corrected_teacher(teacher: PreTrainedModel, config: RunConfig, tokenizer: PreTrainedTokenizerBase,
                      data: PreparedData) -> PreTrainedModel:
    """``teacher`` (``model.teacher``, loaded) corrected on ``data``'s training split: reused from
    the cache when this correction was made before, else fine-tuned and saved there first."""
    settings = CorrectionSettings.from_config(config)
    folder = corrected_folder(model_fingerprint(teacher), data_fingerprint(data, "train"), settings)
    if folder.is_dir():  # save_model renames only a complete folder into place
        print(f"[lmdistill] teacher correction: reusing the corrected teacher in {folder}")
    else:
        print(f"[lmdistill] teacher correction: fine-tuning {config.model.teacher} on {settings.steps} x "
              f"{settings.batch_size} x {settings.block_size} training tokens (lr {settings.lr:g}) into {folder}")
        record = correct_teacher(teacher, data, settings, config.train.eval_tokens, resolve_device(config.train.device))
        setattr(teacher.config, RECORD_KEY, {**record, "teacher": str(config.model.teacher), "path": str(folder)})
        save_model(teacher, tokenizer, folder)
    # Loaded back either way, so a first run and a resumed one use the very same teacher.
    corrected = load_model(folder, dtype=next(teacher.parameters()).dtype)
    record = getattr(corrected.config, RECORD_KEY)
    print(f"[lmdistill] teacher correction: validation perplexity {record['val_ppl_before']:.2f} -> "
          f"{record['val_ppl_after']:.2f} on {record['val_tokens']:,} tokens")
    return corrected


def corrected_folder(teacher_fingerprint: str, train_fingerprint: str, settings: CorrectionSettings) -> Path:
    """Where the teacher corrected with ``settings`` on these training tokens is cached."""
    key = json.dumps({"version": _VERSION, "teacher": teacher_fingerprint, "data": train_fingerprint,
                      "warmup": WARMUP, "max_grad_norm": MAX_GRAD_NORM, **asdict(settings)}, sort_keys=True)
    return cache_dir() / "corrected_teachers" / hashlib.sha256(key.encode()).hexdigest()[:16]


def correct_teacher(model: PreTrainedModel, data: PreparedData, settings: CorrectionSettings, eval_tokens: int,
                    device: torch.device) -> dict[str, Any]:
    """Fine-tune ``model`` in place (on ``device``, in its dtype; left on the CPU in eval mode) and
    return the record: steps, tokens, learning rate, validation perplexity before and after."""
    validation = data.tokens("validation")
    model.to(device)
    before, val_tokens = validation_loss(model, validation, settings, eval_tokens, device)
    train_tokens = data.tokens("train")
    torch.manual_seed(settings.seed)  # dropout masks
    sampler = BlockSampler(len(train_tokens), settings.block_size, settings.batch_size, seed=settings.seed)
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    for step in tqdm(range(settings.steps), desc="teacher correction", unit="step", dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor((step + 1) / settings.steps, WARMUP, "linear", 0.0)
        correction_step(model, optimizer, sampler.next_batch(train_tokens), device, step)
    model.eval().requires_grad_(False)
    after, _ = validation_loss(model, validation, settings, eval_tokens, device)
    model.to("cpu")
    return {"tokens": settings.steps * settings.batch_size * settings.block_size, "steps": settings.steps,
            "lr": settings.lr, "val_ppl_before": math.exp(before), "val_ppl_after": math.exp(after),
            "val_tokens": val_tokens}


def correction_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor],
                    device: torch.device, step: int) -> None:
    input_ids, labels = (t.to(device) for t in batch)
    loss = causal_lm_loss(model(input_ids=input_ids).logits, labels)
    if not torch.isfinite(loss):
        raise NonFiniteError(f"teacher correction: the loss is {loss.item()} at step {step + 1}; nothing was saved. "
                             f"Lower model.teacher_correction_lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()


def validation_loss(model: PreTrainedModel, tokens: np.ndarray, settings: CorrectionSettings, eval_tokens: int,
                    device: torch.device) -> tuple[float, int]:
    """Mean loss per token on the first ``eval_tokens`` validation tokens (as the run validates its
    student), and the number of tokens scored."""
    protocol = PerplexityProtocol(window=settings.block_size, max_tokens=min(len(tokens), eval_tokens + 1),
                                  batch_size=settings.batch_size)
    result = perplexity(model, tokens, protocol, device=device)
    return result.nll_sum / result.tokens_scored, result.tokens_scored

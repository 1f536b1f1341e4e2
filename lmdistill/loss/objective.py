"""The student and its loss as one module: the unit that DDP wraps and FSDP2 shards."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from .fused import chunked_logit_losses
from .terms import LossWeights, distillation_loss
from .sparse import sparse_kl_divergence
from ..teacher_cache.reader import TeacherTargets


def forward_model(model: PreTrainedModel, input_ids: torch.Tensor, want_hidden: bool, fused: bool):
    """``(logits, hidden_states)``. Fused: no logits, only the body (the loss applies the lm_head
    chunk by chunk) and at least the last hidden state, after the final norm."""
    if not fused:
        out = model(input_ids=input_ids, output_hidden_states=want_hidden)
        return out.logits, (out.hidden_states if want_hidden else None)
    out = model.base_model(input_ids=input_ids, output_hidden_states=want_hidden)
    return None, (out.hidden_states if want_hidden else (out.last_hidden_state,))


class StudentObjective(nn.Module):
    """The student and its loss as one module: the unit that DDP wraps and FSDP2 shards.

    ``forward(input_ids, labels, teacher_logits=..., teacher_states=..., teacher_head=...)``
    runs the student on a micro-batch and returns ``(total, terms)``, the weighted loss and
    each term summed over tokens (a tuple, so that FSDP2 finds the output tensor and hooks its
    backward); ``cached=TeacherTargets`` scores against stored teacher targets instead;
    ``forward(input_ids, logits_only=True)`` returns the student's logits (validation).

    One forward call per micro-batch that covers the whole student, the loss included, is
    what makes the fused lm_head loss (``chunk_tokens > 0``, which runs only the body and reads
    the lm_head weight itself) correct under data parallelism: DDP's gradient hooks see every
    parameter the loss used and FSDP2's root unit has the embeddings and lm_head unsharded
    while the loss reads them. The teacher is not part of it: its outputs come in as inputs.
    """

    def __init__(self, student: PreTrainedModel, weights: LossWeights, aligned: list[tuple[int, int]] | None = None,
                 divergence: Callable[..., torch.Tensor] | None = None, chunk_tokens: int = 0,
                 matmul_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.student = student
        self.weights = weights
        self.aligned = aligned or []
        self.divergence = divergence
        self.chunk_tokens = chunk_tokens
        self.matmul_dtype = matmul_dtype
        """Dtype of the fused loss's vocab-sized matmuls (bf16 under bf16 autocast, like the lm_head's)."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, teacher_logits=None,
                teacher_states=None, teacher_head=None, cached: TeacherTargets | None = None, logits_only: bool = False):
        if logits_only:
            return self.student(input_ids=input_ids).logits
        if cached is not None:
            return self._cached_loss(input_ids, labels, cached)
        weights = self.weights
        fused = self.chunk_tokens > 0
        want_hidden = weights.needs_hidden or weights.needs_layers
        pairs = self.aligned  # hidden_states[0] is the embeddings: layer i's output is [i + 1]
        student_logits, student_states = forward_model(self.student, input_ids, want_hidden, fused)
        rest = weights
        terms: dict[str, torch.Tensor] = {}
        total = None
        if fused:
            head = self.student.get_output_embeddings()
            t_weight, t_bias = teacher_head if teacher_head is not None else (None, None)
            logit_terms = chunked_logit_losses(
                student_states[-1], head.weight, teacher_states[-1] if weights.kl > 0 else None, t_weight, labels,
                kl_weight=weights.kl, ce_weight=weights.ce, temperature=weights.temperature, reduction="sum",
                student_head_bias=head.bias, teacher_head_bias=t_bias, chunk_tokens=self.chunk_tokens,
                matmul_dtype=self.matmul_dtype)
            total, terms = logit_terms.total, dict(logit_terms.terms)
            if not (weights.needs_hidden or weights.needs_layers):
                return total, terms
            rest = dataclasses.replace(weights, kl=0.0, ce=0.0)
        out = distillation_loss(
            student_logits, teacher_logits, labels, rest,
            student_hidden=student_states[-1] if want_hidden else None,
            teacher_hidden=teacher_states[-1] if want_hidden else None, reduction="sum",
            student_layers=[student_states[i + 1] for i, _ in pairs] if pairs else None,
            teacher_layers=[teacher_states[j + 1] for _, j in pairs] if pairs else None,
            divergence=self.divergence,
        )
        return (out.total if total is None else total + out.total), {**terms, **out.terms}

    def _cached_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, cached: TeacherTargets):
        """The sparse KL against stored teacher targets (logged as ``kl``) plus the terms that
        need no teacher (CE), through the fused lm_head loss when ``chunk_tokens > 0``."""
        weights = self.weights
        if self.chunk_tokens > 0:  # the config refuses hidden-state terms with a cache: KL and CE are all
            _, states = forward_model(self.student, input_ids, False, fused=True)
            head = self.student.get_output_embeddings()
            out = chunked_logit_losses(
                states[-1], head.weight, None, None, labels, kl_weight=weights.kl, ce_weight=weights.ce,
                temperature=weights.temperature, reduction="sum", student_head_bias=head.bias,
                chunk_tokens=self.chunk_tokens, matmul_dtype=self.matmul_dtype, teacher_targets=cached)
            return out.total, dict(out.terms)
        student_logits = self.student(input_ids=input_ids).logits
        kl = sparse_kl_divergence(student_logits, cached.values, cached.indices, cached.lse,
                                  temperature=weights.temperature, reduction="sum",
                                  tail_indices=cached.tail_indices, tail_values=cached.tail_values)
        total, terms = weights.kl * kl, {"kl": kl}
        rest = dataclasses.replace(weights, kl=0.0) if any(t != "kl" for t in weights.active_terms()) else None
        if rest is not None:  # teacher-free terms only: the config refuses hidden-state terms with a cache
            out = distillation_loss(student_logits, None, labels, rest, reduction="sum")
            total, terms = total + out.total, {**terms, **out.terms}
        return total, terms

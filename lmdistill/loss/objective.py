"""The student and its loss as one module (the unit that DDP wraps and FSDP2 shards), and how
it computes the logit terms (:func:`logit_path`)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel

from ..config import LossConfig
from .fused import chunked_logit_losses
from .sparse import SparseTargets, sparse_kl_divergence
from .weighted import distillation_loss


def forward_model(model: PreTrainedModel, input_ids: torch.Tensor, want_hidden: bool, fused: bool,
                  want_layers: bool = True):
    """``(logits, hidden_states)``. Fused: no logits, only the body (the loss applies the lm_head
    chunk by chunk) and at least the last hidden state, after the final norm; every layer's
    output only when ``want_layers`` too (for a teacher, that tuple would keep every layer's
    output alive until the loss is done)."""
    if not fused:
        out = model(input_ids=input_ids, output_hidden_states=want_hidden, use_cache=False)
        return out.logits, (out.hidden_states if want_hidden else None)
    every = want_hidden and want_layers
    out = model.base_model(input_ids=input_ids, output_hidden_states=every, use_cache=False)
    return None, (out.hidden_states if every else (out.last_hidden_state,))


# Config fields of models whose logits are not just lm_head(last hidden state).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class LogitPath(NamedTuple):
    """How a run computes its logit terms (the logit divergence and CE)."""

    chunk_tokens: int
    """Positions per chunk of the fused lm_head loss (:mod:`lmdistill.loss.fused`); 0: full logits."""
    reason: str
    """Why, in one line for the run's log."""


def logit_path(loss: LossConfig, teacher: PreTrainedModel | None, student: PreTrainedModel) -> LogitPath:
    """The fused, chunked lm_head loss (``loss.chunk_tokens`` positions per chunk) where it gives
    this run's logit terms exactly, else the full logits, with the reason: the fused path has
    forward KL only, and needs logits that are a plain linear head of the last hidden state
    (``teacher`` None: stored targets or no teacher term, so only the student's head counts)."""
    if loss.chunk_tokens == 0:
        return LogitPath(0, "full logits (loss.chunk_tokens=0)")
    if loss.kl == 0 and loss.ce == 0:
        return LogitPath(0, "none (loss.kl and loss.ce are 0)")
    reasons = []
    if loss.divergence != "forward_kl" and loss.kl > 0:
        reasons.append(f"loss.divergence={loss.divergence} has no fused path (forward_kl only)")
    for role, model in (("teacher", teacher if loss.kl > 0 else None), ("student", student)):
        if model is None:
            continue
        transforms = [k for k in _LOGIT_TRANSFORMS if getattr(model.config, k, None) not in (None, 1, 1.0)]
        head = model.get_output_embeddings()
        if transforms or not isinstance(head, nn.Linear):
            reasons.append(f"the {role}'s logits are not a plain linear head "
                           f"({', '.join(transforms) or type(head).__name__})")
    if reasons:
        return LogitPath(0, f"full logits, loss.chunk_tokens={loss.chunk_tokens} ignored: {'; '.join(reasons)}")
    return LogitPath(loss.chunk_tokens, f"fused with the lm_head, {loss.chunk_tokens} positions per chunk "
                                        f"(loss.chunk_tokens)")


class StudentObjective(nn.Module):
    """The student and its loss as one module: the unit that DDP wraps and FSDP2 shards.

    ``forward(input_ids, labels, teacher_logits=..., teacher_states=..., teacher_head=...)``
    runs the student on a micro-batch and returns ``(total, terms)``, the weighted loss and
    each term summed over tokens (a tuple, so that FSDP2 finds the output tensor and hooks its
    backward); ``cached=SparseTargets`` scores against stored teacher targets instead;
    ``forward(input_ids, logits_only=True)`` returns the student's logits (validation).

    One forward call per micro-batch that covers the whole student, the loss included, is
    what makes the fused lm_head loss (``chunk_tokens > 0``, which runs only the body and reads
    the lm_head weight itself) correct under data parallelism: DDP's gradient hooks see every
    parameter the loss used and FSDP2's root unit has the embeddings and lm_head unsharded
    while the loss reads them. The teacher is not part of it: its outputs come in as inputs.
    """

    def __init__(self, student: PreTrainedModel, loss: LossConfig, aligned: list[tuple[int, int]] | None = None,
                 chunk_tokens: int = 0, matmul_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        self.aligned = aligned or []
        self.chunk_tokens = chunk_tokens
        self.matmul_dtype = matmul_dtype
        """Dtype of the fused loss's vocab-sized matmuls (bf16 under bf16 autocast, like the lm_head's)."""
        # The terms besides the fused logit terms, and besides the KL against stored targets (None: none).
        self.beside_fused = dataclasses.replace(loss, kl=0.0, ce=0.0) if self.wants_hidden else None
        self.beside_cached = dataclasses.replace(loss, kl=0.0) if loss.active_terms() != ["kl"] else None

    @property
    def wants_hidden(self) -> bool:
        return self.loss.needs_hidden or self.loss.needs_layers

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, teacher_logits=None,
                teacher_states=None, teacher_head=None, cached: SparseTargets | None = None, logits_only: bool = False,
                mask: torch.Tensor | None = None):
        if logits_only:
            return self.student(input_ids=input_ids, use_cache=False).logits
        if cached is not None:
            return self._cached_loss(input_ids, labels, cached)
        if mask is not None:
            return self._masked_divergence(input_ids, labels, teacher_logits, teacher_states, teacher_head, mask)
        loss = self.loss
        fused = self.chunk_tokens > 0
        pairs = self.aligned  # hidden_states[0] is the embeddings: layer i's output is [i + 1]
        student_logits, student_states = forward_model(self.student, input_ids, self.wants_hidden, fused,
                                                       want_layers=loss.needs_layers)
        rest = loss
        terms: dict[str, torch.Tensor] = {}
        total = None
        if fused:
            head = self.student.get_output_embeddings()
            t_weight, t_bias = teacher_head if teacher_head is not None else (None, None)
            logit_terms = chunked_logit_losses(
                student_states[-1], head.weight, teacher_states[-1] if loss.kl > 0 else None, t_weight, labels,
                kl_weight=loss.kl, ce_weight=loss.ce, temperature=loss.temperature, reduction="sum",
                student_head_bias=head.bias, teacher_head_bias=t_bias, chunk_tokens=self.chunk_tokens,
                matmul_dtype=self.matmul_dtype)
            total, terms = logit_terms.total, dict(logit_terms.terms)
            if self.beside_fused is None:
                return total, terms
            rest = self.beside_fused
        out = distillation_loss(
            student_logits, teacher_logits, labels, rest,
            student_hidden=student_states[-1] if self.wants_hidden else None,
            teacher_hidden=teacher_states[-1] if self.wants_hidden else None, reduction="sum",
            student_layers=[student_states[i + 1] for i, _ in pairs] if pairs else None,
            teacher_layers=[teacher_states[j + 1] for _, j in pairs] if pairs else None,
        )
        return (out.total if total is None else total + out.total), {**terms, **out.terms}

    def _masked_divergence(self, input_ids: torch.Tensor, labels: torch.Tensor, teacher_logits, teacher_states,
                           teacher_head, mask: torch.Tensor):
        """The logit divergence alone (``loss.kl`` times it, logged as its term), on the positions
        ``mask`` keeps: an on-policy batch, whose labels are the student's own samples."""
        loss = self.loss
        fused = self.chunk_tokens > 0
        student_logits, student_states = forward_model(self.student, input_ids, False, fused, want_layers=False)
        if fused:
            head = self.student.get_output_embeddings()
            t_weight, t_bias = teacher_head
            out = chunked_logit_losses(
                student_states[-1], head.weight, teacher_states[-1], t_weight, labels, kl_weight=loss.kl,
                ce_weight=0.0, temperature=loss.temperature, mask=mask, reduction="sum",
                student_head_bias=head.bias, teacher_head_bias=t_bias, chunk_tokens=self.chunk_tokens,
                matmul_dtype=self.matmul_dtype)
            return out.total, dict(out.terms)
        divergence_only = dataclasses.replace(loss, ce=0.0, cos=0.0, mse=0.0, align_cos=0.0, align_mse=0.0)
        out = distillation_loss(student_logits, teacher_logits, labels, divergence_only, mask=mask, reduction="sum")
        return out.total, dict(out.terms)

    def _cached_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, cached: SparseTargets):
        """The sparse KL against stored teacher targets (forward KL, logged as ``kl``) plus the terms
        that need no teacher (CE), through the fused lm_head loss when ``chunk_tokens > 0``."""
        loss = self.loss
        if self.chunk_tokens > 0:  # the config refuses hidden-state terms with a cache: KL and CE are all
            _, states = forward_model(self.student, input_ids, False, fused=True)
            head = self.student.get_output_embeddings()
            out = chunked_logit_losses(
                states[-1], head.weight, None, None, labels, kl_weight=loss.kl, ce_weight=loss.ce,
                temperature=loss.temperature, reduction="sum", student_head_bias=head.bias,
                chunk_tokens=self.chunk_tokens, matmul_dtype=self.matmul_dtype, teacher_targets=cached)
            return out.total, dict(out.terms)
        student_logits = self.student(input_ids=input_ids, use_cache=False).logits
        kl = sparse_kl_divergence(student_logits, cached.values, cached.indices, cached.lse,
                                  temperature=loss.temperature, reduction="sum",
                                  tail_indices=cached.tail_indices, tail_values=cached.tail_values)
        total, terms = loss.kl * kl, {"kl": kl}
        if self.beside_cached is not None:  # teacher-free terms only: the config refuses hidden-state terms with a cache
            out = distillation_loss(student_logits, None, labels, self.beside_cached, reduction="sum")
            total, terms = total + out.total, {**terms, **out.terms}
        return total, terms

"""Distillation losses: pure functions on tensors, plus their weighted sum.

Conventions shared by every per-token loss here:

* Shapes. Logits are ``(batch, seq, vocab)``, hidden states ``(batch, seq, dim)``, labels
  and masks ``(batch, seq)``. Labels are already shifted by the caller: ``logits[:, t]``
  predicts ``labels[:, t]``.
* Mask. ``mask`` is bool or 0/1, True where a position counts; ``None`` means all count.
* Reduction. ``"mean"`` averages over counted positions (0.0, with a working backward, when
  none count). ``"sum"`` adds them up: the training loop uses it and divides by the token
  count of the whole accumulation step, so gradient accumulation is normalised per token
  rather than per micro-batch.
* Precision. Logits and hidden states are upcast to float32 (float64 stays float64) before
  softmax or norms, one chunk of about ``_CHUNK_TOKENS`` positions at a time, so a bf16
  ``batch x seq x vocab`` tensor is never duplicated in float32 all at once. Results are
  float32 (or float64) scalars.
* Temperature. The KL term is computed on logits divided by ``T`` and multiplied by ``T**2``
  (Hinton et al., 2015) so its gradient magnitude does not shrink as ``T`` grows and the
  weights of :class:`lmdistill.config.LossConfig` mean the same thing at any temperature.
* Teachers never receive gradients: their tensors are detached here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "kl_divergence",
    "causal_lm_loss",
    "cosine_loss",
    "mse_loss",
    "layer_alignment_loss",
    "LossOutput",
]

# Positions upcast together; 4096 x 50257 fp32 is ~0.8 GB per live intermediate.
_CHUNK_TOKENS = 4096
_REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------- helpers


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # float64 only when asked for (tests, references); everything else computes in float32.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_3d(name: str, x: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (batch, seq, features), got {tuple(x.shape)}")


def _check_same_shape(s_name: str, s: Tensor, t_name: str, t: Tensor, hint: str) -> None:
    _check_3d(s_name, s)
    if s.shape != t.shape:
        raise ValueError(
            f"{s_name} {tuple(s.shape)} and {t_name} {tuple(t.shape)} differ in shape; {hint}"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _as_mask(mask: Tensor | None, batch_seq: torch.Size) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != batch_seq:
        raise ValueError(
            f"mask must have shape (batch, seq) = {tuple(batch_seq)}, got {tuple(mask.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _per_position(fn: Callable[..., Tensor], *xs: Tensor) -> Tensor:
    """Apply ``fn`` to seq-chunks of ``xs`` (each ``(batch, seq, ...)``); returns ``(batch, seq)``.

    Chunks are slices along seq (views, no copy even for non-contiguous shifted logits),
    each holding about ``_CHUNK_TOKENS`` positions over the whole batch; ``fn`` upcasts
    only its chunk.
    """
    batch, seq = xs[0].shape[:2]
    step = max(1, _CHUNK_TOKENS // max(1, batch))
    if seq <= step:
        return fn(*xs)
    return torch.cat([fn(*(x[:, i : i + step] for x in xs)) for i in range(0, seq, step)], dim=1)


def _reduce(per_pos: Tensor, valid: Tensor | None, reduction: str) -> Tensor:
    """Sum or mean of ``per_pos`` ``(batch, seq)`` over positions where ``valid`` is True."""
    if valid is not None:
        # masked_fill (not multiply) so a non-finite value at an ignored position cannot leak.
        per_pos = per_pos.masked_fill(~valid, 0.0)
    total = per_pos.sum()
    if reduction == "sum":
        return total
    if valid is None:
        return total / per_pos.numel() if per_pos.numel() else total
    # clamp: with no counted position this is 0/1 = 0, still attached to the graph.
    return total / valid.sum().clamp(min=1).to(total.dtype)


# --------------------------------------------------------------------------- losses


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                  temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """Forward KL(teacher || student) per position, on logits softened by ``temperature``.

    ``sum_v p_t(v) * (log p_t(v) - log p_s(v)) * T**2`` with ``p = softmax(logits / T)``.

    Args:
        student_logits: ``(batch, seq, vocab)``, any float dtype.
        teacher_logits: ``(batch, seq, vocab)``; detached, receives no gradient.
        mask: ``(batch, seq)`` bool or 0/1, True where a position counts; None = all.
        temperature: ``T > 0``.
        reduction: ``"mean"`` over counted positions or ``"sum"``.

    Returns:
        Scalar tensor, float32 (float64 if either input is float64).
    """
    return logit_divergence(_forward_kl, student_logits, teacher_logits, mask, temperature, reduction)


def _forward_kl(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
    p_t = log_p_t.exp()
    # where: 0 * log 0 is 0, not NaN, for tokens the teacher rules out (-inf logits).
    kl = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0)
    return kl.sum(dim=-1)


def logit_divergence(per_token: Callable[[Tensor, Tensor], Tensor], student_logits: Tensor, teacher_logits: Tensor,
                     mask: Tensor | None, temperature: float, reduction: str) -> Tensor:
    """Checks, chunked upcast and reduction shared by every logit divergence (times ``T**2``).

    ``per_token(log_p_s, log_p_t)`` gets one seq-chunk of log-probabilities on softened
    logits, ``(batch, chunk, vocab)`` in the compute dtype, and returns ``(batch, chunk)``.
    """
    _check_same_shape(
        "student_logits", student_logits, "teacher_logits", teacher_logits,
        "teacher and student must share a vocabulary (same tokenizer, same padded size)",
    )
    _check_reduction(reduction)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    valid = _as_mask(mask, student_logits.shape[:2])
    dtype = _compute_dtype(student_logits, teacher_logits)

    def chunk(s: Tensor, t: Tensor) -> Tensor:
        log_p_s = F.log_softmax(s.to(dtype) / temperature, dim=-1)
        log_p_t = F.log_softmax(t.to(dtype) / temperature, dim=-1)
        return per_token(log_p_s, log_p_t)

    per_pos = _per_position(chunk, student_logits, teacher_logits.detach()) * temperature**2
    return _reduce(per_pos, valid, reduction)


def causal_lm_loss(student_logits: Tensor, labels: Tensor, mask: Tensor | None = None, reduction: str = "mean",
                   ignore_index: int = -100) -> Tensor:
    """Cross-entropy of ``student_logits[:, t]`` against ``labels[:, t]`` (already shifted).

    Args:
        student_logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)`` integer token ids; ``ignore_index`` marks positions to skip.
        mask: ``(batch, seq)``; positions where it is False are skipped too.
        reduction: ``"mean"`` over counted positions or ``"sum"``.
        ignore_index: label value that does not count.

    Returns:
        Scalar tensor, float32 (float64 for float64 logits).
    """
    _check_3d("student_logits", student_logits)
    _check_reduction(reduction)
    if labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"labels must have shape (batch, seq) = {tuple(student_logits.shape[:2])}, "
            f"got {tuple(labels.shape)}; shift logits and labels before calling"
        )
    valid = labels != ignore_index
    m = _as_mask(mask, labels.shape)
    if m is not None:
        valid = valid & m
    # Masked-out labels become ignore_index so whatever id padding holds never reaches CE.
    labels = labels.masked_fill(~valid, ignore_index)
    dtype = _compute_dtype(student_logits)

    def chunk(s: Tensor, y: Tensor) -> Tensor:
        log_p = F.log_softmax(s.to(dtype), dim=-1)
        # Ignored positions gather index 0 (any valid id) and are zeroed by _reduce.
        return -log_p.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)

    per_pos = _per_position(chunk, student_logits, labels)
    return _reduce(per_pos, valid, reduction)


def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
    """``1 - cosine_similarity`` over the hidden dim, per position (0 when aligned, 2 opposite).

    Args:
        student_hidden: ``(batch, seq, dim)``.
        teacher_hidden: ``(batch, seq, dim)``; detached.
        mask: ``(batch, seq)`` bool or 0/1; None = all.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        Scalar tensor, float32 (float64 if either input is float64).
    """
    return _hidden_state_loss(
        lambda s, t: 1.0 - F.cosine_similarity(s, t, dim=-1), student_hidden, teacher_hidden, mask, reduction
    )


def mse_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None,
             reduction: str = "mean") -> Tensor:
    """Squared difference averaged over the hidden dim, per position (so per-token like the rest).

    Args and returns: as :func:`cosine_loss`.
    """
    return _hidden_state_loss(
        lambda s, t: (s - t).square().mean(dim=-1), student_hidden, teacher_hidden, mask, reduction
    )


def _hidden_state_loss(per_position, student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None,
                       reduction: str) -> Tensor:
    """Shared checks and reduction of the hidden-state losses; ``per_position(s, t)`` gets
    chunks upcast to the compute dtype, teacher detached, and returns ``(batch, chunk)``."""
    _check_same_shape(
        "student_hidden", student_hidden, "teacher_hidden", teacher_hidden,
        "hidden-state losses need the same width (keep the teacher's width or add a projection)",
    )
    _check_reduction(reduction)
    valid = _as_mask(mask, student_hidden.shape[:2])
    dtype = _compute_dtype(student_hidden, teacher_hidden)

    def chunk(s: Tensor, t: Tensor) -> Tensor:
        return per_position(s.to(dtype), t.to(dtype))

    return _reduce(_per_position(chunk, student_hidden, teacher_hidden.detach()), valid, reduction)


def layer_alignment_loss(
    student_layers: list[Tensor],
    teacher_layers: list[Tensor],
    kind: str = "cos",
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Hidden-state loss between paired layers, averaged over the pairs.

    ``student_layers[i]`` is aligned with ``teacher_layers[i]`` (for a cut student, the pairs
    of :func:`lmdistill.train.plan.aligned_layers`). Averaging over pairs
    keeps the term's scale, and so its weight, independent of how many layers are aligned.

    Args:
        student_layers, teacher_layers: equally long lists of ``(batch, seq, dim)`` tensors.
        kind: ``"cos"`` (:func:`cosine_loss`) or ``"mse"`` (:func:`mse_loss`).
        mask, reduction: as for every per-token loss here.
    """
    if kind not in ("cos", "mse"):
        raise ValueError(f"alignment kind must be 'cos' or 'mse', got {kind!r}")
    if not student_layers or len(student_layers) != len(teacher_layers):
        raise ValueError(
            f"need matching non-empty lists of student and teacher layers, got {len(student_layers)} and "
            f"{len(teacher_layers)}"
        )
    loss = cosine_loss if kind == "cos" else mse_loss
    terms = [loss(s, t, mask, reduction) for s, t in zip(student_layers, teacher_layers)]
    return torch.stack(terms).sum() / len(terms)


# --------------------------------------------------------------------------- weighted sum


@dataclass
class LossOutput:
    """Result of :func:`distillation_loss`."""

    total: Tensor
    """Weighted sum of the active terms: scalar, differentiable."""
    terms: dict[str, Tensor]
    """Each active term unweighted, name -> scalar (still attached; ``.detach()`` to log)."""

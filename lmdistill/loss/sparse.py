"""Forward KL against stored sparse teacher targets: the top-k logits plus the tail.

A teacher cache (:mod:`lmdistill.teacher_cache`) keeps, per position, the teacher's ``k``
largest logits ``v_i`` (any per-position shift: softmax ignores it), their token ids, and
``lse_T = logsumexp(logits / T)`` over the full vocabulary with the same shift. That fixes
the teacher's probabilities of the kept tokens exactly,

    p_i = exp(v_i / T - lse_T),

and the mass of all the others as one bucket, ``p_tail = 1 - sum_i p_i``. The student is
compared on the same partition of the vocabulary: ``q_i`` on the kept ids (log-softmax of
its logits at ``T``, gathered) and ``q_tail`` on everything else, computed stably as
``logsumexp`` of its logits over the ids *not* kept minus its full ``logsumexp`` (never
``log(1 - sum q_i)``, which loses all precision when the tail is small):

    KL = [ sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail) ] * T**2.

This is the exact KL between the two distributions coarsened to k + 1 outcomes, a lower
bound on the full KL that equals it when the teacher's tail is empty. With ``k`` equal to
the vocabulary there is no tail bucket and the value is the full forward KL (equal to
:func:`lmdistill.loss.terms.kl_divergence` up to the rounding of the stored values). Stored
16-bit values make ``sum_i p_i`` off by rounding, so ``p_tail`` is clamped at 0.

Tail samples. When the teacher's top-k holds little of its mass (at ``T = 2`` the top 64 of
SmolLM2-135M's 49,152 tokens hold 23% on average), the bucket's gradient (in the student's
logits ``z = s/T``: ``q_j * mass - p~_j`` with ``p~_j = p_tail * q_j / q_tail`` on the tail, that
is, the teacher's tail mass spread like the student's own) carries no information on how the
teacher spreads that mass. A cache can store ``S`` ids ``t_1..t_S`` drawn with replacement from
the teacher's distribution at ``T`` restricted to the tail, with their logits. The tail part of
the KL is then the Monte-Carlo estimate

    sum_{j in tail} p_j (log p_j - log q_j)  ~  p_tail * mean_s (log p_{t_s} - log q_{t_s}),

unbiased in value and in gradient: ``p~_j = p_tail * count_j / S`` has expectation ``p_j``. The
per-position value is an estimate (it can come out below 0); the mean over a batch is close.

Conventions (shapes, ``mask``, ``reduction``, float32 upcast one chunk at a time, teacher
detached, ``* T**2``) are those of :mod:`lmdistill.loss.terms`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
from torch import Tensor

from .terms import _as_mask, _check_3d, _check_reduction, _compute_dtype, _per_position, _reduce

__all__ = ["SparseKLTerms", "SparseTargets", "check_sparse_targets", "sparse_kl_divergence", "sparse_kl_terms"]


@dataclass
class SparseTargets:
    """A teacher's sparse targets for ``(batch, seq)`` positions (a teacher cache's, at one temperature)."""

    values: Tensor
    """``(batch, seq, k)`` float16/bfloat16 (or wider) logits of the kept ids, shifted per position."""
    indices: Tensor
    """``(batch, seq, k)`` integer ids of those logits, distinct per position."""
    lse: Tensor
    """``(batch, seq)`` ``logsumexp(logits / T)`` over the vocabulary, with the same shift."""
    temperature: float | None = None
    """The ``T`` of ``lse`` (informative; the loss takes its temperature as an argument)."""
    tail_indices: Tensor | None = None
    """``(batch, seq, S)`` ids drawn from the teacher's tail at ``T``; None = tail bucket."""
    tail_values: Tensor | None = None
    """``(batch, seq, S)`` logits of ``tail_indices``, same shift as ``values``."""

    def map(self, fn: Callable[[Tensor], Tensor]) -> SparseTargets:
        """The same targets with ``fn`` applied to each tensor (absent tail fields stay None)."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def detach(self) -> SparseTargets:
        return self.map(Tensor.detach)

    def to(self, device: torch.device | str) -> SparseTargets:
        return self.map(lambda t: t.to(device))


def check_sparse_targets(targets: SparseTargets, batch_seq: tuple[int, ...] | torch.Size, vocab: int) -> None:
    """Raise ``ValueError`` unless ``targets`` fit ``batch_seq`` positions over ``vocab`` logits."""
    batch_seq = tuple(batch_seq)
    values, indices, k = targets.values, targets.indices, targets.values.shape[-1]
    if values.dim() != 3 or tuple(values.shape[:2]) != batch_seq or indices.shape != values.shape:
        raise ValueError(
            f"teacher_values {tuple(values.shape)} and teacher_indices {tuple(indices.shape)} must "
            f"both be (batch, seq, k) with (batch, seq) = {batch_seq} of the student's logits"
        )
    if tuple(targets.lse.shape) != batch_seq:
        raise ValueError(f"teacher_lse must have shape (batch, seq) = {batch_seq}, got {tuple(targets.lse.shape)}")
    for name in ("indices", "tail_indices"):
        ids = getattr(targets, name)
        if ids is not None and (ids.dtype.is_floating_point or ids.dtype == torch.bool):
            raise ValueError(f"teacher_{name} must be integer token ids, got {ids.dtype}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k = {k} teacher values per position, but the student has {vocab} logits; need 1 <= k <= vocab")
    tail_ids, tail_values = targets.tail_indices, targets.tail_values
    if (tail_ids is None) != (tail_values is None):
        raise ValueError("give both tail_indices and tail_values, or neither")
    if tail_ids is not None:
        if tail_ids.dim() != 3 or tuple(tail_ids.shape[:2]) != batch_seq or tail_values.shape != tail_ids.shape \
                or tail_ids.shape[-1] < 1:
            raise ValueError(f"tail_indices {tuple(tail_ids.shape)} and tail_values {tuple(tail_values.shape)} must "
                             f"both be (batch, seq, S) with S >= 1 and (batch, seq) = {batch_seq}")
        if k == vocab:
            raise ValueError("tail samples with k equal to the vocabulary: there is no tail to sample")


def sparse_kl_divergence(student_logits: Tensor, teacher_values: Tensor, teacher_indices: Tensor, teacher_lse: Tensor,
                         mask: Tensor | None = None, temperature: float = 1.0, reduction: str = "mean",
                         tail_indices: Tensor | None = None, tail_values: Tensor | None = None) -> Tensor:
    """Forward KL(teacher || student) per position from top-k teacher logits and the tail (bucket or samples).

    Args:
        student_logits: ``(batch, seq, vocab)``, any float dtype.
        teacher_values: ``(batch, seq, k)`` teacher logits of the kept tokens (fp16, bf16 or
            wider), shifted per position by any constant, the same one as ``teacher_lse``.
        teacher_indices: ``(batch, seq, k)`` integer token ids of those logits, distinct per
            position, in ``[0, vocab)``.
        teacher_lse: ``(batch, seq)`` ``logsumexp(teacher_logits / temperature)`` over the full
            vocabulary, at this ``temperature``.
        mask: ``(batch, seq)`` bool or 0/1, True where a position counts; None = all.
        temperature: ``T > 0``, the one ``teacher_lse`` was computed at.
        reduction: ``"mean"`` over counted positions or ``"sum"``.
        tail_indices, tail_values: ``(batch, seq, S)`` ids drawn from the teacher's tail at
            ``temperature`` and their logits (same shift as ``teacher_values``): the tail term
            is then the sampled estimate instead of the bucket (see the module docstring).

    Returns:
        Scalar tensor, float32 (float64 if the student logits or teacher values are float64).
    """
    _check_3d("student_logits", student_logits)
    _check_3d("teacher_values", teacher_values)
    _check_reduction(reduction)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    batch_seq, vocab = student_logits.shape[:2], student_logits.shape[-1]
    targets = SparseTargets(teacher_values, teacher_indices, teacher_lse, temperature, tail_indices, tail_values)
    check_sparse_targets(targets, batch_seq, vocab)
    valid = _as_mask(mask, batch_seq)
    dtype = _compute_dtype(student_logits, teacher_values)
    sampled = tail_indices is not None

    def chunk(s: Tensor, v: Tensor, idx: Tensor, lse: Tensor, *tail: Tensor) -> Tensor:
        z = s.to(dtype) / temperature
        return sparse_kl_terms(z, torch.logsumexp(z, dim=-1), v, idx, lse, temperature, *tail).kl

    teacher = (teacher_values.detach(), teacher_indices.detach(), teacher_lse.detach())
    if sampled:
        teacher += (tail_indices.detach(), tail_values.detach())
    per_pos = _per_position(chunk, student_logits, *teacher) * temperature**2
    return _reduce(per_pos, valid, reduction)


@dataclass
class SparseKLTerms:
    """Per-position sparse KL (before ``* T**2``) and the pieces its gradient is made of."""

    kl: Tensor
    p: Tensor
    """Teacher probabilities of the kept ids at ``T``."""
    p_tail: Tensor
    """Teacher mass outside the kept ids, clamped at 0."""
    log_q_tail: Tensor | None = None
    """Bucket only: the student's log-mass outside the kept ids."""
    rest: Tensor | None = None
    """Bucket only: ``z`` with the kept ids at ``-inf`` (in ``scratch`` when given)."""


def sparse_kl_terms(z: Tensor, lse_z: Tensor | None, values: Tensor, ids: Tensor, lse: Tensor, temperature: float,
                    tail_ids: Tensor | None = None, tail_values: Tensor | None = None,
                    scratch: Tensor | None = None) -> SparseKLTerms:
    """The sparse KL of each position (the module docstring's formulas, one place for both the
    autograd path here and the fused path of :mod:`lmdistill.loss.fused`).

    ``z``: the student's logits divided by ``T`` (``(..., vocab)``, the compute dtype) and
    ``lse_z`` their ``logsumexp`` (None when ``z`` is already a log-softmax). ``values``,
    ``ids``, ``lse``, ``tail_ids``, ``tail_values``: the stored targets of the same positions.
    ``scratch``: a ``z``-shaped buffer for the bucket's masked copy (no autograd through it).
    """
    ids = ids.long()
    dtype = z.dtype

    def log_q(at: Tensor) -> Tensor:  # the student's log-probabilities of the ids ``at``
        picked = z.gather(-1, at)
        return picked if lse_z is None else picked - lse_z.unsqueeze(-1)

    log_p = values.to(dtype) / temperature - lse.to(dtype).unsqueeze(-1)
    p = log_p.exp()
    # where: a kept token the teacher rules out (p = 0) adds 0, not 0 * -inf = NaN.
    kl = torch.where(p > 0, p * (log_p - log_q(ids)), 0.0).sum(dim=-1)
    p_tail = (1.0 - p.sum(dim=-1)).clamp(min=0.0)
    if tail_ids is not None:
        log_p_s = tail_values.to(dtype) / temperature - lse.to(dtype).unsqueeze(-1)
        kl = kl + p_tail * (log_p_s - log_q(tail_ids.long())).mean(dim=-1)
        return SparseKLTerms(kl, p, p_tail)
    if ids.shape[-1] == z.shape[-1]:  # k == vocab: every id is kept, no tail
        return SparseKLTerms(kl, p, p_tail)
    rest = z.scatter(-1, ids, float("-inf")) if scratch is None else scratch.copy_(z).scatter_(-1, ids, float("-inf"))
    log_q_tail = torch.logsumexp(rest, dim=-1)
    if lse_z is not None:
        log_q_tail = log_q_tail - lse_z
    # where: an empty teacher tail adds 0, even if the student's is empty too (0 * -inf).
    kl = kl + torch.where(p_tail > 0, torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail, 0.0)
    return SparseKLTerms(kl, p, p_tail, log_q_tail, rest)


"""Forward KL against stored sparse teacher targets: the top-k logits plus one tail bucket.

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
:func:`lmdistill.losses.kl_divergence` up to the rounding of the stored values). Stored
16-bit values make ``sum_i p_i`` off by rounding, so ``p_tail`` is clamped at 0.

Conventions (shapes, ``mask``, ``reduction``, float32 upcast one chunk at a time, teacher
detached, ``* T**2``) are those of :mod:`lmdistill.losses`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .losses import _as_mask, _check_3d, _check_reduction, _compute_dtype, _per_position, _reduce

__all__ = ["sparse_kl_divergence"]


def sparse_kl_divergence(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    teacher_lse: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Forward KL(teacher || student) per position from top-k teacher logits and a tail bucket.

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

    Returns:
        Scalar tensor, float32 (float64 if the student logits or teacher values are float64).
    """
    _check_3d("student_logits", student_logits)
    _check_3d("teacher_values", teacher_values)
    _check_reduction(reduction)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    batch_seq, vocab, k = student_logits.shape[:2], student_logits.shape[-1], teacher_values.shape[-1]
    if teacher_values.shape[:2] != batch_seq or teacher_indices.shape != teacher_values.shape:
        raise ValueError(
            f"teacher_values {tuple(teacher_values.shape)} and teacher_indices {tuple(teacher_indices.shape)} must "
            f"both be (batch, seq, k) with (batch, seq) = {tuple(batch_seq)} of student_logits"
        )
    if teacher_lse.shape != batch_seq:
        raise ValueError(f"teacher_lse must have shape (batch, seq) = {tuple(batch_seq)}, got {tuple(teacher_lse.shape)}")
    if teacher_indices.dtype.is_floating_point or teacher_indices.dtype == torch.bool:
        raise ValueError(f"teacher_indices must be integer token ids, got {teacher_indices.dtype}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k = {k} teacher values per position, but the student has {vocab} logits; need 1 <= k <= vocab")
    valid = _as_mask(mask, batch_seq)
    dtype = _compute_dtype(student_logits, teacher_values)
    has_tail = k < vocab  # with k == vocab every id is kept: no tail bucket

    def chunk(s: Tensor, v: Tensor, idx: Tensor, lse: Tensor) -> Tensor:
        s = s.to(dtype) / temperature
        lse_s = torch.logsumexp(s, dim=-1)
        idx = idx.long()
        log_q = s.gather(-1, idx) - lse_s.unsqueeze(-1)
        log_p = v.to(dtype) / temperature - lse.to(dtype).unsqueeze(-1)
        p = log_p.exp()
        # where: a kept token the teacher rules out (p = 0) adds 0, not 0 * -inf = NaN.
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)
        if has_tail:
            p_tail = (1.0 - p.sum(dim=-1)).clamp(min=0.0)
            log_q_tail = torch.logsumexp(s.scatter(-1, idx, float("-inf")), dim=-1) - lse_s
            kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
        return kl

    teacher = (teacher_values.detach(), teacher_indices.detach(), teacher_lse.detach())
    per_pos = _per_position(chunk, student_logits, *teacher) * temperature**2
    return _reduce(per_pos, valid, reduction)

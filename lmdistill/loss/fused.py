"""Fused, chunked KL + cross-entropy from last hidden states and lm_head weights.

The logit terms of :mod:`lmdistill.loss.terms` (:func:`~lmdistill.loss.terms.kl_divergence` and
:func:`~lmdistill.loss.terms.causal_lm_loss`) take ``(batch, seq, vocab)`` logits. At GPT-2 size
(batch 8, seq 1024, vocab 50,257) one float32 logits tensor is 1.65 GB, and a naive step holds
several: student and teacher logits, their log-softmaxes saved for backward, the gradient of
the logits. :func:`chunked_logit_losses` computes the same two terms without ever building a
``batch x seq x vocab`` tensor for either model: it walks the flattened positions
``chunk_tokens`` at a time, computes that chunk's student and teacher logits from the hidden
states (``hidden @ weight.T + bias``), the chunk's KL and CE values, and, in the same pass,
the chunk's gradient with respect to the student's hidden states, lm_head weight and bias
(the approach of Liger-Kernel's fused linear cross-entropy / fused linear JSD, in plain torch).
Only those gradients (``batch*seq x dim`` and ``vocab x dim``, both small) outlive the chunk.
The teacher side is either its last hidden states and lm_head (live distillation) or stored
sparse targets (``teacher_targets``, a teacher cache's top-k logits with the tail as a bucket
or as samples): the KL is then :func:`lmdistill.loss.sparse.sparse_kl_divergence`, and its
gradient ``T * (softmax(s/T) * mass - p~)`` is formed the same way. The two teacher sides
stand behind one interface (``DenseTeacher`` and ``SparseTeacher``): each gives, for a chunk,
a ``_DenseChunk`` or ``_SparseChunk`` with the chunk's KL and the KL's gradient in the student's
logits, so the chunk loop (``_Pass``) is the same for both.

Conventions are those of :mod:`lmdistill.loss.terms`: labels already shifted, ``mask`` bool or 0/1
``(batch, seq)``, ``reduction`` ``"mean"`` over counted positions (KL counts masked-in
positions, CE also skips ``labels == ignore_index``) or ``"sum"``, KL is forward
KL(teacher || student) on logits / T times ``T**2``, the teacher is detached, and each chunk is
upcast to float32 (float64 when any input is float64).

Gradient design
---------------
A ``torch.autograd.Function`` cannot know, during its forward pass, how the caller will combine
its outputs, and storing one full gradient set per term would double both the stored gradients
and the two large backward matmuls of every chunk. So the loss weights are *arguments*:
the gradient of ``total = kl_weight * KL + ce_weight * CE`` is formed per chunk as one
``chunk x vocab`` matrix (``kl_weight * T * (softmax(s/T) - p_t) + ce_weight * (softmax(s) -
onehot(y))``, each row scaled by its reduction factor and zeroed where the term does not
count), pushed through the two backward matmuls once, and accumulated (``grad_weight`` in
float32 or float64 whatever the weight's dtype). ``backward`` only multiplies the stored
gradients by the incoming ``grad_output`` (e.g. ``1 / step_tokens``) and casts them to the
inputs' dtypes; it scales them in place and releases them, so backpropagating twice through
one result (``retain_graph=True``) raises instead of duplicating a ``vocab x dim`` gradient.
Only ``total`` is differentiable; the per-term values are returned
*detached* (marked non-differentiable), so backpropagating through a re-weighted sum of the
terms fails loudly ("does not require grad") instead of silently giving a wrong gradient.
Change the weights by passing different ``kl_weight`` / ``ce_weight``.

Masked-out positions (and, when the KL term is off, positions CE skips) are dropped before the
loop, so padding costs no vocab-sized work. When gradients are not needed (``torch.no_grad()``,
or no student input requires grad) only the values are computed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .chunks import ChunkSpec, DenseTeacher, SparseTeacher, forward_chunks
from .sparse import SparseTargets, check_sparse_targets
from .terms import LossOutput, _as_mask, _check_reduction, _compute_dtype

__all__ = ["DEFAULT_CHUNK_TOKENS", "chunked_logit_losses"]

# Positions per chunk. At vocab 50,257 a float32 chunk x vocab buffer is 206 MB at 1024 and
# about four such buffers are live at once (student logits, log-softmax at T, teacher log-probs,
# teacher probs). benchmarks/chunked_loss.py measures the trade-off; smaller chunks save memory
# but make the vocab x chunk x dim weight-gradient matmul less efficient.
DEFAULT_CHUNK_TOKENS = 1024


def chunked_logit_losses(
    student_hidden: Tensor, student_head_weight: Tensor, teacher_hidden: Tensor | None,
    teacher_head_weight: Tensor | None, labels: Tensor, *, kl_weight: float, ce_weight: float,
    temperature: float = 2.0, mask: Tensor | None = None, reduction: str = "sum",
    student_head_bias: Tensor | None = None, teacher_head_bias: Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS, ignore_index: int = -100, matmul_dtype: torch.dtype | None = None,
    teacher_targets: SparseTargets | None = None,
) -> LossOutput:
    """KL(teacher || student) and causal-LM CE computed chunk by chunk from hidden states.

    Same values as ``kl_divergence(hs @ Ws.T + bs, ht @ Wt.T + bt, mask, temperature,
    reduction)`` and ``causal_lm_loss(hs @ Ws.T + bs, labels, mask, reduction, ignore_index)``
    and the same gradient for ``kl_weight * KL + ce_weight * CE``, without materialising the
    logits (see the module docstring for the design).

    Args:
        student_hidden: ``(batch, seq, dim)`` last hidden states of the student (after its
            final norm), float32, bfloat16 or float64; its gradient comes back in its dtype.
        student_head_weight: ``(vocab, dim)`` student lm_head weight. If it is tied to the
            input embedding, pass the shared parameter: its gradient accumulates there.
        teacher_hidden: ``(batch, seq, dim_t)``; detached. Needed only when ``kl_weight > 0``.
        teacher_head_weight: ``(vocab, dim_t)``; detached. Needed only when ``kl_weight > 0``.
        labels: ``(batch, seq)`` next-token ids (already shifted); ``ignore_index`` = no target.
        kl_weight: weight of the KL term in ``total`` (>= 0; 0 skips it and the teacher).
        ce_weight: weight of the CE term in ``total`` (>= 0; 0 skips it).
        temperature: ``T > 0`` of the KL term.
        mask: ``(batch, seq)`` bool or 0/1, True where a position counts; None = all.
        reduction: ``"mean"`` over counted positions (per term) or ``"sum"``.
        student_head_bias, teacher_head_bias: optional ``(vocab,)`` lm_head biases.
        chunk_tokens: positions per chunk (>= 1).
        ignore_index: label value that CE skips.
        teacher_targets: stored sparse teacher targets (:class:`~lmdistill.loss.sparse.SparseTargets`,
            e.g. a teacher cache's) instead of ``teacher_hidden`` / ``teacher_head_weight``: the
            KL term is then :func:`~lmdistill.loss.sparse.sparse_kl_divergence` against them (top-k
            plus tail bucket, or plus tail samples), with the same fused gradient.
        matmul_dtype: dtype of the vocab-sized matmuls (student and teacher logits, and the
            two backward products). None (default) = the compute dtype (float32, or float64
            when an input is float64); bf16 head weights are then upcast once per call (one
            ``vocab x dim`` float32 copy per model). ``torch.bfloat16`` runs them in bf16 like a
            bf16 model's own lm_head (faster on GPUs); softmax, losses and the weight-gradient
            sum over chunks stay in float32.

    Returns:
        :class:`~lmdistill.loss.terms.LossOutput`: ``total`` (scalar, differentiable w.r.t. the
        student's hidden states, head weight and bias) and ``terms`` with ``"kl"`` and/or
        ``"ce"`` (those with weight > 0), unweighted and *detached*: log them, do not
        backpropagate through them. Values are float32 (float64 for float64 inputs).
    """
    _check_settings(kl_weight, ce_weight, reduction, chunk_tokens)
    batch_seq, vocab = _check_student(student_hidden, student_head_weight, student_head_bias, labels)
    teacher = _teacher_side(teacher_hidden, teacher_head_weight, teacher_head_bias, teacher_targets, kl_weight,
                            batch_seq, vocab)
    if teacher is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    valid_kl = _as_mask(mask, batch_seq)
    valid_ce = labels != ignore_index
    if valid_kl is not None:
        valid_ce = valid_ce & valid_kl
    student = [student_hidden, student_head_weight] + ([student_head_bias] if student_head_bias is not None else [])
    compute_dtype = _compute_dtype(*student, *(teacher.dtype_inputs if teacher is not None else ()))
    spec = ChunkSpec(
        use_kl=teacher is not None, use_ce=ce_weight > 0, kl_weight=float(kl_weight), ce_weight=float(ce_weight),
        temperature=float(temperature), reduction=reduction, chunk_tokens=chunk_tokens,
        compute_dtype=compute_dtype, matmul_dtype=matmul_dtype or compute_dtype,
    )
    if torch.is_grad_enabled() and any(t.requires_grad for t in student):
        total, kl, ce = _FusedLogitLosses.apply(
            student_hidden, student_head_weight, student_head_bias, spec, teacher, labels, valid_kl, valid_ce)
    else:
        with torch.no_grad():
            detached = [None if t is None else t.detach() for t in (student_hidden, student_head_weight, student_head_bias)]
            kl, ce, _ = forward_chunks(spec, *detached, teacher, labels, valid_kl, valid_ce, grads=None)
            total = _weighted(spec, kl, ce)
    terms = {name: value for name, value, used in (("kl", kl, spec.use_kl), ("ce", ce, spec.use_ce)) if used}
    return LossOutput(total=total, terms=terms)


# --------------------------------------------------------------------------- checks


def _check_settings(kl_weight: float, ce_weight: float, reduction: str, chunk_tokens: int) -> None:
    _check_reduction(reduction)
    for name, w in (("kl_weight", kl_weight), ("ce_weight", ce_weight)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
    if kl_weight == 0 and ce_weight == 0:
        raise ValueError("kl_weight and ce_weight are both 0; set at least one > 0")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")


def _check_student(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> tuple[torch.Size, int]:
    """``((batch, seq), vocab)`` of the student's inputs, checked against each other."""
    if hidden.dim() != 3:
        raise ValueError(f"student_hidden must have shape (batch, seq, dim), got {tuple(hidden.shape)}")
    batch_seq = hidden.shape[:2]
    _check_head("student", weight, bias, hidden.shape[2])
    if labels.shape != batch_seq:
        raise ValueError(
            f"labels must have shape (batch, seq) = {tuple(batch_seq)}, got {tuple(labels.shape)}; "
            "shift hidden states and labels before calling"
        )
    return batch_seq, weight.shape[0]


def _check_head(who: str, weight: Tensor, bias: Tensor | None, dim: int) -> None:
    if weight.dim() != 2 or weight.shape[1] != dim:
        raise ValueError(
            f"{who}_head_weight must have shape (vocab, {dim}) to match {who}_hidden, got "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"{who}_head_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
        )


def _teacher_side(hidden: Tensor | None, weight: Tensor | None, bias: Tensor | None, targets: SparseTargets | None,
                  kl_weight: float, batch_seq: torch.Size, vocab: int) -> DenseTeacher | SparseTeacher | None:
    """The KL term's teacher, checked against the student and detached; None when the term is off."""
    if targets is not None:
        if hidden is not None or weight is not None:
            raise ValueError("pass either teacher_targets or teacher_hidden / teacher_head_weight, not both")
        if kl_weight == 0:
            return None
        check_sparse_targets(targets, batch_seq, vocab)
        return SparseTeacher(targets.detach())
    if kl_weight == 0:
        return None
    if hidden is None or weight is None:
        raise ValueError(
            f"kl_weight is {kl_weight} but teacher_hidden or teacher_head_weight is None; "
            "pass both or set kl_weight to 0"
        )
    if hidden.dim() != 3 or hidden.shape[:2] != batch_seq:
        raise ValueError(
            f"teacher_hidden must have shape (batch, seq, dim_t) with (batch, seq) = "
            f"{tuple(batch_seq)}, got {tuple(hidden.shape)}"
        )
    _check_head("teacher", weight, bias, hidden.shape[2])
    if weight.shape[0] != vocab:
        raise ValueError(
            f"teacher vocab {weight.shape[0]} != student vocab {vocab}; teacher and "
            "student must share a vocabulary (same tokenizer, same padded size)"
        )
    return DenseTeacher(hidden.detach(), weight.detach(), None if bias is None else bias.detach())


# --------------------------------------------------------------------------- autograd


def _weighted(spec: ChunkSpec, kl: Tensor, ce: Tensor) -> Tensor:
    return spec.kl_weight * kl + spec.ce_weight * ce


class _FusedLogitLosses(torch.autograd.Function):
    """Outputs ``(total, kl, ce)``; only ``total`` is differentiable. Forward computes the
    gradients of ``total`` (for grad_output = 1) chunk by chunk and stores only them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, spec, teacher, labels, valid_kl, valid_ce):
        want = {"hidden": ctx.needs_input_grad[0], "weight": ctx.needs_input_grad[1],
                "bias": bias is not None and ctx.needs_input_grad[2]}
        kl, ce, grads = forward_chunks(spec, hidden, weight, bias, teacher, labels, valid_kl, valid_ce, want)
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        total = _weighted(spec, kl, ce)
        ctx.mark_non_differentiable(kl, ce)
        return total, kl, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_kl, _grad_ce):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "chunked_logit_losses: backward through the same result twice is not supported "
                "(its stored gradients were scaled in place and released); recompute the loss"
            )
        out = []
        for name, dtype in zip(("hidden", "weight", "bias"), ctx.dtypes):
            g = grads.pop(name)
            if g is not None:
                # In place, and no reference kept: autograd can then take the tensor as .grad
                # without a copy (a vocab x dim weight gradient is not duplicated here).
                g = g.mul_(grad_total.to(g.dtype)).to(dtype)
            out.append(g)
        return (*out, None, None, None, None, None)

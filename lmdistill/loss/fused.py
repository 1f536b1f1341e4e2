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
gradient ``T * (softmax(s/T) * mass - p~)`` is formed the same way (see ``_SparseChunk``).

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
from dataclasses import dataclass

import torch
from torch import Tensor

from .terms import LossOutput, _as_mask, _check_reduction, _compute_dtype, _reduce
from .sparse import SparseKLTerms, SparseTargets, check_sparse_targets, sparse_kl_terms

__all__ = ["DEFAULT_CHUNK_TOKENS", "chunked_logit_losses"]

# Positions per chunk. At vocab 50,257 a float32 chunk x vocab buffer is 206 MB at 1024 and
# about four such buffers are live at once (student logits, log-softmax at T, teacher log-probs,
# teacher probs). benchmarks/chunked_loss.py measures the trade-off; smaller chunks save memory
# but make the vocab x chunk x dim weight-gradient matmul less efficient.
DEFAULT_CHUNK_TOKENS = 1024


def chunked_logit_losses(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_head_weight: Tensor | None,
    labels: Tensor,
    *,
    kl_weight: float,
    ce_weight: float,
    temperature: float = 2.0,
    mask: Tensor | None = None,
    reduction: str = "sum",
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = -100,
    matmul_dtype: torch.dtype | None = None,
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
    _check_reduction(reduction)
    for name, w in (("kl_weight", kl_weight), ("ce_weight", ce_weight)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
    if kl_weight == 0 and ce_weight == 0:
        raise ValueError("kl_weight and ce_weight are both 0; set at least one > 0")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
    use_kl, use_ce = kl_weight > 0, ce_weight > 0

    if student_hidden.dim() != 3:
        raise ValueError(
            f"student_hidden must have shape (batch, seq, dim), got {tuple(student_hidden.shape)}"
        )
    batch_seq, dim = student_hidden.shape[:2], student_hidden.shape[2]
    _check_head("student", student_head_weight, student_head_bias, dim)
    vocab = student_head_weight.shape[0]
    if labels.shape != batch_seq:
        raise ValueError(
            f"labels must have shape (batch, seq) = {tuple(batch_seq)}, got {tuple(labels.shape)}; "
            "shift hidden states and labels before calling"
        )
    sparse = teacher_targets is not None
    if sparse:
        if teacher_hidden is not None or teacher_head_weight is not None:
            raise ValueError("pass either teacher_targets or teacher_hidden / teacher_head_weight, not both")
        if use_kl:
            check_sparse_targets(teacher_targets, batch_seq, vocab)
    elif use_kl:
        if teacher_hidden is None or teacher_head_weight is None:
            raise ValueError(
                f"kl_weight is {kl_weight} but teacher_hidden or teacher_head_weight is None; "
                "pass both or set kl_weight to 0"
            )
        if teacher_hidden.dim() != 3 or teacher_hidden.shape[:2] != batch_seq:
            raise ValueError(
                f"teacher_hidden must have shape (batch, seq, dim_t) with (batch, seq) = "
                f"{tuple(batch_seq)}, got {tuple(teacher_hidden.shape)}"
            )
        _check_head("teacher", teacher_head_weight, teacher_head_bias, teacher_hidden.shape[2])
        if teacher_head_weight.shape[0] != vocab:
            raise ValueError(
                f"teacher vocab {teacher_head_weight.shape[0]} != student vocab {vocab}; teacher and "
                "student must share a vocabulary (same tokenizer, same padded size)"
            )
    if use_kl and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not use_kl or sparse:
        teacher_hidden = teacher_head_weight = teacher_head_bias = None

    valid_kl = _as_mask(mask, batch_seq)
    valid_ce = labels != ignore_index
    if valid_kl is not None:
        valid_ce = valid_ce & valid_kl

    student_inputs = [student_hidden, student_head_weight] + (
        [student_head_bias] if student_head_bias is not None else []
    )
    teacher_inputs = [t for t in (teacher_hidden, teacher_head_weight, teacher_head_bias) if t is not None]
    if sparse and use_kl:
        teacher_inputs.append(teacher_targets.values)
    compute_dtype = _compute_dtype(*student_inputs, *teacher_inputs)
    spec = _Spec(
        use_kl=use_kl, use_ce=use_ce, kl_weight=float(kl_weight), ce_weight=float(ce_weight),
        temperature=float(temperature), reduction=reduction, chunk_tokens=chunk_tokens,
        compute_dtype=compute_dtype, matmul_dtype=matmul_dtype or compute_dtype,
    )
    teacher = None
    if use_kl and sparse:
        teacher = teacher_targets.detach()
    elif use_kl:
        teacher = (teacher_hidden.detach(), teacher_head_weight.detach(),
                   None if teacher_head_bias is None else teacher_head_bias.detach())

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in student_inputs)
    if not needs_grad:
        with torch.no_grad():
            kl, ce, _ = _forward(spec, student_hidden.detach(), student_head_weight.detach(),
                                 None if student_head_bias is None else student_head_bias.detach(),
                                 teacher, labels, valid_kl, valid_ce, grads=None)
            total = _weighted(spec, kl, ce)
    else:
        total, kl, ce = _FusedLogitLosses.apply(
            student_hidden, student_head_weight, student_head_bias,
            spec, teacher, labels, valid_kl, valid_ce,
        )
    terms = {}
    if use_kl:
        terms["kl"] = kl
    if use_ce:
        terms["ce"] = ce
    return LossOutput(total=total, terms=terms)


# --------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Spec:
    """Settings of one call, passed through the autograd Function."""

    use_kl: bool
    use_ce: bool
    kl_weight: float
    ce_weight: float
    temperature: float
    reduction: str
    chunk_tokens: int
    compute_dtype: torch.dtype
    matmul_dtype: torch.dtype


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


def _weighted(spec: _Spec, kl: Tensor, ce: Tensor) -> Tensor:
    return spec.kl_weight * kl + spec.ce_weight * ce


def _row_scale(valid: Tensor | None, n_positions: int, reduction: str) -> float:
    """Factor of each counted position in the reduced value (matches ``losses._reduce``)."""
    if reduction == "sum":
        return 1.0
    count = n_positions if valid is None else int(valid.sum())
    return 1.0 / max(count, 1)


def _forward(spec, hidden, weight, bias, teacher, labels, valid_kl, valid_ce, grads):
    """Loss values, and (when ``grads`` is a dict of which grads to build) the gradients of
    ``total`` w.r.t. hidden / weight / bias with ``grad_output = 1``.

    Returns ``(kl, ce, grads_dict)``; kl/ce are 0-dim tensors in the compute dtype.
    """
    cdt, mdt = spec.compute_dtype, spec.matmul_dtype
    batch, seq, dim = hidden.shape
    n = batch * seq
    device = hidden.device
    T = spec.temperature

    # Rows that need vocab-sized work: counted by at least one active term.
    if spec.use_kl:
        active = valid_kl
    else:
        active = valid_ce
    flat_h = hidden.reshape(n, dim)
    # Ids CE skips become 0 (any valid id; their rows get no CE value or gradient).
    flat_y = labels.reshape(n).masked_fill(~valid_ce.reshape(n), 0)
    rows = None
    if active is not None and not bool(active.all()):
        rows = active.reshape(n).nonzero().squeeze(1)
    take = (lambda x: x) if rows is None else (lambda x: x.index_select(0, rows))
    h = take(flat_h)
    y = take(flat_y)
    m = h.shape[0]
    ce_rows = take(valid_ce.reshape(n))  # bool (m,)
    kl_rows = None if valid_kl is None else take(valid_kl.reshape(n))

    # Per-position values live in (n,) buffers so losses._reduce gives the exact reduction.
    kl_pos = torch.zeros(n, dtype=cdt, device=device)
    ce_pos = torch.zeros(n, dtype=cdt, device=device)

    # Per-row gradient coefficients (0 where a term does not count).
    coef_ce = coef_kl = None
    if grads is not None:
        if spec.use_ce:
            coef_ce = ce_rows.to(cdt) * (spec.ce_weight * _row_scale(valid_ce, n, spec.reduction))
        if spec.use_kl:
            s = spec.kl_weight * T * _row_scale(valid_kl, n, spec.reduction)
            coef_kl = (torch.full((m,), s, dtype=cdt, device=device) if kl_rows is None
                       else kl_rows.to(cdt) * s)

    w_mm = weight.to(mdt)
    b_c = None if bias is None else bias.to(cdt)
    sparse = isinstance(teacher, SparseTargets)
    if spec.use_kl and sparse:
        flat = lambda x: None if x is None else take(x.reshape(n, x.shape[-1]))  # noqa: E731
        t_vals, t_idx, t_tail_idx, t_tail_vals = (flat(teacher.values), flat(teacher.indices),
                                                  flat(teacher.tail_indices), flat(teacher.tail_values))
        t_lse = take(teacher.lse.reshape(n))
    elif spec.use_kl:
        t_hidden, t_weight, t_bias = teacher
        t_h = take(t_hidden.reshape(n, t_hidden.shape[2]))
        tw_mm = t_weight.to(mdt)
        tb_c = None if t_bias is None else t_bias.to(cdt)

    want_h = grads is not None and grads["hidden"]
    want_w = grads is not None and grads["weight"]
    want_b = grads is not None and grads["bias"]
    grad_h = torch.zeros(m, dim, dtype=cdt, device=device) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=cdt, device=device) if want_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=cdt, device=device) if want_b else None
    out_rows = torch.arange(n, device=device) if rows is None else rows
    tiny = torch.finfo(cdt).min
    T2 = T * T
    width = min(spec.chunk_tokens, m)
    pool = _Pool(width, weight.shape[0], cdt, device)
    low_pool = _Pool(width, weight.shape[0], mdt, device) if mdt != cdt else None

    def logits(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """``x @ w.T + b`` into a pooled ``(k, vocab)`` buffer of the compute dtype."""
        out = pool.take(x.shape[0])
        if low_pool is None:
            torch.mm(x, w.t(), out=out)
        else:
            tmp = torch.mm(x, w.t(), out=low_pool.take(x.shape[0]))
            out.copy_(tmp)
            low_pool.release(tmp)
        if b is not None:
            out += b
        return out

    for start in range(0, m, spec.chunk_tokens):
        stop = min(start + spec.chunk_tokens, m)
        k = stop - start
        at = out_rows[start:stop]
        h_mm = h[start:stop].to(mdt)
        s = logits(h_mm, w_mm, b_c)  # student logits (k, V)
        log_sm = log_q = p = None
        if spec.use_ce:
            y_c = y[start:stop].unsqueeze(1)
            log_sm = torch.log_softmax(s, -1, out=pool.take(k))
            ce_pos[at] = -log_sm.gather(1, y_c).squeeze(1)
        if spec.use_kl:
            if T == 1.0 and log_sm is not None:
                log_q = log_sm  # same log-softmax serves both terms
            else:
                if T != 1.0:
                    s.div_(T)
                log_q = torch.log_softmax(s, -1, out=pool.take(k))
            pool.release(s)
        if spec.use_kl and sparse:
            rows_kl = slice(start, stop)
            sparse_kl = _sparse_chunk(log_q, t_vals[rows_kl], t_idx[rows_kl], t_lse[rows_kl],
                                      None if t_tail_idx is None else t_tail_idx[rows_kl],
                                      None if t_tail_vals is None else t_tail_vals[rows_kl], T, pool,
                                      want_tail_weights=grads is not None)
            kl_pos[at] = sparse_kl.kl * T2
        elif spec.use_kl:
            t = logits(t_h[start:stop].to(mdt), tw_mm, tb_c)  # teacher logits
            if T != 1.0:
                t.div_(T)
            log_p = torch.log_softmax(t, -1, out=pool.take(k))
            p = torch.exp(log_p, out=t)
            # sum_v p (log p - log q), with 0 * log 0 = 0: where p == 0 (teacher logit -inf),
            # log p is clamped to a finite value, so the product is 0, not NaN.
            kl_pos[at] = log_p.clamp_(min=tiny).sub_(log_q).mul_(p).sum(-1) * T2
            pool.release(log_p)
        else:
            pool.release(s)

        if grads is not None:
            # Gradient of total w.r.t. the chunk's student logits, rows scaled by their
            # coefficients: coef_kl * (softmax(s/T) - p) + coef_ce * (softmax(s) - onehot(y)).
            if spec.use_kl and sparse:
                # Sparse teacher: coef_kl * (softmax(s/T) * mass - p~) (see _sparse_chunk).
                c_kl = coef_kl[start:stop, None]
                q_scale = c_kl * sparse_kl.mass.unsqueeze(1)
                if log_q is log_sm:  # T == 1: the CE term shares the softmax
                    g = log_sm.exp_().mul_(q_scale + coef_ce[start:stop, None])
                else:
                    g = log_q.exp_().mul_(q_scale)
                    if log_sm is not None:
                        g.addcmul_(log_sm.exp_(), coef_ce[start:stop, None])
                sparse_kl.subtract_teacher(g, c_kl)
            elif spec.use_kl:
                c_kl = coef_kl[start:stop, None]
                if log_q is log_sm:  # T == 1: (c_kl + c_ce) softmax(s) - c_kl p - c_ce onehot
                    g = log_sm.exp_().mul_(c_kl + coef_ce[start:stop, None]).addcmul_(p, c_kl, value=-1)
                else:
                    g = log_q.exp_().sub_(p).mul_(c_kl)
                    if log_sm is not None:
                        g.addcmul_(log_sm.exp_(), coef_ce[start:stop, None])
            else:
                g = log_sm.exp_().mul_(coef_ce[start:stop, None])
            if spec.use_ce:
                g.scatter_add_(1, y_c, -coef_ce[start:stop, None])
            g_mm = g if low_pool is None else low_pool.take(k).copy_(g)
            if want_h:
                if low_pool is None:
                    torch.mm(g_mm, w_mm, out=grad_h[start:stop])
                else:
                    grad_h[start:stop] = g_mm @ w_mm
            if want_w:
                if low_pool is None:
                    grad_w.addmm_(g_mm.t(), h_mm)
                else:  # low-precision product of the chunk, summed over chunks in cdt
                    grad_w += g_mm.t() @ h_mm
            if want_b:
                grad_b += g.sum(dim=0)
        pool.reset()
        if low_pool is not None:
            low_pool.reset()

    kl = _reduce(kl_pos.view(batch, seq), valid_kl, spec.reduction)
    ce = _reduce(ce_pos.view(batch, seq), valid_ce, spec.reduction)
    out = None
    if grads is not None:
        out = {"weight": grad_w, "bias": grad_b, "hidden": None}
        if want_h:
            if rows is None:
                out["hidden"] = grad_h.view(batch, seq, dim)
            else:
                full = torch.zeros(n, dim, dtype=cdt, device=device)
                full.index_copy_(0, rows, grad_h)
                out["hidden"] = full.view(batch, seq, dim)
    return kl, ce, out


@dataclass
class _SparseChunk:
    """One chunk's sparse KL terms (before ``* T**2``) and what its gradient needs."""

    terms: SparseKLTerms
    ids: Tensor
    """``(k, K)`` kept ids."""
    tail_ids: Tensor | None
    """``(k, S)`` sampled tail ids, each carrying ``p_tail / S``; None = tail bucket."""
    tail_weights: Tensor | None
    """Bucket only, when gradients are wanted: ``(k, V)`` ``q_j / q_tail`` on tail ids, 0 on kept ids."""

    @property
    def kl(self) -> Tensor:
        return self.terms.kl

    @property
    def mass(self) -> Tensor:
        """``(k,)`` teacher mass the gradient's ``softmax(s/T)`` term is scaled by: ``sum p_i + p_tail``."""
        return self.terms.p.sum(dim=1) + self.terms.p_tail

    def subtract_teacher(self, g: Tensor, c_kl: Tensor) -> None:
        """``g -= c_kl * p~``: ``p_i`` on kept ids, the tail mass spread over the tail (by the
        samples, or in proportion to the student's tail for the bucket)."""
        p_tail = self.terms.p_tail
        g.scatter_add_(1, self.ids, self.terms.p * -c_kl)
        if self.tail_ids is not None:
            share = (p_tail / self.tail_ids.shape[1]).unsqueeze(1) * -c_kl
            g.scatter_add_(1, self.tail_ids, share.expand_as(self.tail_ids))
        elif self.tail_weights is not None:
            g.addcmul_(self.tail_weights, p_tail.unsqueeze(1) * c_kl, value=-1)


def _sparse_chunk(log_q: Tensor, values: Tensor, ids: Tensor, lse: Tensor, tail_ids: Tensor | None,
                  tail_values: Tensor | None, T: float, pool: _Pool, want_tail_weights: bool) -> _SparseChunk:
    """The sparse KL of a chunk (:func:`lmdistill.loss.sparse.sparse_kl_terms`) from the student's
    log-softmax at ``T`` and the stored targets of its rows, with what its gradient needs."""
    bucket = tail_ids is None and ids.shape[1] < log_q.shape[1]
    terms = sparse_kl_terms(log_q, None, values, ids, lse, T, tail_ids, tail_values,
                            scratch=pool.take(log_q.shape[0]) if bucket else None)
    tail_weights = None
    if terms.rest is not None:
        if want_tail_weights:  # q_j / q_tail on tail ids; exp(-inf) = 0 on kept ids
            finite = torch.where(torch.isfinite(terms.log_q_tail), terms.log_q_tail, 0.0)
            tail_weights = terms.rest.sub_(finite.unsqueeze(1)).exp_()
        else:
            pool.release(terms.rest)
    return _SparseChunk(terms, ids.long(), None if tail_ids is None else tail_ids.long(), tail_weights)


class _Pool:
    """Reusable ``(rows, vocab)`` buffers for the chunks of one call.

    On CPU a fresh allocation of this size is a new mmap whose pages fault in on first touch
    (and are returned to the OS when freed), so allocating per chunk costs time; on CUDA the
    caching allocator would reuse memory anyway. ``take(k)`` gives a ``(k, vocab)`` view of a
    free buffer (allocated on first need), ``release`` returns one, ``reset`` returns all.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = (rows, vocab), dtype, device
        self.buffers: list[Tensor] = []
        self.free: list[Tensor] = []

    def take(self, k: int) -> Tensor:
        if not self.free:
            self.buffers.append(torch.empty(self.shape, dtype=self.dtype, device=self.device))
            self.free.append(self.buffers[-1])
        return self.free.pop()[:k]

    def release(self, view: Tensor) -> None:
        base = view._base if view._base is not None else view
        assert any(base is b for b in self.buffers) and not any(base is b for b in self.free)
        self.free.append(base)

    def reset(self) -> None:
        self.free = list(self.buffers)


class _FusedLogitLosses(torch.autograd.Function):
    """Outputs ``(total, kl, ce)``; only ``total`` is differentiable. Forward computes the
    gradients of ``total`` (for grad_output = 1) chunk by chunk and stores only them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, spec, teacher, labels, valid_kl, valid_ce):
        want = {"hidden": ctx.needs_input_grad[0], "weight": ctx.needs_input_grad[1],
                "bias": bias is not None and ctx.needs_input_grad[2]}
        kl, ce, grads = _forward(spec, hidden, weight, bias, teacher, labels, valid_kl, valid_ce, want)
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

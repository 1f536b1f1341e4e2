"""The chunk loop of the fused lm_head loss (:func:`lmdistill.loss.fused.chunked_logit_losses`).

:func:`forward_chunks` walks the counted positions ``chunk_tokens`` at a time: the chunk's
student logits (``hidden @ weight.T + bias``) and log-softmaxes, its CE and KL values, and, when
gradients are wanted, the gradient of ``total`` in the chunk's logits pushed through the
lm_head at once. The teacher side stands behind one interface, so the loop has no branch on it:

- :class:`DenseTeacher` (a live teacher's last hidden states and lm_head) computes the chunk's
  teacher log-probabilities and gives a ``_DenseChunk``;
- :class:`SparseTeacher` (stored top-k logits with the tail as a bucket or samples, a teacher
  cache's) gives a ``_SparseChunk`` (:func:`lmdistill.loss.sparse.sparse_kl_terms`).

Each chunk has ``kl`` (per row, before ``* T**2``) and ``student_grad``: ``c_kl * (softmax(s/T) *
mass - p~)`` plus the CE's ``c_ce * softmax(s)``, where the teacher side decides the order of
the operations (each keeps the rounding of the code it came from, so values are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .sparse import SparseKLTerms, SparseTargets, sparse_kl_terms
from .terms import _reduce


@dataclass(frozen=True)
class ChunkSpec:
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


def _row_scale(valid: Tensor | None, n_positions: int, reduction: str) -> float:
    """Factor of each counted position in the reduced value (matches ``terms._reduce``)."""
    if reduction == "sum":
        return 1.0
    count = n_positions if valid is None else int(valid.sum())
    return 1.0 / max(count, 1)


def forward_chunks(spec: ChunkSpec, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                   teacher: DenseTeacher | SparseTeacher | None, labels: Tensor, valid_kl: Tensor | None,
                   valid_ce: Tensor, grads: dict[str, bool] | None) -> tuple[Tensor, Tensor, dict | None]:
    """Loss values, and (when ``grads`` says which of hidden / weight / bias to build) the gradients
    of ``total`` with ``grad_output = 1``. Returns ``(kl, ce, grads_dict)``; kl and ce are 0-dim
    tensors in the compute dtype."""
    walk = _Pass(spec, hidden, weight, bias, teacher, labels, valid_kl, valid_ce, grads)
    for start in range(0, walk.m, spec.chunk_tokens):
        walk.chunk(start, min(start + spec.chunk_tokens, walk.m))
    return walk.results()


@dataclass(frozen=True)
class _Rows:
    """The flattened ``batch * seq`` positions that need vocab-sized work (counted by an active
    term), in order; ``index`` None means all of them."""

    n: int
    index: Tensor | None

    @staticmethod
    def counted(active: Tensor | None, n: int) -> _Rows:
        if active is None or bool(active.all()):
            return _Rows(n, None)
        return _Rows(n, active.reshape(n).nonzero().squeeze(1))

    def take(self, x: Tensor) -> Tensor:
        """The rows of ``x`` ``(n, ...)``."""
        return x if self.index is None else x.index_select(0, self.index)

    def flat(self, x: Tensor) -> Tensor:
        """The rows of ``x`` ``(batch, seq, ...)``, flattened to ``(rows, ...)``."""
        return self.take(x.reshape(self.n, *x.shape[2:]))


class _Pass:
    """One call's walk over the chunks: the student's rows, the teacher side for the same rows,
    the pooled buffers, and what accumulates (per-position values and gradients)."""

    def __init__(self, spec: ChunkSpec, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                 teacher: DenseTeacher | SparseTeacher | None, labels: Tensor, valid_kl: Tensor | None,
                 valid_ce: Tensor, grads: dict[str, bool] | None) -> None:
        cdt, device = spec.compute_dtype, hidden.device
        batch, seq, dim = hidden.shape
        n = batch * seq
        self.spec, self.shape, self.valid_kl, self.valid_ce = spec, hidden.shape, valid_kl, valid_ce
        self.rows = _Rows.counted(valid_kl if spec.use_kl else valid_ce, n)
        self.h = self.rows.flat(hidden)
        self.m = self.h.shape[0]
        # Ids CE skips become 0 (any valid id; their rows get no CE value or gradient).
        self.y = self.rows.take(labels.reshape(n).masked_fill(~valid_ce.reshape(n), 0))
        self.teacher = None if teacher is None else teacher.rows(self.rows, spec)
        self.w_mm, self.b_c = weight.to(spec.matmul_dtype), None if bias is None else bias.to(cdt)
        # Per-position values live in (n,) buffers so terms._reduce gives the exact reduction.
        self.kl_pos = torch.zeros(n, dtype=cdt, device=device)
        self.ce_pos = torch.zeros(n, dtype=cdt, device=device)
        self.at = torch.arange(n, device=device) if self.rows.index is None else self.rows.index
        self.buffers = _Buffers(min(spec.chunk_tokens, self.m), weight.shape[0], spec, device)
        self.want_grads = grads is not None
        want = grads or {}
        self.grad_h = torch.zeros(self.m, dim, dtype=cdt, device=device) if want.get("hidden") else None
        self.grad_w = torch.zeros(weight.shape, dtype=cdt, device=device) if want.get("weight") else None
        self.grad_b = torch.zeros(weight.shape[0], dtype=cdt, device=device) if want.get("bias") else None
        # A low-precision chunk product of the head weight's gradient and its copy in the compute
        # dtype, allocated once per call: a mixed-dtype ``+=`` would convert into fresh memory
        # (and elementwise, unvectorised) on every chunk.
        self.grad_w_parts = None
        if self.grad_w is not None and self.buffers.low is not None:
            self.grad_w_parts = (torch.empty(weight.shape, dtype=spec.matmul_dtype, device=device),
                                 torch.empty(weight.shape, dtype=cdt, device=device))
        self.coef_ce = self.coef_kl = None
        if self.want_grads:
            self.coef_ce, self.coef_kl = _coefficients(spec, self.rows, self.m, valid_kl, valid_ce)

    def chunk(self, start: int, stop: int) -> None:
        """Rows ``start:stop``: their CE and KL values and, when wanted, their gradients."""
        spec, pool, T = self.spec, self.buffers.pool, self.spec.temperature
        at, k = self.at[start:stop], stop - start
        h_mm = self.h[start:stop].to(spec.matmul_dtype)
        s = self.buffers.logits(h_mm, self.w_mm, self.b_c)  # student logits (k, V)
        log_sm = log_q = teacher = None
        if spec.use_ce:
            log_sm = torch.log_softmax(s, -1, out=pool.take(k))
            self.ce_pos[at] = -log_sm.gather(1, self.y[start:stop].unsqueeze(1)).squeeze(1)
        if spec.use_kl:  # the same log-softmax serves both terms at T = 1
            log_q = log_sm if T == 1.0 and log_sm is not None else torch.log_softmax(
                s.div_(T) if T != 1.0 else s, -1, out=pool.take(k))
        pool.release(s)
        if spec.use_kl:
            teacher = self.teacher.chunk(slice(start, stop), log_q, self.buffers, spec, self.want_grads)
            self.kl_pos[at] = teacher.kl * (T * T)
        if self.want_grads:
            self.backprop(start, stop, h_mm, self.logit_grad(start, stop, log_q, log_sm, teacher))
        self.buffers.reset()

    def logit_grad(self, start: int, stop: int, log_q: Tensor | None, log_sm: Tensor | None,
                   teacher: _DenseChunk | _SparseChunk | None) -> Tensor:
        """Gradient of ``total`` w.r.t. the chunk's student logits, rows scaled by their coefficients:
        ``c_kl * (softmax(s/T) * mass - p~) + c_ce * (softmax(s) - onehot(y))``, in a pooled buffer."""
        c_ce = None if self.coef_ce is None else self.coef_ce[start:stop, None]
        if teacher is None:
            g = log_sm.exp_().mul_(c_ce)
        else:
            g = teacher.student_grad(log_q, log_sm, self.coef_kl[start:stop, None], c_ce)
        if c_ce is not None:
            g.scatter_add_(1, self.y[start:stop].unsqueeze(1), -c_ce)
        return g

    def backprop(self, start: int, stop: int, h_mm: Tensor, g: Tensor) -> None:
        """The chunk's logit gradient through the lm_head, into the gradients of the hidden
        states' rows, the head weight and its bias."""
        low = self.buffers.low
        g_mm = g if low is None else low.take(stop - start).copy_(g)
        if self.grad_h is not None:
            if low is None:
                torch.mm(g_mm, self.w_mm, out=self.grad_h[start:stop])
            else:
                self.grad_h[start:stop] = g_mm @ self.w_mm
        if self.grad_w is not None:
            if low is None:
                self.grad_w.addmm_(g_mm.t(), h_mm)
            else:  # low-precision product of the chunk, summed over chunks in the compute dtype
                low_part, part = self.grad_w_parts
                self.grad_w += part.copy_(torch.mm(g_mm.t(), h_mm, out=low_part))
        if self.grad_b is not None:
            self.grad_b += g.sum(dim=0)

    def results(self) -> tuple[Tensor, Tensor, dict[str, Tensor | None] | None]:
        batch, seq, dim = self.shape
        kl = _reduce(self.kl_pos.view(batch, seq), self.valid_kl, self.spec.reduction)
        ce = _reduce(self.ce_pos.view(batch, seq), self.valid_ce, self.spec.reduction)
        if not self.want_grads:
            return kl, ce, None
        hidden = self.grad_h
        if hidden is not None and self.rows.index is not None:
            hidden = torch.zeros(self.rows.n, dim, dtype=hidden.dtype, device=hidden.device)
            hidden.index_copy_(0, self.rows.index, self.grad_h)
        return kl, ce, {"weight": self.grad_w, "bias": self.grad_b,
                        "hidden": None if hidden is None else hidden.view(batch, seq, dim)}


def _coefficients(spec: ChunkSpec, rows: _Rows, m: int, valid_kl: Tensor | None,
                  valid_ce: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Each of the ``m`` rows' factor in the gradient of the CE and of the KL term: the weight
    times the reduction's factor (times T for the KL), 0 where the term does not count; None when off."""
    cdt, n = spec.compute_dtype, rows.n
    coef_ce = coef_kl = None
    if spec.use_ce:
        coef_ce = rows.take(valid_ce.reshape(n)).to(cdt) * (spec.ce_weight * _row_scale(valid_ce, n, spec.reduction))
    if spec.use_kl:
        s = spec.kl_weight * spec.temperature * _row_scale(valid_kl, n, spec.reduction)
        coef_kl = (torch.full((m,), s, dtype=cdt, device=valid_ce.device) if valid_kl is None
                   else rows.take(valid_kl.reshape(n)).to(cdt) * s)
    return coef_ce, coef_kl


def _plus_ce(g: Tensor, log_sm: Tensor | None, c_ce: Tensor | None) -> Tensor:
    """``g += c_ce * softmax(s)`` when the CE term is on (the rest of its gradient is ``-c_ce`` at the labels)."""
    if log_sm is not None:
        g.addcmul_(log_sm.exp_(), c_ce)
    return g


# --------------------------------------------------------------------------- the two teacher sides


@dataclass
class DenseTeacher:
    """A live teacher: its last hidden states and lm_head. A chunk's log-probabilities come from
    them as the student's do, in the same pooled buffers."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None

    @property
    def dtype_inputs(self) -> list[Tensor]:
        """The tensors whose dtype the compute dtype follows."""
        return [t for t in (self.hidden, self.weight, self.bias) if t is not None]

    def rows(self, rows: _Rows, spec: ChunkSpec) -> DenseTeacher:
        """The counted rows, with the head in the matmul dtype and the bias in the compute dtype (once per call)."""
        return DenseTeacher(rows.flat(self.hidden), self.weight.to(spec.matmul_dtype),
                             None if self.bias is None else self.bias.to(spec.compute_dtype))

    def chunk(self, at: slice, log_q: Tensor, buffers: _Buffers, spec: ChunkSpec, want_grad: bool) -> _DenseChunk:
        """The chunk's KL from the student's log-softmax at T, ``log_q``."""
        t = buffers.logits(self.hidden[at].to(spec.matmul_dtype), self.weight, self.bias)  # teacher logits
        if spec.temperature != 1.0:
            t.div_(spec.temperature)
        log_p = torch.log_softmax(t, -1, out=buffers.pool.take(t.shape[0]))
        p = torch.exp(log_p, out=t)
        # sum_v p (log p - log q), with 0 * log 0 = 0: where p == 0 (teacher logit -inf),
        # log p is clamped to a finite value, so the product is 0, not NaN.
        kl = log_p.clamp_(min=torch.finfo(spec.compute_dtype).min).sub_(log_q).mul_(p).sum(-1)
        buffers.pool.release(log_p)
        return _DenseChunk(kl, p)


@dataclass
class _DenseChunk:
    """One chunk's KL (before ``* T**2``) against a live teacher, and the teacher's probabilities."""

    kl: Tensor
    p: Tensor
    """``(k, V)`` teacher probabilities at T."""

    def student_grad(self, log_q: Tensor, log_sm: Tensor | None, c_kl: Tensor, c_ce: Tensor | None) -> Tensor:
        """``c_kl * (softmax(s/T) - p) + c_ce * softmax(s)``, in ``log_q``'s buffer."""
        if log_q is log_sm:  # T == 1: (c_kl + c_ce) softmax(s) - c_kl p
            return log_sm.exp_().mul_(c_kl + c_ce).addcmul_(self.p, c_kl, value=-1)
        return _plus_ce(log_q.exp_().sub_(self.p).mul_(c_kl), log_sm, c_ce)


@dataclass
class SparseTeacher:
    """Stored teacher targets: a teacher cache's top-k logits, with the tail as a bucket or samples."""

    targets: SparseTargets

    @property
    def dtype_inputs(self) -> list[Tensor]:
        """The tensors whose dtype the compute dtype follows."""
        return [self.targets.values]

    def rows(self, rows: _Rows, spec: ChunkSpec) -> SparseTeacher:
        return SparseTeacher(self.targets.map(rows.flat))

    def chunk(self, at: slice, log_q: Tensor, buffers: _Buffers, spec: ChunkSpec, want_grad: bool) -> _SparseChunk:
        """The chunk's sparse KL (:func:`lmdistill.loss.sparse.sparse_kl_terms`) from the student's
        log-softmax at T, ``log_q``, with what its gradient needs."""
        t = self.targets.map(lambda x: x[at])
        pool = buffers.pool
        bucket = t.tail_indices is None and t.indices.shape[1] < log_q.shape[1]
        terms = sparse_kl_terms(log_q, None, t.values, t.indices, t.lse, spec.temperature, t.tail_indices,
                                t.tail_values, scratch=pool.take(log_q.shape[0]) if bucket else None)
        tail_weights = None
        if terms.rest is not None:
            if want_grad:  # q_j / q_tail on tail ids; exp(-inf) = 0 on kept ids
                finite = torch.where(torch.isfinite(terms.log_q_tail), terms.log_q_tail, 0.0)
                tail_weights = terms.rest.sub_(finite.unsqueeze(1)).exp_()
            else:
                pool.release(terms.rest)
        tail_ids = None if t.tail_indices is None else t.tail_indices.long()
        return _SparseChunk(terms, t.indices.long(), tail_ids, tail_weights)


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

    def student_grad(self, log_q: Tensor, log_sm: Tensor | None, c_kl: Tensor, c_ce: Tensor | None) -> Tensor:
        """``c_kl * (softmax(s/T) * mass - p~) + c_ce * softmax(s)``, in ``log_q``'s buffer; ``mass`` is
        the teacher mass the stored targets account for, ``sum p_i + p_tail``."""
        q_scale = c_kl * (self.terms.p.sum(dim=1) + self.terms.p_tail).unsqueeze(1)
        if log_q is log_sm:  # T == 1: the CE term shares the softmax
            g = log_sm.exp_().mul_(q_scale + c_ce)
        else:
            g = _plus_ce(log_q.exp_().mul_(q_scale), log_sm, c_ce)
        self._subtract_teacher(g, c_kl)
        return g

    def _subtract_teacher(self, g: Tensor, c_kl: Tensor) -> None:
        """``g -= c_kl * p~``: ``p_i`` on kept ids, the tail mass spread over the tail (by the
        samples, or in proportion to the student's tail for the bucket)."""
        p_tail = self.terms.p_tail
        g.scatter_add_(1, self.ids, self.terms.p * -c_kl)
        if self.tail_ids is not None:
            share = (p_tail / self.tail_ids.shape[1]).unsqueeze(1) * -c_kl
            g.scatter_add_(1, self.tail_ids, share.expand_as(self.tail_ids))
        elif self.tail_weights is not None:
            g.addcmul_(self.tail_weights, p_tail.unsqueeze(1) * c_kl, value=-1)


# --------------------------------------------------------------------------- buffers


class _Buffers:
    """The pooled ``(rows, vocab)`` buffers of one call: ``pool`` in the compute dtype and, when
    the matmul dtype differs, ``low`` in it (else None)."""

    def __init__(self, rows: int, vocab: int, spec: ChunkSpec, device: torch.device) -> None:
        self.pool = _Pool(rows, vocab, spec.compute_dtype, device)
        self.low = _Pool(rows, vocab, spec.matmul_dtype, device) if spec.matmul_dtype != spec.compute_dtype else None

    def logits(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """``x @ w.T + b`` into a pooled ``(k, vocab)`` buffer of the compute dtype."""
        out = self.pool.take(x.shape[0])
        if self.low is None:
            _mm_head(x, w, out)
        else:
            tmp = _mm_head(x, w, self.low.take(x.shape[0]))
            out.copy_(tmp)
            self.low.release(tmp)
        if b is not None:
            out += b
        return out

    def reset(self) -> None:
        self.pool.reset()
        if self.low is not None:
            self.low.reset()


# Vocabulary columns per float32 product on a CPU. Written a block at a time, ``x @ w.T`` into
# a (rows, vocab) buffer runs 8-20% faster than in one product (measured at 256 rows for the
# GPT-2 and SmolLM2 heads on 2 cores: 160-179 -> 190-194 GFLOP/s), and it is the same sums in
# the same order, written in place. bf16 products ran 3-4% slower so; they and GPUs take one.
CPU_VOCAB_BLOCK = 2048


def _mm_head(x: Tensor, w: Tensor, out: Tensor) -> Tensor:
    """``x @ w.T`` into ``out`` (``(rows, vocab)``, contiguous)."""
    if out.device.type != "cpu" or out.dtype != torch.float32:
        return torch.mm(x, w.t(), out=out)
    for start in range(0, w.shape[0], CPU_VOCAB_BLOCK):
        stop = start + CPU_VOCAB_BLOCK
        torch.mm(x, w[start:stop].t(), out=out[:, start:stop])
    return out


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

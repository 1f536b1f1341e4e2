"""lmdistill.loss.fused against the unchunked path: logits = hidden @ W.T (+ b), then
lmdistill.loss.terms.kl_divergence / causal_lm_loss, values and gradients, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lmdistill.loss.fused import chunked_logit_losses
from lmdistill.loss.terms import LossOutput, causal_lm_loss, kl_divergence

B, S, D, DT, V = 2, 7, 16, 12, 50  # 14 positions; teacher narrower than the student

WEIGHTS = {"kl": (1.5, 0.0), "ce": (0.0, 0.7), "both": (1.5, 0.7)}


def make(dtype=torch.float64, bias=False, teacher_bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = {
        "hs": rnd(B, S, D).requires_grad_(),
        "w": rnd(V, D, scale=0.5).requires_grad_(),
        "b": rnd(V, scale=0.5).requires_grad_() if bias else None,
        "ht": rnd(B, S, DT),
        "wt": rnd(V, DT, scale=0.5),
        "bt": rnd(V, scale=0.5) if teacher_bias else None,
    }
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 1] = labels[1, 5] = -100
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 0] = False
    return x, labels, mask


def student_params(x):
    return [t for t in (x["hs"], x["w"], x["b"]) if t is not None]


def reference(x, labels, mask, kw, cw, temperature, reduction):
    """Unchunked: full logits, then the losses of lmdistill.loss.terms; returns (total, terms)."""
    s = x["hs"] @ x["w"].T
    if x["b"] is not None:
        s = s + x["b"]
    terms = {}
    if kw > 0:
        t = x["ht"] @ x["wt"].T
        if x["bt"] is not None:
            t = t + x["bt"]
        terms["kl"] = kl_divergence(s, t, mask, temperature, reduction)
    if cw > 0:
        terms["ce"] = causal_lm_loss(s, labels, mask, reduction)
    total = sum(w * terms[k] for k, w in (("kl", kw), ("ce", cw)) if k in terms)
    return total, terms


def chunked(x, labels, mask, kw, cw, temperature, reduction, chunk, **kw_args):
    return chunked_logit_losses(
        x["hs"], x["w"], x["ht"], x["wt"], labels, kl_weight=kw, ce_weight=cw,
        temperature=temperature, mask=mask, reduction=reduction, student_head_bias=x["b"],
        teacher_head_bias=x["bt"], chunk_tokens=chunk, **kw_args,
    )


def grads(total, params, scale=0.37):
    # scale != 1: backward must multiply the stored gradients by grad_output.
    return torch.autograd.grad(total * scale, params)


# float64 against float64: sums of <= 50 vocab terms and 14 positions err by ~1e-14 relative;
# 1e-10 leaves 10^4 of room, and a wrong chunk boundary or a dropped position is off by ~1/14.
F64 = dict(rtol=1e-10, atol=1e-12)


def assert_matches(x, labels, mask, kw, cw, temperature, reduction, chunk, rtol=F64["rtol"], atol=F64["atol"],
                   ref_x=None):
    out = chunked(x, labels, mask, kw, cw, temperature, reduction, chunk)
    ref_x = ref_x or x
    ref_total, ref_terms = reference(ref_x, labels, mask, kw, cw, temperature, reduction)
    assert isinstance(out, LossOutput)
    assert set(out.terms) == set(ref_terms)
    for k in ref_terms:
        torch.testing.assert_close(out.terms[k].double(), ref_terms[k].double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(out.total.double(), ref_total.double(), rtol=rtol, atol=atol)
    got = grads(out.total, student_params(x))
    want = grads(ref_total, student_params(ref_x))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)
    return out


# --------------------------------------------------------------------------- float64 agreement


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("which", list(WEIGHTS))
def test_matches_unchunked_float64(reduction, temperature, which):
    x, labels, mask = make()
    kw, cw = WEIGHTS[which]
    out = assert_matches(x, labels, mask, kw, cw, temperature, reduction, chunk=5)
    assert out.total.dtype == torch.float64


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 13, 14, 1000])
@pytest.mark.parametrize("use_mask", [True, False])
def test_chunk_sizes(chunk, use_mask):
    # 14 positions (11 counted with the mask): chunks that do not divide them, 1, and > all.
    x, labels, mask = make(bias=True, teacher_bias=True)
    assert_matches(x, labels, mask if use_mask else None, 1.5, 0.7, 2.0, "mean", chunk)


@pytest.mark.parametrize("block", [1, 16, 49, 50])
def test_head_products_in_vocabulary_blocks(block, monkeypatch):
    # On a CPU, float32 logits are written a block of vocabulary columns at a time (2,048 by
    # default, more than this vocabulary of 50): blocks that do not divide it, a single column, V.
    from lmdistill.loss import chunks

    monkeypatch.setattr(chunks, "CPU_VOCAB_BLOCK", block)
    x64, labels, mask = make(bias=True, teacher_bias=True, seed=2)
    x32 = {k: None if v is None else v.detach().float().requires_grad_(v.requires_grad) for k, v in x64.items()}
    out = chunked(x32, labels, mask, 1.5, 0.7, 2.0, "mean", 4)
    ref_total, ref_terms = reference(x64, labels, mask, 1.5, 0.7, 2.0, "mean")
    # float32 against the float64 reference, with the bounds of test_float32_close_to_float64
    for k in ref_terms:
        torch.testing.assert_close(out.terms[k].double(), ref_terms[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(out.total, student_params(x32)), grads(ref_total, student_params(x64))):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    h, w = torch.randn(14, D), torch.randn(V, D)
    out = torch.full((14, V), float("nan"))  # every column must be written
    # float32, sums of 16 products: a kernel may order them differently for a narrower block
    torch.testing.assert_close(chunks._mm_head(h, w, out), h @ w.T, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bias_gradients(reduction):
    x, labels, mask = make(bias=True, teacher_bias=True, seed=3)
    assert_matches(x, labels, mask, 1.5, 0.7, 4.0, reduction, chunk=3)


def test_mask_as_int_and_no_ignored_labels():
    x, labels, mask = make(seed=1)
    labels = labels.clamp(min=0)
    assert_matches(x, labels, mask.long(), 1.0, 1.0, 2.0, "mean", chunk=4)


def test_non_contiguous_shifted_hidden():
    # The caller's hidden states are often hidden[:, :-1] (a non-contiguous view).
    x, labels, mask = make(seed=2)
    full = torch.randn(B, S + 1, D, dtype=torch.float64, requires_grad=True)
    x["hs"] = full[:, :-1]
    out = chunked(x, labels, mask, 1.5, 0.7, 2.0, "sum", 4)
    ref_total, _ = reference(x, labels, mask, 1.5, 0.7, 2.0, "sum")
    (g,) = torch.autograd.grad(out.total, [full])
    (g_ref,) = torch.autograd.grad(ref_total, [full])
    torch.testing.assert_close(g, g_ref, **F64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("which", list(WEIGHTS))
def test_all_masked_is_zero_with_working_backward(reduction, which):
    x, labels, _ = make(bias=True)
    mask = torch.zeros(B, S, dtype=torch.bool)
    kw, cw = WEIGHTS[which]
    out = chunked(x, labels, mask, kw, cw, 2.0, reduction, 4)
    # Nothing is counted: sums of zero weights are exactly 0, on any CPU.
    assert out.total.item() == 0.0 and all(v.item() == 0.0 for v in out.terms.values())
    out.total.backward()
    for p in student_params(x):
        assert p.grad is not None and torch.all(p.grad == 0)


def test_all_labels_ignored_ce_only():
    x, labels, _ = make()
    labels = torch.full_like(labels, -100)
    out = chunked(x, labels, None, 0.0, 1.0, 2.0, "mean", 4)
    assert out.total.item() == 0.0
    out.total.backward()
    assert torch.all(x["hs"].grad == 0) and torch.all(x["w"].grad == 0)


def test_teacher_ruling_out_tokens():
    # -inf teacher logits (p_t = 0): 0 * log 0 counts as 0, as in kl_divergence.
    x, labels, mask = make(teacher_bias=True)
    x["bt"][::3] = float("-inf")
    out = assert_matches(x, labels, mask, 1.0, 0.5, 2.0, "mean", chunk=5)
    assert torch.isfinite(out.total)


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("which", list(WEIGHTS))
def test_float32_close_to_float64(which):
    x64, labels, mask = make(bias=True, teacher_bias=True)
    x32 = {k: None if v is None else v.detach().float().requires_grad_(v.requires_grad)
           for k, v in x64.items()}
    kw, cw = WEIGHTS[which]
    out = chunked(x32, labels, mask, kw, cw, 2.0, "mean", 4)
    assert out.total.dtype == torch.float32
    ref_total, ref_terms = reference(x64, labels, mask, kw, cw, 2.0, "mean")
    # float32 (u = 6e-8): logits of 16-wide dot products, log-softmax over 50, sums over 11
    # positions: ~1e-7 relative on the terms (measured: 1% of this bound) whatever the summation order.
    for k in ref_terms:
        torch.testing.assert_close(out.terms[k].double(), ref_terms[k], rtol=1e-5, atol=1e-6)
    got = grads(out.total, student_params(x32))
    for a, b in zip(got, grads(ref_total, student_params(x64))):
        assert a.dtype == torch.float32
        # Gradient entries are differences of probabilities (cancellation): 1e-4 relative, and
        # 1e-6 absolute for entries near 0 (measured: under 1% of this bound).
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16])
def test_bfloat16_inputs(matmul_dtype):
    # bf16 hidden/weights (teacher too): chunks compute in float32, grads come back in bf16.
    x64, labels, mask = make(bias=True)
    xb = {k: None if v is None else v.detach().bfloat16().requires_grad_(v.requires_grad)
          for k, v in x64.items()}
    # Reference on the bf16-rounded values, in float64.
    xr = {k: None if v is None else v.detach().double().requires_grad_(v.requires_grad)
          for k, v in xb.items()}
    out = chunked(xb, labels, mask, 1.5, 0.7, 2.0, "mean", 4, matmul_dtype=matmul_dtype)
    assert out.total.dtype == torch.float32
    ref_total, ref_terms = reference(xr, labels, mask, 1.5, 0.7, 2.0, "mean")
    # float32 matmuls on bf16-exact inputs: float32 rounding only (as above). bf16 matmuls round
    # each logit to 8 bits (2^-9 relative, ~1e-2 absolute at |logit| ~5): 2e-2 (measured: 2% of it).
    tol = dict(rtol=1e-5, atol=1e-5) if matmul_dtype is None else dict(rtol=2e-2, atol=2e-2)
    for k in ref_terms:
        torch.testing.assert_close(out.terms[k].double(), ref_terms[k], **tol)
    got = grads(out.total, student_params(xb))
    want = grads(ref_total, student_params(xr))
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        # bf16 has 8 bits of mantissa: compare relative to each gradient's scale. The gradient is
        # rounded to bf16 (2^-9) after probabilities from bf16 logits (~1% off at worst, above);
        # measured <= 0.6% of the scale with either matmul dtype, on every kernel tried.
        scale = b.abs().max().item()
        assert (a.double() - b).abs().max().item() <= 2e-2 * scale


def test_float32_student_bf16_teacher():
    x64, labels, mask = make()
    x = {"hs": x64["hs"].detach().float().requires_grad_(), "w": x64["w"].detach().float().requires_grad_(),
         "b": None, "ht": x64["ht"].bfloat16(), "wt": x64["wt"].bfloat16(), "bt": None}
    xr = dict(x64, ht=x["ht"].double(), wt=x["wt"].double())
    out = chunked(x, labels, mask, 1.0, 1.0, 2.0, "sum", 3)
    ref_total, _ = reference(xr, labels, mask, 1.0, 1.0, 2.0, "sum")
    # float32 arithmetic on bf16-exact teacher values: float32 rounding only (measured: 1% of the bound).
    torch.testing.assert_close(out.total.double(), ref_total, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- autograd behaviour


def test_teacher_gets_no_gradient():
    x, labels, mask = make(teacher_bias=True)
    for k in ("ht", "wt", "bt"):
        x[k].requires_grad_()
    out = chunked(x, labels, mask, 1.0, 1.0, 2.0, "mean", 4)
    out.total.backward()
    assert x["ht"].grad is None and x["wt"].grad is None and x["bt"].grad is None
    assert x["hs"].grad is not None and x["w"].grad is not None


def test_tied_embedding_weight():
    # The head weight is the input embedding, used again to build the hidden states.
    g = torch.Generator().manual_seed(5)
    emb = torch.nn.Embedding(V, D, dtype=torch.float64)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(V, D, generator=g, dtype=torch.float64))
    body = torch.nn.Linear(D, D, dtype=torch.float64)
    ids = torch.randint(0, V, (B, S), generator=g)
    _, labels, mask = make()
    ht, wt = torch.randn(B, S, DT, dtype=torch.float64), torch.randn(V, DT, dtype=torch.float64)
    params = [emb.weight, *body.parameters()]

    def run(use_chunked):
        hidden = torch.tanh(body(emb(ids)))
        if use_chunked:
            total = chunked_logit_losses(hidden, emb.weight, ht, wt, labels, kl_weight=1.5, ce_weight=0.7,
                                         mask=mask, reduction="sum", chunk_tokens=3).total
        else:
            s = hidden @ emb.weight.T
            total = 1.5 * kl_divergence(s, ht @ wt.T, mask, 2.0, "sum") + 0.7 * causal_lm_loss(
                s, labels, mask, "sum")
        return total, torch.autograd.grad(total / 10, params)

    total_c, g_c = run(True)
    total_r, g_r = run(False)
    torch.testing.assert_close(total_c, total_r, **F64)
    for a, b in zip(g_c, g_r):
        torch.testing.assert_close(a, b, **F64)
    # .backward() accumulates into the shared parameter from both uses.
    hidden = torch.tanh(body(emb(ids)))
    chunked_logit_losses(hidden, emb.weight, ht, wt, labels, kl_weight=1.5, ce_weight=0.7, mask=mask,
                         reduction="sum", chunk_tokens=3).total.div(10).backward()
    torch.testing.assert_close(emb.weight.grad, g_c[0], **F64)


def test_terms_are_detached_and_reweighting_them_fails_loudly():
    x, labels, mask = make()
    out = chunked(x, labels, mask, 1.0, 1.0, 2.0, "mean", 4)
    assert out.total.requires_grad
    assert not out.terms["kl"].requires_grad and not out.terms["ce"].requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        (2.0 * out.terms["kl"] + out.terms["ce"]).backward()


def test_second_backward_raises_instead_of_wrong_gradients():
    # Stored gradients are scaled in place and released by the first backward.
    x, labels, mask = make()
    out = chunked(x, labels, mask, 1.0, 1.0, 2.0, "mean", 4)
    torch.autograd.grad(out.total * 3, [x["hs"], x["w"]], retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        torch.autograd.grad(out.total * 3, [x["hs"], x["w"]])


def test_only_weight_requires_grad():
    x, labels, mask = make()
    x["hs"] = x["hs"].detach()
    out = chunked(x, labels, mask, 1.0, 1.0, 2.0, "mean", 4)
    (gw,) = torch.autograd.grad(out.total, [x["w"]])
    ref_total, _ = reference(x, labels, mask, 1.0, 1.0, 2.0, "mean")
    (gw_ref,) = torch.autograd.grad(ref_total, [x["w"]])
    torch.testing.assert_close(gw, gw_ref, **F64)


def test_no_grad_gives_values_only():
    x, labels, mask = make()
    with_grad = chunked(x, labels, mask, 1.0, 1.0, 2.0, "mean", 4)
    with torch.no_grad():
        out = chunked(x, labels, mask, 1.0, 1.0, 2.0, "mean", 4)
    assert out.total.grad_fn is None and not out.total.requires_grad
    # The same float64 forward with or without autograd: equal to the last bits (measured: exactly).
    torch.testing.assert_close(out.total, with_grad.total.detach(), rtol=1e-12, atol=0)


def test_kl_off_needs_no_teacher():
    x, labels, mask = make()
    out = chunked_logit_losses(x["hs"], x["w"], None, None, labels, kl_weight=0, ce_weight=1.0, mask=mask)
    assert set(out.terms) == {"ce"}
    # float64: assert_close's float64 defaults (1e-7) are far above the rounding (~1e-14).
    torch.testing.assert_close(out.total, causal_lm_loss(x["hs"] @ x["w"].T, labels, mask, "sum"))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(kl_weight=0.0, ce_weight=0.0), "both 0"),
        (dict(kl_weight=-1.0), "kl_weight"),
        (dict(ce_weight=float("nan")), "ce_weight"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(reduction="none"), "reduction"),
        (dict(temperature=0.0), "temperature"),
        (dict(mask=torch.ones(B, S + 1, dtype=torch.bool)), "mask"),
        (dict(teacher_hidden=None), "teacher_hidden"),
        (dict(teacher_head_weight=torch.zeros(V + 1, DT, dtype=torch.float64)), "vocab"),
        (dict(student_head_weight=torch.zeros(V, D + 1, dtype=torch.float64)), "student_head_weight"),
        (dict(student_head_bias=torch.zeros(V + 1, dtype=torch.float64)), "student_head_bias"),
        (dict(labels=torch.zeros(B, S - 1, dtype=torch.long)), "labels"),
    ],
)
def test_rejects_bad_arguments(change, match):
    x, labels, mask = make()
    args = dict(student_hidden=x["hs"], student_head_weight=x["w"], teacher_hidden=x["ht"],
                teacher_head_weight=x["wt"], labels=labels, kl_weight=1.0, ce_weight=1.0, mask=mask)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        chunked_logit_losses(**args)


# --------------------------------------------------------------------------- memory structure


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_never_builds_batch_seq_vocab_tensor():
    b, s, d, v = 4, 10, 16, 50  # 40 positions x 50 = 2000 > any weight (800) or hidden (640)
    g = torch.Generator().manual_seed(7)
    hs = torch.randn(b, s, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    ht, wt = torch.randn(b, s, d, generator=g), torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (b, s), generator=g)
    with _LargestTensor() as probe:
        chunked_logit_losses(hs, w, ht, wt, labels, kl_weight=1.0, ce_weight=1.0,
                             chunk_tokens=4).total.backward()
    assert probe.numel <= d * v < b * s * v
    with _LargestTensor() as probe:  # the detector does see the unchunked path's logits
        logits = hs @ w.T
        (kl_divergence(logits, ht @ wt.T) + causal_lm_loss(logits, labels)).backward()
    assert probe.numel >= b * s * v

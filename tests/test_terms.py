"""lmdistill.loss.terms against plain float64 references written with explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmdistill.config import ConfigError, LossConfig
from lmdistill.loss import divergences, terms
from lmdistill.loss.divergences import DivergenceSpec
from lmdistill.loss.terms import (
    LossOutput,
    causal_lm_loss,
    cosine_loss,
    kl_divergence,
    mse_loss,
)
from lmdistill.loss.weighted import distillation_loss

B, S, V, D = 3, 6, 17, 8


# --------------------------------------------------------------------------- references
# Per-position values computed one position at a time in float64 numpy, then averaged
# or summed over counted positions by hand.


def _positions(mask, b, s):
    m = np.ones((b, s), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    return [(i, j) for i in range(b) for j in range(s) if m[i, j]]


def _np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _reduce_ref(values, reduction):
    if reduction == "sum":
        return float(sum(values))
    return float(sum(values) / len(values)) if values else 0.0


def ref_kl(s, t, mask=None, T=1.0, reduction="mean"):
    s, t = s.detach().double().numpy(), t.detach().double().numpy()
    vals = []
    for i, j in _positions(mask, *s.shape[:2]):
        p_t, p_s = _np_softmax(t[i, j] / T), _np_softmax(s[i, j] / T)
        kl = sum(p_t[v] * (math.log(p_t[v]) - math.log(p_s[v])) for v in range(len(p_t)))
        vals.append(kl * T**2)
    return _reduce_ref(vals, reduction)


def ref_ce(s, labels, mask=None, reduction="mean", ignore_index=-100):
    s, y = s.detach().double().numpy(), labels.numpy()
    vals = []
    for i, j in _positions(mask, *s.shape[:2]):
        if y[i, j] == ignore_index:
            continue
        vals.append(-math.log(_np_softmax(s[i, j])[y[i, j]]))
    return _reduce_ref(vals, reduction)


def ref_cos(s, t, mask=None, reduction="mean"):
    s, t = s.detach().double().numpy(), t.detach().double().numpy()
    vals = []
    for i, j in _positions(mask, *s.shape[:2]):
        a, b = s[i, j], t[i, j]
        vals.append(1.0 - float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b))))
    return _reduce_ref(vals, reduction)


def ref_mse(s, t, mask=None, reduction="mean"):
    s, t = s.detach().double().numpy(), t.detach().double().numpy()
    vals = [float(((s[i, j] - t[i, j]) ** 2).mean()) for i, j in _positions(mask, *s.shape[:2])]
    return _reduce_ref(vals, reduction)


# Differentiable float64 torch references (for gradient checks), same maths as above.


def tref_kl(s, t, mask, T):
    p_t = torch.softmax(t.detach() / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1) * T**2
    m = mask.double()
    return (kl * m).sum() / m.sum()


def tref_ce(s, labels, mask):
    logp = torch.log_softmax(s, -1)
    m = mask & (labels != -100)
    rows = [-logp[i, j, labels[i, j]] for i, j in m.nonzero().tolist()]
    return torch.stack(rows).sum() / len(rows)


def tref_cos(s, t, mask):
    t = t.detach()
    c = 1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    return (c * mask.double()).sum() / mask.double().sum()


def tref_mse(s, t, mask):
    v = ((s - t.detach()) ** 2).mean(-1)
    return (v * mask.double()).sum() / mask.double().sum()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def _logits(gen, b=B, s=S, v=V, scale=2.0):
    return torch.randn(b, s, v, generator=gen) * scale


def _hidden(gen, b=B, s=S, d=D):
    return torch.randn(b, s, d, generator=gen)


def _mask(gen, b=B, s=S):
    """Random mask with one whole row masked out and at least one counted position."""
    m = torch.rand(b, s, generator=gen) > 0.3
    m[0, 0] = True
    m[1] = False
    return m


def _labels(gen, b=B, s=S, v=V):
    y = torch.randint(0, v, (b, s), generator=gen)
    y[0, 1] = -100
    y[2, -1] = -100
    return y


def _close(actual: torch.Tensor, expected: float, rtol=1e-5, atol=1e-6):
    """A float32 loss against its float64 reference: log-softmax over 17, sums over <= 18
    positions or 8 dims give ~1e-7 relative error on any kernel (measured: <= 4% of this bound);
    a dropped position or term is off by several percent."""
    assert actual.dim() == 0
    assert math.isfinite(actual.item())
    assert actual.item() == pytest.approx(expected, rel=rtol, abs=atol)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------- kl_divergence


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kl_matches_reference(gen, T, use_mask, reduction):
    s, t = _logits(gen), _logits(gen)
    mask = _mask(gen) if use_mask else None
    out = kl_divergence(s, t, mask, temperature=T, reduction=reduction)
    assert out.dtype == torch.float32
    _close(out, ref_kl(s, t, None if mask is None else mask.numpy(), T, reduction))


def test_kl_zero_when_student_equals_teacher(gen):
    s = _logits(gen)
    for T in (0.5, 2.0):
        # Equal inputs give equal log-softmaxes bit for bit, so the KL is exactly 0.
        assert kl_divergence(s, s.clone(), temperature=T).item() == 0.0
    # and strictly positive otherwise
    assert kl_divergence(s, _logits(gen), temperature=2.0).item() > 1e-3


def test_kl_integer_mask_equals_bool_mask(gen):
    s, t, m = _logits(gen), _logits(gen), _mask(gen)
    a = kl_divergence(s, t, m, temperature=2.0)
    b = kl_divergence(s, t, m.long(), temperature=2.0)
    c = kl_divergence(s, t, m.float(), temperature=2.0)
    assert a.item() == b.item() == c.item()  # every mask becomes the same bool mask: the same ops


def test_kl_teacher_gets_no_grad(gen):
    s = _logits(gen).requires_grad_()
    t = _logits(gen).requires_grad_()
    kl_divergence(s, t, temperature=2.0).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kl_handles_teacher_minus_inf(gen):
    # Tokens the teacher rules out (e.g. padded vocab) must give 0 * log 0 = 0, not NaN.
    s = _logits(gen).requires_grad_()
    t = _logits(gen)
    t[..., -2:] = float("-inf")
    out = kl_divergence(s, t, temperature=2.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    # Reference: the same KL restricted to the teacher's support.
    p_t = torch.softmax(t.double() / 2, -1)[..., :-2]
    log_p_s = torch.log_softmax(s.detach().double() / 2, -1)[..., :-2]
    ref = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4
    _close(out, ref.item())


# --------------------------------------------------------------------------- causal_lm_loss


def test_ce_equals_torch_cross_entropy(gen):
    s = _logits(gen)
    y = torch.randint(0, V, (B, S), generator=gen)
    expected = F.cross_entropy(s.reshape(-1, V), y.reshape(-1))
    # Two float32 implementations of a mean over 18 positions of a log-softmax over 17: they
    # may round differently, by ~1e-7 relative (measured: <= 8% of this bound).
    assert torch.allclose(causal_lm_loss(s, y), expected, rtol=1e-6, atol=1e-6)
    y[0, :3] = -100
    expected = F.cross_entropy(s.reshape(-1, V), y.reshape(-1), ignore_index=-100)
    assert torch.allclose(causal_lm_loss(s, y), expected, rtol=1e-6, atol=1e-6)
    # a custom ignore_index
    y2 = y.masked_fill(y == -100, 5)
    y2[1, 2] = 5
    expected = F.cross_entropy(s.reshape(-1, V), y2.reshape(-1), ignore_index=5)
    assert torch.allclose(causal_lm_loss(s, y2, ignore_index=5), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_matches_reference(gen, use_mask, reduction):
    s, y = _logits(gen), _labels(gen)
    mask = _mask(gen) if use_mask else None
    out = causal_lm_loss(s, y, mask, reduction=reduction)
    _close(out, ref_ce(s, y, None if mask is None else mask.numpy(), reduction))


def test_ce_masked_positions_may_hold_any_label(gen):
    # Padding ids outside the vocab at masked positions must not reach the gather.
    s, y, m = _logits(gen), _labels(gen), _mask(gen)
    y_bad = y.masked_fill(~m & (y != -100), 10**6)
    # Exactly equal: the masked labels are replaced before the gather, the rest is the same ops.
    assert causal_lm_loss(s, y_bad, m).item() == causal_lm_loss(s, y, m).item()


# --------------------------------------------------------------------------- hidden-state losses


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cosine_and_mse_match_reference(gen, use_mask, reduction):
    s, t = _hidden(gen), _hidden(gen)
    mask = _mask(gen) if use_mask else None
    m_np = None if mask is None else mask.numpy()
    _close(cosine_loss(s, t, mask, reduction), ref_cos(s, t, m_np, reduction))
    _close(mse_loss(s, t, mask, reduction), ref_mse(s, t, m_np, reduction))


def test_cosine_known_values():
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    b = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])
    # aligned 0, orthogonal 1, opposite 2 -> mean 1, sum 3 (small integers: exact in float32;
    # approx's default 1e-6 relative)
    assert cosine_loss(a, b).item() == pytest.approx(1.0)
    assert cosine_loss(a, b, reduction="sum").item() == pytest.approx(3.0)
    # mse is a mean over dim: ((1-3)^2 + 0)/2 = 2 at position 0
    assert mse_loss(a[:, :1], b[:, :1]).item() == pytest.approx(2.0)


def test_hidden_teacher_gets_no_grad(gen):
    for fn in (cosine_loss, mse_loss):
        s = _hidden(gen).requires_grad_()
        t = _hidden(gen).requires_grad_()
        fn(s, t).backward()
        assert t.grad is None
        assert s.grad is not None and s.grad.abs().sum() > 0


# --------------------------------------------------------------------------- shared behaviour


def _all_losses(gen):
    s, t, y = _logits(gen), _logits(gen), _labels(gen)
    hs, ht = _hidden(gen), _hidden(gen)
    return [
        ("kl", lambda m, r, s=s: kl_divergence(s, t, m, 2.0, r), s),
        ("ce", lambda m, r, s=s: causal_lm_loss(s, y, m, r), s),
        ("cos", lambda m, r, s=hs: cosine_loss(s, ht, m, r), hs),
        ("mse", lambda m, r, s=hs: mse_loss(s, ht, m, r), hs),
    ]


def test_sum_equals_mean_times_count(gen):
    mask = _mask(gen)
    for name, fn, _ in _all_losses(gen):
        if name == "ce":
            continue  # checked below: ce also drops ignore_index labels
        mean, total = fn(mask, "mean"), fn(mask, "sum")
        # mean = sum / count in float32: a rounding or two (1e-7); a wrong count is off by >= 1/10.
        assert total.item() == pytest.approx(mean.item() * mask.sum().item(), rel=1e-5), name
    s, y = _logits(gen), _labels(gen)
    count = (mask & (y != -100)).sum().item()
    mean, total = causal_lm_loss(s, y, mask), causal_lm_loss(s, y, mask, reduction="sum")
    assert total.item() == pytest.approx(mean.item() * count, rel=1e-5)


def test_masked_positions_do_not_matter(gen):
    mask = _mask(gen)
    for name, fn, x in _all_losses(gen):
        before = fn(mask, "mean").item()
        with torch.no_grad():
            x[~mask] = 1e3  # garbage where the mask is False (x is the student input)
        # Counted positions and their sums are unchanged (measured: equal to the bit); 1e-6
        # allows a reduction that is vectorised differently, and 1e3 garbage would show as O(1).
        assert fn(mask, "mean").item() == pytest.approx(before, rel=1e-6), name


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_masked_gives_zero_and_finite_grad(gen, reduction):
    mask = torch.zeros(B, S, dtype=torch.bool)
    for name, fn, x in _all_losses(gen):
        x.requires_grad_()
        out = fn(mask, reduction)
        assert out.item() == 0.0, name  # nothing counted: exactly 0 on any CPU
        out.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad == 0).all(), name
    # ce with every label ignored and no mask
    s = _logits(gen).requires_grad_()
    out = causal_lm_loss(s, torch.full((B, S), -100))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(s.grad).all()


def test_gradients_match_float64_autograd(gen):
    s32, t32 = _logits(gen), _logits(gen)
    hs32, ht32 = _hidden(gen), _hidden(gen)
    y, mask = _labels(gen), _mask(gen)
    cases = [
        ("kl", s32, lambda x: kl_divergence(x, t32, mask, 2.0),
         lambda x: tref_kl(x, t32.double(), mask, 2.0)),
        ("kl T=0.5", s32, lambda x: kl_divergence(x, t32, mask, 0.5),
         lambda x: tref_kl(x, t32.double(), mask, 0.5)),
        ("ce", s32, lambda x: causal_lm_loss(x, y, mask), lambda x: tref_ce(x, y, mask)),
        ("cos", hs32, lambda x: cosine_loss(x, ht32, mask),
         lambda x: tref_cos(x, ht32.double(), mask)),
        ("mse", hs32, lambda x: mse_loss(x, ht32, mask),
         lambda x: tref_mse(x, ht32.double(), mask)),
    ]
    for name, x, impl, ref in cases:
        a = x.clone().requires_grad_()
        impl(a).backward()
        b = x.double().requires_grad_()
        ref(b).backward()
        assert b.grad.abs().sum() > 0
        # float32 gradients against float64 autograd, as a norm-wise relative error: ~1e-7 from
        # rounding (measured: < 1e-6); a wrong gradient is off by O(1).
        assert _rel_err(a.grad, b.grad) < 1e-5, name
        # masked positions get exactly zero gradient
        assert (a.grad[~mask] == 0).all(), name


def test_float64_stays_float64_and_bf16_is_upcast(gen):
    s, t = _logits(gen), _logits(gen)
    out64 = kl_divergence(s.double(), t.double(), temperature=2.0)
    assert out64.dtype == torch.float64
    assert out64.item() == pytest.approx(ref_kl(s, t, None, 2.0), rel=1e-12)  # float64: rounding ~1e-15
    sb, tb = s.bfloat16(), t.bfloat16()
    outb = kl_divergence(sb, tb, temperature=2.0)
    assert outb.dtype == torch.float32
    # computed in fp32 on the bf16-rounded values, not in bf16
    _close(outb, ref_kl(sb.float(), tb.float(), None, 2.0))
    y = _labels(gen)
    assert causal_lm_loss(sb, y).dtype == torch.float32
    assert cosine_loss(_hidden(gen).bfloat16(), _hidden(gen).bfloat16()).dtype == torch.float32


def test_chunking_gives_same_values_and_grads(gen, monkeypatch):
    s, t, y, m = _logits(gen), _logits(gen), _labels(gen), _mask(gen)
    hs, ht = _hidden(gen), _hidden(gen)

    def run():
        a = s.clone().requires_grad_()
        h = hs.clone().requires_grad_()
        out = (kl_divergence(a, t, m, 2.0) + causal_lm_loss(a, y, m)
               + cosine_loss(h, ht, m) + mse_loss(h, ht, m))
        out.backward()
        return out.detach(), a.grad, h.grad

    whole = run()
    monkeypatch.setattr(terms, "_CHUNK_TOKENS", 4)  # 4 // batch 3 -> 1 position per chunk
    chunked = run()
    # The same per-position float32 values, reduced in another grouping: a few roundings of the
    # sums (~1e-7 relative, measured: 4% of this bound).
    for w, c in zip(whole, chunked):
        assert torch.allclose(w, c, rtol=1e-6, atol=1e-7)


def test_chunks_are_seq_slices_over_the_whole_batch(gen, monkeypatch):
    monkeypatch.setattr(terms, "_CHUNK_TOKENS", 6)  # batch 3 -> 2 positions per chunk
    seen = []
    out = terms._per_position(lambda x: (seen.append(x.shape), x.sum(-1))[1], _logits(gen))
    assert out.shape == (B, S)
    assert seen == [(B, 2, V)] * 3


def test_shifted_non_contiguous_logits(gen):
    # The caller passes logits[:, :-1] and labels[:, 1:]: non-contiguous views must work.
    full = _logits(gen, s=S + 1)
    ids = torch.randint(0, V, (B, S + 1), generator=gen)
    s, y = full[:, :-1], ids[:, 1:]
    assert not s.is_contiguous()
    _close(causal_lm_loss(s, y), ref_ce(s.contiguous(), y.contiguous()))


def test_input_validation(gen):
    s, t = _logits(gen), _logits(gen)
    with pytest.raises(ValueError, match="vocabulary"):
        kl_divergence(s, _logits(gen, v=V + 1))
    with pytest.raises(ValueError, match="reduction"):
        kl_divergence(s, t, reduction="none")
    with pytest.raises(ValueError, match="temperature"):
        kl_divergence(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="mask"):
        kl_divergence(s, t, torch.ones(B, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(s, torch.zeros(B, S + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="width"):
        cosine_loss(_hidden(gen), _hidden(gen, d=D + 1))
    with pytest.raises(ValueError, match="batch, seq"):
        mse_loss(torch.zeros(S, D), torch.zeros(S, D))


# --------------------------------------------------------------------------- LossConfig, the terms' settings


def test_loss_config_defaults_and_active_terms():
    w = LossConfig()
    assert (w.kl, w.ce, w.cos, w.mse, w.temperature) == (5.0, 2.0, 1.0, 0.0, 2.0)
    assert w.active_terms() == ["kl", "ce", "cos"]
    assert LossConfig(kl=0, ce=0, cos=0, mse=1).active_terms() == ["mse"]
    assert LossConfig(kl=1, ce=1, cos=1, mse=1).active_terms() == ["kl", "ce", "cos", "mse"]
    assert (w.needs_hidden, w.needs_layers, w.needs_teacher) == (True, False, True)
    ce_only = LossConfig(kl=0, cos=0)
    assert (ce_only.needs_hidden, ce_only.needs_layers, ce_only.needs_teacher) == (False, False, False)
    aligned = LossConfig(kl=0, ce=0, cos=0, align_mse=1)
    assert (aligned.needs_hidden, aligned.needs_layers, aligned.needs_teacher) == (False, True, True)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"kl": -1.0}, "loss.kl"),
        ({"ce": float("nan")}, "loss.ce"),
        ({"cos": float("inf")}, "loss.cos"),
        ({"mse": "1"}, "loss.mse"),
        ({"align_cos": True}, "loss.align_cos"),
        ({"temperature": 0.0}, "loss.temperature"),
        ({"temperature": -2.0}, "loss.temperature"),
        ({"temperature": float("nan")}, "loss.temperature"),
        ({"kl": 0.0, "ce": 0.0, "cos": 0.0, "mse": 0.0}, "at least one"),
    ],
)
def test_invalid_loss_weights_raise(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LossConfig(**kwargs)


# --------------------------------------------------------------------------- distillation_loss


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_distillation_total_equals_weighted_reference(gen, reduction):
    s, t, y, m = _logits(gen), _logits(gen), _labels(gen), _mask(gen)
    hs, ht = _hidden(gen), _hidden(gen)
    w = LossConfig(kl=5.0, ce=2.0, cos=1.0, mse=0.5, temperature=2.0)
    out = distillation_loss(s, t, y, w, m, hs, ht, reduction=reduction)
    assert isinstance(out, LossOutput)
    mn = m.numpy()
    refs = {
        "kl": ref_kl(s, t, mn, 2.0, reduction),
        "ce": ref_ce(s, y, mn, reduction),
        "cos": ref_cos(hs, ht, mn, reduction),
        "mse": ref_mse(hs, ht, mn, reduction),
    }
    assert list(out.terms) == ["kl", "ce", "cos", "mse"]
    for name, value in refs.items():
        _close(out.terms[name], value)
    _close(out.total, 5.0 * refs["kl"] + 2.0 * refs["ce"] + 1.0 * refs["cos"] + 0.5 * refs["mse"])


def test_distillation_default_recipe_and_backward(gen):
    s = _logits(gen).requires_grad_()
    hs = _hidden(gen).requires_grad_()
    t, ht, y = _logits(gen), _hidden(gen), _labels(gen)
    out = distillation_loss(s, t, y, LossConfig(), student_hidden=hs, teacher_hidden=ht)
    assert set(out.terms) == {"kl", "ce", "cos"}  # mse weight 0 in the recipe
    expected = 5 * out.terms["kl"] + 2 * out.terms["ce"] + out.terms["cos"]
    assert torch.allclose(out.total, expected)  # the same float32 sum of the same terms (defaults: 1e-5)
    out.total.backward()
    assert s.grad.abs().sum() > 0 and hs.grad.abs().sum() > 0


def test_zero_weight_terms_absent_and_not_computed(gen, monkeypatch):
    s, y = _logits(gen), _labels(gen)

    def boom(*a, **k):
        raise AssertionError("inactive term was computed")

    for name in ("cosine_loss", "mse_loss"):
        monkeypatch.setattr(terms, name, boom)
    monkeypatch.setitem(divergences.DIVERGENCES, "forward_kl", boom)  # the logit term's function
    # CE only: teacher and hidden states may all be None
    out = distillation_loss(s, None, y, LossConfig(kl=0, ce=1, cos=0, mse=0))
    assert list(out.terms) == ["ce"]
    _close(out.total, ref_ce(s, y))
    # and the spy really is wired in: an active term reaches it
    with pytest.raises(AssertionError, match="inactive"):
        distillation_loss(s, _logits(gen), y, LossConfig(kl=1, ce=0, cos=0))


@pytest.mark.parametrize(
    "weights, kwargs, missing",
    [
        (LossConfig(kl=0, ce=1, cos=1), {"teacher_hidden": "T"}, "student_hidden"),
        (LossConfig(kl=0, ce=1, cos=1), {}, "student_hidden, teacher_hidden"),
        (LossConfig(kl=0, ce=0, cos=0, mse=1), {"student_hidden": "S"}, "teacher_hidden"),
        (LossConfig(kl=1, ce=1, cos=0), {"teacher_logits": None}, "teacher_logits"),
        (LossConfig(kl=1, ce=1, cos=0, divergence="jsd"), {"teacher_logits": None}, "'jsd' .* set loss.kl to 0"),
    ],
)
def test_missing_inputs_for_active_term_raise(gen, weights, kwargs, missing):
    s, y = _logits(gen), _labels(gen)
    h = {"S": _hidden(gen), "T": _hidden(gen)}
    args = {"teacher_logits": _logits(gen), "student_hidden": None, "teacher_hidden": None}
    args.update({k: h.get(v) if isinstance(v, str) else v for k, v in kwargs.items()})
    with pytest.raises(ValueError, match=missing):
        distillation_loss(s, args["teacher_logits"], y, weights,
                          student_hidden=args["student_hidden"],
                          teacher_hidden=args["teacher_hidden"])


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"])
def test_logit_term_is_named_after_its_divergence(gen, name):
    """The logit term is ``kl`` for forward KL and the divergence's own name otherwise, and its
    value is that divergence's, weighed by loss.kl."""
    s, t, y, m = _logits(gen), _logits(gen), _labels(gen), _mask(gen)
    loss = LossConfig(kl=3.0, ce=0.5, cos=0, divergence=name, temperature=1.5)
    out = distillation_loss(s, t, y, loss, m, reduction="sum")
    term = "kl" if name == "forward_kl" else name
    assert list(out.terms) == [term, "ce"]
    # The same function on the same inputs: bit-identical.
    assert torch.equal(out.terms[term], DivergenceSpec(name)(s, t, m, 1.5, "sum"))
    assert torch.equal(out.total, 3.0 * out.terms[term] + 0.5 * out.terms["ce"])

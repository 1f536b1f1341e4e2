"""lmdistill.loss.divergences against plain float64 references over probabilities.

The references loop over counted positions and work in probability space (softmax, then
``p * log(p / q)`` summed over the support of ``p`` for the 0 * log 0 = 0 convention, the
mixture formed as ``b p + (1 - b) q``), not in the module's log-ratio form; their float64
autograd gives the reference gradient with respect to the student logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmdistill import config
from lmdistill.loss import terms
from lmdistill.config import LossConfig
from lmdistill.loss.divergences import (
    DIVERGENCE_PARAMS,
    DIVERGENCES,
    LOGIT_TERMS,
    TERM_NAMES,
    DivergenceSpec,
    divergence,
    logit_term_name,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)

B, S, V = 2, 5, 11
NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"]

# (name, params) pairs covering every divergence, parameter endpoints included.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.0}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.6}),
    ("skew_kl", {"alpha": 1.0}),
    ("skew_reverse_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.6}),
    ("skew_reverse_kl", {"alpha": 1.0}),
    ("tv", {}),
]
# The cases that stay finite when the teacher rules out tokens the student gives mass.
FINITE_WITH_RULED_OUT = [
    (n, p) for n, p in CASES
    if not (n == "reverse_kl" or (n == "jsd" and p["beta"] == 1.0)
            or (n == "skew_reverse_kl" and p["alpha"] == 0.0))
]


def _id(case):
    name, params = case
    return name + "".join(f"-{k}{v}" for k, v in params.items())


# --------------------------------------------------------------------------- references


def _kl(p, q):
    """KL(p || q) of two 1-D distributions, summed over the support of p (0 * log 0 = 0)."""
    on = p > 0
    return (p[on] * (torch.log(p[on]) - torch.log(q[on]))).sum()


def ref_position(name, p_s, p_t, beta=None, alpha=None):
    """Divergence (before T**2) at one position, from 1-D probability vectors."""
    if name == "forward_kl":
        return _kl(p_t, p_s)
    if name == "reverse_kl":
        return _kl(p_s, p_t)
    if name == "jsd":
        if beta == 0.0:
            return _kl(p_t, p_s)
        if beta == 1.0:
            return _kl(p_s, p_t)
        return ref_jsd_trl(p_s, p_t, beta) / (beta * (1 - beta))
    if name == "skew_kl":
        return _kl(p_t, alpha * p_t + (1 - alpha) * p_s)
    if name == "skew_reverse_kl":
        return _kl(p_s, alpha * p_s + (1 - alpha) * p_t)
    if name == "tv":
        return 0.5 * (p_t - p_s).abs().sum()
    raise AssertionError(name)


def ref_jsd_trl(p_s, p_t, beta):
    """GKD / TRL generalized JSD: beta KL(p_t || m) + (1 - beta) KL(p_s || m)."""
    m = beta * p_t + (1 - beta) * p_s
    return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)


def ref(name, s, t, mask=None, T=1.0, reduction="mean", **params):
    """Reduced reference value, one counted position at a time; differentiable in ``s``."""
    p_s = torch.softmax(s.double() / T, -1)
    p_t = torch.softmax(t.detach().double() / T, -1)
    values = [ref_position(name, p_s[i, j], p_t[i, j], **params) * T**2
              for i in range(s.shape[0]) for j in range(s.shape[1])
              if mask is None or bool(mask[i, j])]
    if not values:
        return p_s.sum() * 0
    total = torch.stack(values).sum()
    return total if reduction == "sum" else total / len(values)


def value_and_grad(fn, s):
    """``fn(s)`` and d fn / d s, for a leaf copy of ``s``."""
    s = s.detach().clone().requires_grad_()
    out = fn(s)
    (g,) = torch.autograd.grad(out, s)
    return out.detach(), g


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20240607)


def _logits(gen, scale=2.0, dtype=torch.float64):
    return (torch.randn(B, S, V, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _mask(gen):
    """Random mask with one whole row out and at least one counted position."""
    m = torch.rand(B, S, generator=gen) > 0.3
    m[0, 0] = True
    m[1, 1:3] = False
    return m


def _one_hot_teacher(gen, dtype=torch.float64):
    """-inf everywhere but one token per position."""
    t = torch.full((B, S, V), -math.inf, dtype=dtype)
    idx = torch.randint(0, V, (B, S), generator=gen)
    t.scatter_(-1, idx.unsqueeze(-1), torch.randn(B, S, 1, generator=gen, dtype=torch.float64).to(dtype))
    return t


def _check(name, params, s, t, mask, T, reduction, rtol=1e-9, atol=1e-12):
    """float64 against the float64 reference: both round at ~1e-16 per operation over 11 tokens
    and 10 positions (measured: <= 0.1% of these bounds); any wrong formula is off by O(1)."""
    out, grad = value_and_grad(
        lambda x: divergence(name, x, t, mask, T, reduction, **params), s)
    ref_out, ref_grad = value_and_grad(
        lambda x: ref(name, x, t, mask, T, reduction, **params), s.double())
    assert out.dim() == 0 and torch.isfinite(out)
    assert torch.isfinite(grad).all()
    assert out.item() == pytest.approx(ref_out.item(), rel=rtol, abs=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- against references


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_matches_reference_value_and_grad(gen, case, T):
    name, params = case
    s, t, m = _logits(gen), _logits(gen), _mask(gen)
    for mask in (None, m):
        for reduction in ("mean", "sum"):
            _check(name, params, s, t, mask, T, reduction)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("T", [0.1, 20.0])
def test_temperature_far_from_one(gen, case, T):
    name, params = case
    s, t, m = _logits(gen), _logits(gen), _mask(gen)
    _check(name, params, s, t, m, T, "mean")
    # float32: computed in float32, compared with the float64 reference of the same values.
    s32, t32 = s.float(), t.float()
    out, grad = value_and_grad(lambda x: divergence(name, x, t32, m, T, "mean", **params), s32)
    ref_out, ref_grad = value_and_grad(lambda x: ref(name, x, t32, m, T, "mean", **params), s32.double())
    assert out.dtype == torch.float32
    # float32 at T = 0.1 divides logits of ~5 by 0.1: ~50 in the exponent, so rounding is ~50 u
    # relative (u = 6e-8, ~3e-6); the value scales as T^2 and the gradient as T (measured: <= 9%
    # of these bounds, on every kernel tried).
    assert out.item() == pytest.approx(ref_out.item(), rel=1e-4, abs=1e-5 * T**2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-5 * T)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_float32_and_bf16_inputs(gen, case):
    name, params = case
    s, t, m = _logits(gen), _logits(gen), _mask(gen)
    # The value is float32 either way; the gradient has the input's dtype (bf16: 8 bits).
    for dtype, grad_rtol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        s_lo, t_lo = s.to(dtype), t.to(dtype)
        out, grad = value_and_grad(lambda x: divergence(name, x, t_lo, m, 2.0, "sum", **params), s_lo)
        # Reference on the same (rounded) inputs: the only error left is float32 arithmetic.
        ref_out, ref_grad = value_and_grad(lambda x: ref(name, x, t_lo, m, 2.0, "sum", **params),
                                           s_lo.double())
        assert out.dtype == torch.float32  # bf16 is upcast, never computed in bf16
        assert out.item() == pytest.approx(ref_out.item(), rel=1e-5, abs=1e-5)  # float32 rounding (~1e-7)
        assert grad.dtype == dtype
        # float32: ~1e-6 relative (differences of probabilities); bf16: the gradient rounded to 8
        # bits, 2^-9 = 2e-3 relative (measured: 36% of 1e-2 on every kernel, a deterministic
        # rounding); entries near 0 get 1% of that relative to the largest entry.
        torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_rtol,
                                   atol=grad_rtol * 1e-2 * ref_grad.abs().max().item())


def test_float64_result_dtype(gen):
    s, t = _logits(gen), _logits(gen)
    for name in NAMES:
        assert divergence(name, s, t).dtype == torch.float64
        assert divergence(name, s.float(), t).dtype == torch.float64


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_chunked_equals_unchunked(gen, case, monkeypatch):
    name, params = case
    s, t, m = _logits(gen), _logits(gen), _mask(gen)
    whole = value_and_grad(lambda x: divergence(name, x, t, m, 2.0, "mean", **params), s)
    monkeypatch.setattr(terms, "_CHUNK_TOKENS", 3)  # 1 position per chunk at batch 2
    chunked = value_and_grad(lambda x: divergence(name, x, t, m, 2.0, "mean", **params), s)
    # float64, the same per-position values summed in another grouping: ~1e-16 relative.
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_masked_is_zero_with_working_backward(gen, case, reduction):
    name, params = case
    s, t = _logits(gen, dtype=torch.float32), _logits(gen, dtype=torch.float32)
    for mask in (torch.zeros(B, S, dtype=torch.bool), torch.zeros(B, S, dtype=torch.long)):
        out, grad = value_and_grad(lambda x: divergence(name, x, t, mask, 2.0, reduction, **params), s)
        assert out.item() == 0.0  # nothing counted: exactly 0 on any CPU
        assert torch.isfinite(grad).all() and (grad == 0).all()


@pytest.mark.parametrize("case", FINITE_WITH_RULED_OUT, ids=_id)
@pytest.mark.parametrize("T", [0.5, 2.0])
def test_one_hot_teacher(gen, case, T):
    name, params = case
    s, m = _logits(gen), _mask(gen)
    t = _one_hot_teacher(gen)
    for mask in (None, m):
        _check(name, params, s, t, mask, T, "mean")
    # float32 too, against the float64 reference.
    s32, t32 = s.float(), t.float()
    out, grad = value_and_grad(lambda x: divergence(name, x, t32, m, T, "sum", **params), s32)
    ref_out, ref_grad = value_and_grad(lambda x: ref(name, x, t32, m, T, "sum", **params), s32.double())
    # float32 rounding, ~1e-7 relative on the value; gradient entries are differences of O(1)
    # probabilities, so ~1e-7 absolute near 0 (measured: <= 20% of these bounds, scalar kernels).
    assert out.item() == pytest.approx(ref_out.item(), rel=1e-5, abs=1e-5)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", FINITE_WITH_RULED_OUT, ids=_id)
def test_teacher_rules_out_some_tokens(gen, case):
    name, params = case
    s, t, m = _logits(gen), _logits(gen), _mask(gen)
    t[..., -3:] = -math.inf
    t[0, 2, :4] = -math.inf
    _check(name, params, s, t, m, 2.0, "sum")


@pytest.mark.parametrize("case", [("reverse_kl", {}), ("jsd", {"beta": 1.0}),
                                  ("skew_reverse_kl", {"alpha": 0.0})], ids=_id)
def test_reverse_kl_against_ruled_out_tokens(gen, case):
    name, params = case
    s = _logits(gen).requires_grad_()
    t = _one_hot_teacher(gen)
    # KL(p_s || p_t) is infinite there: an error that names the finite alternatives ...
    what = {"reverse_kl": "reverse_kl", "jsd": r"jsd with beta=1 \(reverse KL\)",
            "skew_reverse_kl": r"skew_reverse_kl with alpha=0 \(reverse KL\)"}[name]
    with pytest.raises(ValueError, match=what + r" is infinite: .*use skew_reverse_kl with "
                       r"alpha > 0 or jsd with beta < 1"):
        divergence(name, s, t, **params)
    # ... unless every such position is masked out: then finite, with finite gradients
    # (no NaN leaks back from the masked infinite positions).
    t = _logits(gen)
    t[1, 1:3] = _one_hot_teacher(gen)[1, 1:3]
    mask = _mask(gen)
    assert not mask[1, 1:3].any()
    _check(name, params, s.detach(), t, mask, 2.0, "mean")
    # Tokens both models rule out count 0 * log(0 / 0) = 0.
    s2, t2 = _logits(gen), _logits(gen)
    s2[..., -2:] = -math.inf
    t2[..., -2:] = -math.inf
    out, grad = value_and_grad(lambda x: divergence(name, x, t2, None, 2.0, "mean", **params), s2)
    expected = ref(name, s2[..., :-2], t2[..., :-2], None, 2.0, "mean", **params)
    assert out.item() == pytest.approx(expected.item(), rel=1e-9)  # float64 both: rounding ~1e-16
    assert torch.isfinite(grad).all()


def test_disjoint_distributions_reach_the_bounds():
    # Teacher all on token 0, student all on token 1 (-inf elsewhere, also for the student).
    t = torch.full((1, 1, 4), -math.inf, dtype=torch.float64)
    s = t.clone()
    t[..., 0] = 0.0
    s[..., 1] = 0.0
    T = 2.0  # float64 closed forms below: rel 1e-12 is ~10^4 roundings
    for beta in (0.1, 0.5, 0.8):
        h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)  # max of JSD_beta
        assert generalized_jsd(s, t, temperature=T, beta=beta).item() == pytest.approx(
            h / (beta * (1 - beta)) * T**2, rel=1e-12)
    for alpha in (0.1, 0.5):
        bound = -math.log(alpha) * T**2
        assert skew_kl(s, t, temperature=T, alpha=alpha).item() == pytest.approx(bound, rel=1e-12)
        assert skew_reverse_kl(s, t, temperature=T, alpha=alpha).item() == pytest.approx(bound, rel=1e-12)
    assert total_variation(s, t, temperature=T).item() == pytest.approx(T**2, rel=1e-12)


def test_teacher_gets_no_grad(gen):
    for name, params in CASES:
        s = _logits(gen).requires_grad_()
        t = _logits(gen).requires_grad_()
        divergence(name, s, t, None, 2.0, **params).backward()
        assert t.grad is None
        assert s.grad is not None and torch.isfinite(s.grad).all()


def test_integer_mask_equals_bool_mask(gen):
    s, t, m = _logits(gen), _logits(gen), _mask(gen)
    for name, params in CASES:
        a = divergence(name, s, t, m, 2.0, **params)
        # Exactly equal: each mask becomes the same bool mask, then the same ops run.
        assert a.item() == divergence(name, s, t, m.long(), 2.0, **params).item()
        assert a.item() == divergence(name, s, t, m.float(), 2.0, **params).item()


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_zero_when_student_equals_teacher(gen, case):
    name, params = case
    s = _logits(gen)
    for T in (0.5, 1.0, 4.0):
        out, grad = value_and_grad(lambda x: divergence(name, x, s.clone(), None, T, **params), s)
        # float64: what is left is rounding of O(1) terms, ~1e-16 (1e-10 for the gradient, which
        # T^-1 and the mixture's divisions can scale up); a wrong formula gives O(1).
        assert abs(out.item()) < 1e-12
        assert grad.abs().max().item() < 1e-10


def test_nonnegative_and_zero_only_at_equality(gen):
    s, t = _logits(gen), _logits(gen)
    for name, params in CASES:
        value = divergence(name, s, t, None, 2.0, **params).item()
        if params.get("alpha") == 1.0:  # skew with alpha = 1 compares a distribution with itself
            assert value == 0.0  # the mixture is the same tensor: log ratios are exactly 0
        else:
            assert value > 1e-3, (name, params)


def test_forward_kl_is_terms_kl_divergence(gen):
    s, t, m = _logits(gen, dtype=torch.float32), _logits(gen, dtype=torch.float32), _mask(gen)
    for T, reduction in ((1.0, "mean"), (2.0, "sum"), (0.5, "mean")):
        a = value_and_grad(lambda x: forward_kl(x, t, m, T, reduction), s)
        b = value_and_grad(lambda x: terms.kl_divergence(x, t, m, T, reduction), s)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # one function: the same ops


def test_parameter_endpoints_are_plain_kl_exactly(gen):
    s, t, m = _logits(gen, dtype=torch.float32), _logits(gen, dtype=torch.float32), _mask(gen)
    fwd = value_and_grad(lambda x: forward_kl(x, t, m, 2.0), s)
    rev = value_and_grad(lambda x: reverse_kl(x, t, m, 2.0), s)
    for fn, expected in (
        (lambda x: skew_kl(x, t, m, 2.0, alpha=0.0), fwd),
        (lambda x: generalized_jsd(x, t, m, 2.0, beta=0.0), fwd),
        (lambda x: skew_reverse_kl(x, t, m, 2.0, alpha=0), rev),
        (lambda x: generalized_jsd(x, t, m, 2.0, beta=1), rev),
    ):
        got = value_and_grad(fn, s)
        # Exactly: at the endpoints the code takes the plain KL's path (the same ops).
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # alpha = 1: the mixture is the distribution itself, so 0 with zero gradient.
    for fn in (skew_kl, skew_reverse_kl):
        out, grad = value_and_grad(lambda x: fn(x, t, m, 2.0, alpha=1.0), s)
        assert out.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jsd_is_continuous_at_both_ends(gen, dtype):
    s, t, m = _logits(gen, dtype=dtype), _logits(gen, dtype=dtype), _mask(gen)
    fwd = value_and_grad(lambda x: forward_kl(x, t, m, 2.0), s)
    rev = value_and_grad(lambda x: reverse_kl(x, t, m, 2.0), s)
    # The gap is the O(beta) term of the expansion, not rounding (the same on every kernel):
    # measured 5e-6 relative on the gradient at beta = 1e-6, so 1e-5 (float64); float32 adds
    # its rounding, more where terms cancel: 2e-5 (measured: 27% of it).
    tol = 1e-5 if dtype == torch.float64 else 2e-5
    for eps in (1e-6, 1e-8):
        near0 = value_and_grad(lambda x: generalized_jsd(x, t, m, 2.0, beta=eps), s)
        near1 = value_and_grad(lambda x: generalized_jsd(x, t, m, 2.0, beta=1 - eps), s)
        assert near0[0].item() == pytest.approx(fwd[0].item(), rel=tol)
        assert near1[0].item() == pytest.approx(rev[0].item(), rel=tol)
        torch.testing.assert_close(near0[1], fwd[1], rtol=tol, atol=tol * fwd[1].abs().max().item())
        torch.testing.assert_close(near1[1], rev[1], rtol=tol, atol=tol * rev[1].abs().max().item())
    # The approach is first order in beta: halving the distance halves the gap.
    f = fwd[0].double().item()
    gaps = [abs(generalized_jsd(s, t, m, 2.0, beta=b).double().item() - f) for b in (1e-3, 5e-4)]
    # First order: the ratio is 1/2 up to the O(beta) next term (0.4% measured) and, in float32,
    # rounding of gaps of ~1e-3 relative (1e-4); second order would give 1/4.
    assert gaps[1] / gaps[0] == pytest.approx(0.5, rel=0.02)


def test_jsd_times_beta_one_minus_beta_is_trl_value(gen):
    s, t, m = _logits(gen), _logits(gen), _mask(gen)
    for beta in (0.1, 0.5, 0.9):
        ours = value_and_grad(lambda x: generalized_jsd(x, t, m, 1.0, beta=beta) * beta * (1 - beta), s)

        def trl(x):
            p_s, p_t = torch.softmax(x, -1), torch.softmax(t, -1)
            rows = [ref_jsd_trl(p_s[i, j], p_t[i, j], beta) for i, j in m.nonzero().tolist()]
            return torch.stack(rows).sum() / len(rows)

        expected = value_and_grad(trl, s)
        # float64 both (ours in log-ratio form, TRL's in probabilities): rounding ~1e-15.
        assert ours[0].item() == pytest.approx(expected[0].item(), rel=1e-10)
        torch.testing.assert_close(ours[1], expected[1], rtol=1e-9, atol=1e-12)


def test_jsd_half_is_symmetric(gen):
    s, t, m = _logits(gen), _logits(gen), _mask(gen)
    for T in (0.5, 2.0):
        a = generalized_jsd(s, t, m, T, beta=0.5).item()
        b = generalized_jsd(t, s, m, T, beta=0.5).item()
        assert a == pytest.approx(b, rel=1e-12)  # float64, same terms in another order: ~1e-16
    # and beta <-> 1 - beta with roles swapped, generally
    a = generalized_jsd(s, t, m, 2.0, beta=0.2).item()
    assert a == pytest.approx(generalized_jsd(t, s, m, 2.0, beta=0.8).item(), rel=1e-12)


def test_tv_is_within_zero_and_t_squared(gen):
    s, t = _logits(gen, scale=6.0), _logits(gen, scale=6.0)
    for T in (0.1, 0.5, 1.0, 4.0, 20.0):
        # every single position, not just the mean
        for i in range(B):
            for j in range(S):
                value = total_variation(s[i : i + 1, j : j + 1], t[i : i + 1, j : j + 1], None, T).item()
                assert 0.0 < value <= T**2


# --------------------------------------------------------------------------- registry and validation


def test_registry_names_and_defaults():
    assert list(DIVERGENCES) == NAMES == list(config.DIVERGENCES)  # what the recipe checks accept
    assert DIVERGENCES["jsd"] is generalized_jsd and DIVERGENCES["tv"] is total_variation
    assert DIVERGENCE_PARAMS == {"jsd": ("beta", 0.5), "skew_kl": ("alpha", 0.1),
                                 "skew_reverse_kl": ("alpha", 0.1)}
    assert DivergenceSpec().name == "forward_kl"
    assert DivergenceSpec("jsd").params == {"beta": 0.5}
    assert DivergenceSpec("skew_kl", alpha=0.3).params == {"alpha": 0.3}
    assert DivergenceSpec("tv").params == {}
    assert str(DivergenceSpec("jsd", beta=0.9)) == "jsd(beta=0.9)"
    assert str(DivergenceSpec("reverse_kl")) == "reverse_kl"
    with pytest.raises(Exception):  # frozen
        DivergenceSpec("jsd").beta = 0.1  # type: ignore[misc]


def test_spec_and_divergence_call_the_functions(gen):
    s, t, m = _logits(gen), _logits(gen), _mask(gen)
    assert DivergenceSpec("jsd", beta=0.3)(s, t, m, 2.0, "sum").item() == \
        generalized_jsd(s, t, m, 2.0, "sum", beta=0.3).item()
    assert divergence("skew_reverse_kl", s, t, m, 2.0).item() == \
        skew_reverse_kl(s, t, m, 2.0, alpha=0.1).item()
    assert divergence("tv", s, t).item() == total_variation(s, t).item()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="jsdd"),
         "unknown divergence 'jsdd'; choose one of forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tv"),
        (dict(name="jsd", beta=1.5), "jsd beta must be a number in [0, 1], got 1.5"),
        (dict(name="jsd", beta=-0.1), "jsd beta must be a number in [0, 1], got -0.1"),
        (dict(name="jsd", beta=float("nan")), "jsd beta must be a number in [0, 1], got nan"),
        (dict(name="jsd", beta=True), "jsd beta must be a number in [0, 1], got True"),
        (dict(name="jsd", beta="0.5"), "jsd beta must be a number in [0, 1], got '0.5'"),
        (dict(name="skew_kl", alpha=2), "skew_kl alpha must be a number in [0, 1], got 2"),
        (dict(name="skew_reverse_kl", alpha=-1.0),
         "skew_reverse_kl alpha must be a number in [0, 1], got -1.0"),
        (dict(name="jsd", alpha=0.1),
         "divergence 'jsd' takes only beta in [0, 1] (default 0.5); remove alpha=0.1"),
        (dict(name="skew_kl", beta=0.1),
         "divergence 'skew_kl' takes only alpha in [0, 1] (default 0.1); remove beta=0.1"),
        (dict(name="tv", beta=0.5), "divergence 'tv' takes no parameter; remove beta=0.5"),
    ],
)
def test_spec_validation_names_the_fix(kwargs, message):
    with pytest.raises(ValueError) as err:
        DivergenceSpec(**kwargs)
    assert str(err.value) == message


def test_function_and_divergence_validation(gen):
    s, t = _logits(gen), _logits(gen)
    with pytest.raises(ValueError, match=r"jsd beta must be a number in \[0, 1\], got 1.5"):
        generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match=r"skew_kl alpha must be a number in \[0, 1\], got -0.5"):
        skew_kl(s, t, alpha=-0.5)
    with pytest.raises(ValueError, match=r"skew_reverse_kl alpha .* got 1.01"):
        skew_reverse_kl(s, t, alpha=1.01)
    with pytest.raises(ValueError, match="unknown divergence 'kl'; choose one of forward_kl, "):
        divergence("kl", s, t)
    with pytest.raises(ValueError, match=r"'jsd' takes only beta in \[0, 1\].*unknown parameter gamma"):
        divergence("jsd", s, t, gamma=0.5)
    with pytest.raises(ValueError, match="'tv' takes no parameter; remove alpha=0.1"):
        divergence("tv", s, t, alpha=0.1)
    with pytest.raises(TypeError):  # the parameter is keyword-only
        generalized_jsd(s, t, None, 1.0, "mean", 0.5)  # type: ignore[misc]
    for name in NAMES:
        for bad_t in (0.0, -1.0, float("inf"), float("nan")):
            with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
                divergence(name, s, t, temperature=bad_t)
        with pytest.raises(ValueError, match="reduction must be one of"):
            divergence(name, s, t, reduction="none")
        with pytest.raises(ValueError, match="share a vocabulary"):
            divergence(name, s, t[..., :-1])
        with pytest.raises(ValueError, match=r"mask must have shape \(batch, seq\)"):
            divergence(name, s, t, torch.ones(B, S + 1, dtype=torch.bool))


def test_logit_term_names():
    """Forward KL keeps its historic name (its weight is loss.kl); every other divergence is
    logged under its own, so the names a run can log are distinct and known in advance."""
    assert [logit_term_name(name) for name in NAMES] == ["kl", *NAMES[1:]]
    assert [DivergenceSpec(name).term_name for name in NAMES] == list(LOGIT_TERMS)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        logit_term_name("kl")
    assert len(set(TERM_NAMES)) == len(TERM_NAMES)
    # The other terms are named after their weight fields (the logit term's weight is loss.kl).
    assert TERM_NAMES == (*LOGIT_TERMS, *LossConfig.WEIGHTS[1:])

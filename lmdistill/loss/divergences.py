"""Divergences between teacher and student next-token distributions, behind one API.

Every function here follows the conventions of :mod:`lmdistill.loss.terms` (and reuses its
helpers): logits ``(batch, seq, vocab)`` with labels already shifted, ``mask`` bool or 0/1
``(batch, seq)`` (None = all positions count), ``reduction`` ``"mean"`` over counted
positions or ``"sum"``, upcast to float32 (float64 stays float64) one seq-chunk at a time,
teacher detached. With ``p_t = softmax(teacher / T)`` and ``p_s = softmax(student / T)``
each returns ``D(p_t, p_s) * T**2`` summed or averaged over counted positions: the ``T**2``
factor applies to every divergence, TV included, so that all of them are interchangeable
in a weighted sum (see ``docs/divergences.md`` for why and what it means for TV).

=================  ==========================================================  ===========
name               per-position value (before ``* T**2``)                       parameter
=================  ==========================================================  ===========
forward_kl         KL(p_t || p_s)                                               --
reverse_kl         KL(p_s || p_t)                                               --
jsd                [b KL(p_t||m) + (1-b) KL(p_s||m)] / (b (1-b)),               beta in [0, 1]
                   m = b p_t + (1-b) p_s; forward KL at b=0, reverse KL at b=1
skew_kl            KL(p_t || a p_t + (1-a) p_s)                                 alpha in [0, 1]
skew_reverse_kl    KL(p_s || a p_s + (1-a) p_t)                                 alpha in [0, 1]
tv                 0.5 * sum |p_t - p_s|                                        --
=================  ==========================================================  ===========

Tokens the teacher rules out (``-inf`` logits, ``p_t = 0``) contribute ``0 * log 0 = 0``
wherever they are weighted by ``p_t``, with finite gradients. The only divergence that is
then infinite is KL(p_s || p_t) itself (``reverse_kl``, ``jsd`` at beta=1,
``skew_reverse_kl`` at alpha=0) when the student gives such a token probability: those
raise ``ValueError`` naming the finite alternatives instead of returning ``inf``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..config import DIVERGENCE_PARAMS, LossConfig
from .terms import kl_divergence, logit_divergence

__all__ = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_kl",
    "skew_reverse_kl",
    "total_variation",
    "DIVERGENCES",
    "DIVERGENCE_PARAMS",
    "DivergenceSpec",
    "divergence",
    "logit_term_name",
    "LOGIT_TERMS",
    "TERM_NAMES",
]

DivergenceFn = Callable[..., Tensor]


# --------------------------------------------------------------------------- helpers


def _check_weight(divergence_name: str, param: str, value: object) -> float:
    """``value`` as a float in [0, 1], else a ValueError naming the divergence and range."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= float(value) <= 1.0  # also rejects NaN
    ):
        raise ValueError(f"{divergence_name} {param} must be a number in [0, 1], got {value!r}")
    return float(value)


def _kl_to_mixture(log_p: Tensor, log_q: Tensor, w: float) -> Tensor:
    """``KL(p || w p + (1 - w) q)`` over the last dim, for ``0 < w <= 1``; finite (<= -log w).

    Computed from the log-ratio ``d = log m - log p = logaddexp(log w, log(1-w) + log q - log p)``
    rather than ``log m - log p`` of two separately rounded logs: ``d`` is small when ``m``
    is close to ``p``, and this keeps its absolute error proportional to ``d`` itself, so
    the O(w^2) and O((1-w)^2) terms the normalised JSD divides by stay accurate in float32.
    """
    p = log_p.exp()
    live = p > 0
    # Entries with p = 0 contribute 0 * log 0 = 0. Their logs are replaced by finite values
    # *before* the arithmetic, so the branch torch.where discards has a finite gradient
    # (where's zero gradient times an infinite local derivative would be NaN).
    log_p = log_p.masked_fill(~live, 0.0)
    # torch.full, not torch.tensor: a fill kernel on the device, no host-to-device copy/sync.
    log_w = torch.full((), math.log(w), dtype=log_p.dtype, device=log_p.device)
    log_1mw = -math.inf if w == 1.0 else math.log1p(-w)
    # log q = -inf (q rules the token out) makes the second argument -inf: d = log w, finite.
    d = torch.logaddexp(log_w, log_1mw + log_q - log_p)
    return torch.where(live, -p * d, 0.0).sum(dim=-1)


def _reverse_kl_per_token(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
    """``KL(p_s || p_t)`` over the last dim; ``+inf`` at positions where it is infinite.

    The infinite positions get a constant ``inf`` (no gradient) and finite gradients
    elsewhere, so a masked-out infinite position cannot poison the backward pass.
    """
    p_s = log_p_s.exp()
    live = p_s > 0  # tokens the student rules out too: 0 * log(0/0) = 0
    ruled_out = torch.isneginf(log_p_t)
    log_p_s = log_p_s.masked_fill(~live, 0.0)
    log_p_t = log_p_t.masked_fill(ruled_out, 0.0)
    kl = torch.where(live, p_s * (log_p_s - log_p_t), 0.0).sum(dim=-1)
    infinite = (live & ruled_out).any(dim=-1)
    return kl.masked_fill(infinite, math.inf)


def _raise_if_infinite(total: Tensor, what: str) -> Tensor:
    # One host sync; only KL(p_s || p_t) can be infinite, and then only for -inf teacher logits.
    if torch.isposinf(total):
        raise ValueError(
            f"{what} is infinite: at a counted position the teacher rules out a token (-inf "
            "logit) to which the student gives probability, so KL(student || teacher) = inf; use "
            "skew_reverse_kl with alpha > 0 or jsd with beta < 1 (both stay finite), or mask "
            "those positions out"
        )
    return total


# --------------------------------------------------------------------------- divergences


forward_kl = kl_divergence
"""Forward KL(p_t || p_s) * T**2: mode-covering; the classic distillation loss. It *is*
:func:`lmdistill.loss.terms.kl_divergence`: see there for its arguments."""


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
               temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """Reverse KL(p_s || p_t) * T**2: mode-seeking (the student may drop teacher modes).

    ``sum_v p_s(v) * (log p_s(v) - log p_t(v)) * T**2`` with ``p = softmax(logits / T)``.

    Args and returns: as :func:`forward_kl`.

    Raises:
        ValueError: at a counted position the teacher rules out (``-inf`` logit) a token the
            student gives probability, where KL(p_s || p_t) is infinite. Tokens both rule
            out contribute 0. Costs one host sync per call.
    """
    return _reverse_kl(student_logits, teacher_logits, mask, temperature, reduction, "reverse_kl")


def _reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None,
                temperature: float, reduction: str, what: str) -> Tensor:
    # ``what`` names the caller's divergence (e.g. "jsd with beta=1") in the error.
    total = logit_divergence(
        _reverse_kl_per_token, student_logits, teacher_logits, mask, temperature, reduction
    )
    return _raise_if_infinite(total, what)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                    temperature: float = 1.0, reduction: str = "mean", *, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence, normalised so it is continuous on [0, 1].

    With ``m = beta * p_t + (1 - beta) * p_s`` (the GKD / TRL ``generalized_jsd_loss``
    mixture: beta weighs the *teacher*), the GKD divergence is

        ``JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``

    and this returns ``JSD_beta / (beta * (1 - beta)) * T**2``. Unnormalised, JSD_beta -> 0
    at both ends (m becomes one of the two distributions), which is why TRL special-cases
    beta = 0 and 1; divided by ``beta * (1 - beta)`` it tends to forward KL(p_t || p_s) as
    beta -> 0 and to reverse KL(p_s || p_t) as beta -> 1, which are exactly its values at
    0 and 1. beta = 0.5 gives 4 x the textbook JSD (symmetric in teacher and student).
    TRL's value for beta in (0, 1) is ``beta * (1 - beta) / T**2`` times this one (TRL does not
    multiply by T**2).

    Args:
        beta: in [0, 1]; keyword-only. Other args and returns: as :func:`forward_kl`.

    Raises:
        ValueError: beta outside [0, 1]; or beta = 1 (reverse KL) with a teacher that rules
            out a token the student gives probability (see :func:`reverse_kl`).
    """
    beta = _check_weight("jsd", "beta", beta)
    if beta == 0.0:  # the limit, exactly: the second term / beta -> 0
        return forward_kl(student_logits, teacher_logits, mask, temperature, reduction)
    if beta == 1.0:  # the limit, exactly: the first term / (1 - beta) -> 0
        return _reverse_kl(student_logits, teacher_logits, mask, temperature, reduction,
                           "jsd with beta=1 (reverse KL)")

    def per_token(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
        # beta KL(p_t||m) / (beta (1-beta)) + (1-beta) KL(p_s||m) / (beta (1-beta)), with
        # m = beta p_t + (1-beta) p_s = (1-beta) p_s + beta p_t from each side.
        to_teacher = _kl_to_mixture(log_p_t, log_p_s, beta) / (1.0 - beta)
        to_student = _kl_to_mixture(log_p_s, log_p_t, 1.0 - beta) / beta
        return to_teacher + to_student

    return logit_divergence(per_token, student_logits, teacher_logits, mask, temperature, reduction)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
            temperature: float = 1.0, reduction: str = "mean", *, alpha: float = 0.1) -> Tensor:
    """DistiLLM's skew KL: ``KL(p_t || alpha p_t + (1 - alpha) p_s) * T**2``.

    Mixing some teacher into the student keeps the log-ratio bounded (the value is at most
    ``-log alpha * T**2``), which stabilises the gradient (Ko et al., 2024; their default
    alpha = 0.1). alpha = 0 is forward KL exactly; alpha = 1 is identically 0 (no signal).

    Args:
        alpha: in [0, 1]; keyword-only. Other args and returns: as :func:`forward_kl`.

    Raises:
        ValueError: alpha outside [0, 1].
    """
    alpha = _check_weight("skew_kl", "alpha", alpha)
    if alpha == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature, reduction)
    return logit_divergence(
        lambda log_p_s, log_p_t: _kl_to_mixture(log_p_t, log_p_s, alpha),
        student_logits, teacher_logits, mask, temperature, reduction,
    )


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                    temperature: float = 1.0, reduction: str = "mean", *, alpha: float = 0.1) -> Tensor:
    """DistiLLM's skew reverse KL: ``KL(p_s || alpha p_s + (1 - alpha) p_t) * T**2``.

    Finite (at most ``-log alpha * T**2``) even where the teacher rules tokens out, for any
    alpha > 0. alpha = 0 is reverse KL exactly; alpha = 1 is identically 0 (no signal).

    Args:
        alpha: in [0, 1]; keyword-only. Other args and returns: as :func:`forward_kl`.

    Raises:
        ValueError: alpha outside [0, 1]; or alpha = 0 with a teacher that rules out a
            token the student gives probability (see :func:`reverse_kl`).
    """
    alpha = _check_weight("skew_reverse_kl", "alpha", alpha)
    if alpha == 0.0:
        return _reverse_kl(student_logits, teacher_logits, mask, temperature, reduction,
                           "skew_reverse_kl with alpha=0 (reverse KL)")
    return logit_divergence(
        lambda log_p_s, log_p_t: _kl_to_mixture(log_p_s, log_p_t, alpha),
        student_logits, teacher_logits, mask, temperature, reduction,
    )


def total_variation(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                    temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """Total variation distance ``0.5 * sum_v |p_t(v) - p_s(v)| * T**2``, in ``[0, T**2]``.

    Multiplied by ``T**2`` like every divergence here, for one uniform rule; note TV shrinks
    like 1/T (not 1/T**2) as T grows, so the factor over-compensates at large T.

    Args and returns: as :func:`forward_kl`.
    """

    def per_token(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
        return 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(dim=-1)

    return logit_divergence(per_token, student_logits, teacher_logits, mask, temperature, reduction)


# --------------------------------------------------------------------------- registry


DIVERGENCES: dict[str, DivergenceFn] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tv": total_variation,
}
"""Name -> function; each takes ``(student_logits, teacher_logits, mask, temperature,
reduction)`` plus, keyword-only, the parameter listed in :data:`DIVERGENCE_PARAMS`
(``lmdistill.config``, where the recipe's checks read the names and parameters too)."""


_PARAM_NAMES = ("beta", "alpha")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    return name


def _takes(name: str) -> str:
    if name not in DIVERGENCE_PARAMS:
        return "takes no parameter"
    param, default = DIVERGENCE_PARAMS[name]
    return f"takes only {param} in [0, 1] (default {default})"


def divergence_of(loss: LossConfig) -> DivergenceSpec:
    """The logit divergence a recipe's ``loss`` section asks for."""
    return DivergenceSpec(loss.divergence, beta=loss.jsd_beta, alpha=loss.skew_alpha)


def logit_term_name(divergence: str) -> str:
    """The name the logit term is logged under (``metrics.jsonl``) for ``loss.divergence``:
    ``kl`` for forward KL (the default, weighed by ``loss.kl``), else the divergence's own name."""
    return "kl" if divergence == "forward_kl" else _check_name(divergence)


LOGIT_TERMS: tuple[str, ...] = tuple(logit_term_name(name) for name in DIVERGENCES)
"""Every name the logit term can be logged under: ``kl``, ``reverse_kl``, ``jsd``, ..."""

TERM_NAMES: tuple[str, ...] = LOGIT_TERMS + tuple(w for w in LossConfig.WEIGHTS if w != "kl")
"""Every loss term a run can log: the logit term's names, then the others, each named after
its weight field (``ce``, ``cos``, ``mse``, ``align_cos``, ``align_mse``)."""


@dataclass(frozen=True)
class DivergenceSpec:
    """A divergence by name plus its parameter, checked on construction.

    ``DivergenceSpec("jsd", beta=0.9)``, ``DivergenceSpec("skew_kl", alpha=0.1)``,
    ``DivergenceSpec("tv")``. A parameter left as None takes the default in
    :data:`DIVERGENCE_PARAMS`; one the divergence does not take is an error.
    """

    name: str = "forward_kl"
    """One of the keys of :data:`DIVERGENCES`."""
    beta: float | None = None
    """jsd only: weight of the teacher in the mixture, in [0, 1]."""
    alpha: float | None = None
    """skew_kl and skew_reverse_kl only: weight of the first distribution in the mixture, in [0, 1]."""

    def __post_init__(self) -> None:
        name = _check_name(self.name)
        expected = DIVERGENCE_PARAMS.get(name, (None, None))[0]
        for param in _PARAM_NAMES:
            value = getattr(self, param)
            if value is None:
                continue
            if param != expected:
                raise ValueError(f"divergence {name!r} {_takes(name)}; remove {param}={value!r}")
            _check_weight(name, param, value)

    @property
    def params(self) -> dict[str, float]:
        """The keyword arguments for the divergence function, defaults filled in."""
        if self.name not in DIVERGENCE_PARAMS:
            return {}
        param, default = DIVERGENCE_PARAMS[self.name]
        value = getattr(self, param)
        return {param: default if value is None else float(value)}

    @property
    def term_name(self) -> str:
        """The logit term's logged name: :func:`logit_term_name`."""
        return logit_term_name(self.name)

    def __str__(self) -> str:
        """``jsd(beta=0.5)``, ``tv``: a short label for logs and reports."""
        args = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"{self.name}({args})" if args else self.name

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                 temperature: float = 1.0, reduction: str = "mean") -> Tensor:
        """The divergence's value: see the function in :data:`DIVERGENCES` it names."""
        return DIVERGENCES[self.name](student_logits, teacher_logits, mask, temperature, reduction, **self.params)


def divergence(name: str, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
               temperature: float = 1.0, reduction: str = "mean", **params: float) -> Tensor:
    """``DivergenceSpec(name, **params)(student_logits, teacher_logits, mask, temperature, reduction)``.

    Args:
        name: a key of :data:`DIVERGENCES`.
        params: ``beta=`` for jsd, ``alpha=`` for the skew KLs; none for the others.

    Raises:
        ValueError: unknown name, a parameter the divergence does not take or out of range
            (the message names the valid choices), or any error of the divergence itself.
    """
    name = _check_name(name)
    unknown = sorted(set(params) - set(_PARAM_NAMES))
    if unknown:
        raise ValueError(
            f"divergence {name!r} {_takes(name)}; unknown parameter {', '.join(unknown)}"
        )
    return DivergenceSpec(name, **params)(student_logits, teacher_logits, mask, temperature, reduction)

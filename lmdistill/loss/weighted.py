"""The weighted sum of the loss terms that a recipe turns on (the full-logits path)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..config import LossConfig
from .divergences import divergence_of
from .terms import (
    LossOutput,
    _check_reduction,
    causal_lm_loss,
    cosine_loss,
    layer_alignment_loss,
    mse_loss,
)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    loss: LossConfig,
    mask: Tensor | None = None,
    student_hidden: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    reduction: str = "mean",
    student_layers: list[Tensor] | None = None,
    teacher_layers: list[Tensor] | None = None,
) -> LossOutput:
    """Weighted sum of the active terms (those with weight > 0); inactive ones are not computed.

    Args:
        student_logits: ``(batch, seq, vocab)``, already aligned with ``labels``.
        teacher_logits: ``(batch, seq, vocab)``; needed only when ``loss.kl > 0``.
        labels: ``(batch, seq)`` next-token ids, -100 where there is no target.
        loss: the term weights, the temperature and the logit term's divergence
            (``loss.divergence``, :func:`~lmdistill.loss.divergences.divergence_of`). The
            logit term is named after its divergence (:func:`lmdistill.loss.divergences.logit_term_name`:
            ``kl`` for forward KL, else e.g. ``jsd``); the others after their weight field.
        mask: ``(batch, seq)``; used by every term. CE also skips labels == -100, so it may
            count fewer positions than the logit term and cos/mse.
        student_hidden, teacher_hidden: ``(batch, seq, dim)``; needed when cos or mse > 0.
        reduction: ``"mean"`` or ``"sum"``, applied to each term.
        student_layers, teacher_layers: paired intermediate layer outputs (see
            :func:`layer_alignment_loss`); needed when align_cos or align_mse > 0.

    Raises:
        ValueError: an active term lacks its inputs (checked before anything is computed).
    """
    _check_reduction(reduction)
    logit = divergence_of(loss) if loss.kl > 0 else None
    hidden = {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden}
    layers = {"student_layers": student_layers, "teacher_layers": teacher_layers}
    # (name, weight field, inputs it needs, how to compute it). Lambdas look the loss functions
    # up at call time, so only active terms ever run.
    table: list[tuple[str, str, dict[str, object], Callable[[], Tensor]]] = [
        (logit.term_name if logit else "kl", "kl", {"teacher_logits": teacher_logits},
         lambda: logit(student_logits, teacher_logits, mask, loss.temperature, reduction)),
        ("ce", "ce", {}, lambda: causal_lm_loss(student_logits, labels, mask, reduction)),
        ("cos", "cos", hidden, lambda: cosine_loss(student_hidden, teacher_hidden, mask, reduction)),
        ("mse", "mse", hidden, lambda: mse_loss(student_hidden, teacher_hidden, mask, reduction)),
        ("align_cos", "align_cos", layers,
         lambda: layer_alignment_loss(student_layers, teacher_layers, "cos", mask, reduction)),
        ("align_mse", "align_mse", layers,
         lambda: layer_alignment_loss(student_layers, teacher_layers, "mse", mask, reduction)),
    ]
    active = [(name, getattr(loss, field), field, needs, fn) for name, field, needs, fn in table
              if getattr(loss, field) > 0]
    for name, w, field, needs, _ in active:  # all checks first: fail before any expensive work
        missing = [k for k, v in needs.items() if v is None]
        if missing:
            raise ValueError(
                f"loss term {name!r} has weight {w} but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} None; pass "
                f"{' and '.join(missing)} or set loss.{field} to 0"
            )

    terms: dict[str, Tensor] = {}
    total: Tensor | None = None
    for name, w, _, _, fn in active:
        value = fn()
        terms[name] = value
        total = w * value if total is None else total + w * value
    assert total is not None  # LossConfig guarantees at least one active term
    return LossOutput(total=total, terms=terms)

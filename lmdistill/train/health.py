"""A run's health: non-finite steps stopped before they reach the weights, divergence warned of."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .. import dist
from ..config import RunConfig
from ..errors import NonFiniteError
from ..loss.divergences import LOGIT_TERMS
from .rundir import RunDir
from .setup import Setup


# The config fields that most often make each loss term non-finite (besides train.lr); the
# logit term is logged under its divergence's name (kl, reverse_kl, jsd, ...).
_TERM_CAUSES = {
    **{name: "loss.temperature and loss.kl" for name in LOGIT_TERMS}, "ce": "loss.ce and the data", "cos": "loss.cos",
    "mse": "loss.mse", "align_cos": "loss.align_cos", "align_mse": "loss.align_mse",
}


def check_finite_step(setup: Setup, metrics: dict[str, float], grad_norm: float) -> None:
    """Raise :class:`NonFiniteError` naming the likely cause when a step's loss or gradient
    norm is NaN or infinite (every rank sees the same summed values, so all raise together)."""
    train = setup.config.train
    bad = {name: value for name, value in metrics.items() if not math.isfinite(value)}
    if not bad and math.isfinite(grad_norm):
        return
    weights = non_finite_parameter(setup)
    if weights is not None:
        cause = optimiser_fault(weights, train)
    elif bad:
        terms = [name for name in bad if name != "loss"]
        if terms:
            fields = "; ".join(f"{name}: check {_TERM_CAUSES.get(name, 'its weight')}" for name in terms)
        else:  # every term finite, their weighted sum not
            fields = f"the weighted sum overflowed: check the loss weights ({loss_weights_text(setup.config)})"
        cause = (f"the loss is non-finite ({', '.join(f'{k}={v}' for k, v in bad.items())}) with finite student "
                 f"weights ({fields}; or lower train.lr, now {train.lr:g})")
    else:
        cause = (f"the gradient norm is {grad_norm} with a finite loss: check the loss weights "
                 f"({loss_weights_text(setup.config)}) or lower train.lr ({train.lr:g})")
    raise NonFiniteError(cause)


def loss_weights_text(config: RunConfig) -> str:
    """The active loss weights as ``loss.kl=5, loss.ce=2, ...``."""
    return ", ".join(f"loss.{name}={getattr(config.loss, name):g}" for name in config.loss.active_terms())


def optimiser_fault(parameter: str, train) -> str:
    eps32 = float(np.float32(train.adam_eps))
    return (f"the optimiser step made the student's weights non-finite ({parameter}) from finite gradients; check "
            f"train.adam_eps ({train.adam_eps:g}, {eps32:g} in float32) and train.lr ({train.lr:g})")


def non_finite_stop(run: RunDir, step: int, cause: object, start_removed: bool) -> NonFiniteError:
    """The error that ends a run at a non-finite step: the cause, and how to go on."""
    latest = run.latest_checkpoint()
    if start_removed:
        how = "nothing was kept; fix that value and start the run again"
    elif latest is not None:
        how = (f"nothing non-finite was checkpointed and {latest.name} is intact: fix that value in {run.config} and "
               f"continue with lmdistill distill --resume {run.root}")
    else:
        how = (f"no checkpoint was written yet: fix that value in {run.config} and lmdistill distill --resume "
               f"{run.root} starts the run again")
    return NonFiniteError(f"training stopped at step {step}: {cause}; {how}")


class ValidationWatch:
    """Warns when validation perplexity climbs an order of magnitude above its best so far:
    training is diverging (a learning rate too high, clipping off), and the run would
    otherwise end "done" with a useless student."""

    FACTOR = 10.0

    def __init__(self, config: RunConfig, rows: list[dict[str, Any]] = ()) -> None:
        self.train = config.train
        self.best, self.best_step = math.inf, 0
        self.warnings: list[str] = []
        for row in rows:
            if "val_ppl" in row:
                self.see(row["step"], row["val_ppl"], quiet=True)

    def see(self, step: int, ppl: float, quiet: bool = False) -> None:
        if ppl < self.best:
            self.best, self.best_step = ppl, step
        elif not ppl < self.FACTOR * self.best:  # NaN included
            fix = f"lower train.lr ({self.train.lr:g})"
            if self.train.max_grad_norm == 0:
                fix += " or turn gradient clipping back on (train.max_grad_norm, now 0)"
            warning = (f"validation perplexity {ppl:.4g} at step {step} is over {self.FACTOR:g}x its best "
                       f"({self.best:.4g} at step {self.best_step}): training is diverging; {fix}")
            self.warnings.append(warning)
            if not quiet:
                print(f"[lmdistill] warning: {warning}")


def non_finite_parameter(setup: Setup) -> str | None:
    """The name of a student parameter holding a NaN or an infinity (on any rank), or None."""
    found = next((name for name, param in setup.student.named_parameters()
                  if not torch.isfinite(dist.local_shard(param.detach())).all()), None)
    anywhere = dist.max_across({"bad": float(found is not None)}, setup.ranks, setup.device)["bad"] > 0
    if not anywhere:
        return None
    return found or "a parameter held by another process"

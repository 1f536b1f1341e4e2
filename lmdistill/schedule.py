"""Training budgets and the learning-rate schedule laid over them.

A budget is a number of optimiser steps (given directly or as tokens) or a number of
training seconds. The schedule is a function of *progress*, the fraction of the budget
done once the current step ends, so one formula serves both: for a step budget progress is
``(step + 1) / total_steps``; for a time budget it is the training time used so far plus
the mean step time, over the budget. Time counts training steps only (not validation or
checkpoint writes), so a resumed run continues the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_factor(progress: float, warmup: float, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier at ``progress`` in (0, 1].

    Linear warm-up over the first ``warmup`` fraction, then ``linear``, ``cosine`` or
    ``constant`` decay to ``min_ratio`` at progress 1.
    """
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress <= warmup:
        return progress / warmup
    if schedule == "constant":
        return 1.0
    p = (progress - warmup) / (1 - warmup) if warmup < 1 else 1.0
    decay = 0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else 1 - p
    return min_ratio + (1 - min_ratio) * decay


@dataclass(frozen=True)
class Budget:
    """When a run ends: after ``total_steps`` steps, or after ``seconds`` of training (or both)."""

    total_steps: int | None
    seconds: float | None

    @classmethod
    def from_config(cls, max_steps: int | None, max_tokens: int | None, max_minutes: float | None,
                    tokens_per_step: int) -> Budget:
        steps = [s for s in (max_steps, max_tokens and max(1, max_tokens // tokens_per_step)) if s]
        return cls(min(steps) if steps else None, max_minutes * 60 if max_minutes else None)

    def done(self, step: int, elapsed: float) -> bool:
        if self.total_steps is not None and step >= self.total_steps:
            return True
        return self.seconds is not None and elapsed >= self.seconds

    def progress_after(self, step: int, elapsed: float) -> float:
        """Fraction of the budget done once step ``step`` (0-based) ends; the step budget leads."""
        if self.total_steps is not None:
            return (step + 1) / self.total_steps
        assert self.seconds is not None
        mean_step = elapsed / step if step else self.seconds / 1000  # first step: a small guess
        return min(1.0, (elapsed + mean_step) / self.seconds)

    def warmup_fraction(self, warmup: float) -> float:
        """``warmup`` as a fraction of the budget (given as a fraction, or as steps)."""
        if warmup < 1:
            return warmup
        if self.total_steps is None:
            raise ValueError("with a time budget give train.warmup as a fraction of the budget (e.g. 0.05)")
        return min(1.0, warmup / self.total_steps)

    def estimated_total_steps(self, step: int, elapsed: float) -> int | None:
        """For the progress bar: the steps this budget allows at the speed measured so far."""
        if self.total_steps is not None:
            return self.total_steps
        if step == 0 or self.seconds is None:
            return None
        return max(step, round(self.seconds / (elapsed / step)))

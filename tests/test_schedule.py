"""Budgets and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest

from lmdistill.schedule import Budget, lr_factor


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_step_schedule_shape(schedule):
    budget = Budget(total_steps=100, seconds=None)
    warmup = budget.warmup_fraction(10)  # 10 steps
    factors = [lr_factor(budget.progress_after(s, 0.0), warmup, schedule, 0.1) for s in range(100)]
    # Linear warm-up over exactly 10 steps: 0.1, 0.2, ..., 1.0. (Schedules are plain Python float64
    # arithmetic, identical on every CPU; approx's default 1e-6 only absorbs the ~1e-16 rounding.)
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    if schedule == "constant":
        assert factors[10:] == [1.0] * 90
        return
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1)  # reaches min_lr_ratio on the last step
    # Half-way through the decay: linear gives the mid value, cosine too (cos(pi/2) = 0).
    mid = lr_factor(0.1 + 0.45, 0.1, schedule, 0.1)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5)


def test_cosine_matches_formula():
    for p in (0.2, 0.37, 0.8):
        expected = 0.0 + 1.0 * 0.5 * (1 + math.cos(math.pi * (p - 0.1) / 0.9))
        assert lr_factor(p, 0.1, "cosine", 0.0) == pytest.approx(expected)


def test_token_budget_becomes_steps():
    assert Budget.from_config(None, 10_000, None, tokens_per_step=1024).total_steps == 9
    assert Budget.from_config(5, 10_000, None, tokens_per_step=1024).total_steps == 5
    assert Budget.from_config(None, None, 2.0, tokens_per_step=1024) == Budget(None, 120.0)


def test_time_budget_progress_and_end():
    budget = Budget(total_steps=None, seconds=100.0)
    assert 0 < budget.progress_after(0, 0.0) < 0.01  # first step: tiny lr, not zero
    assert budget.progress_after(10, 50.0) == pytest.approx(0.55)  # 50 s used + 5 s mean step
    assert budget.progress_after(30, 99.0) == 1.0
    assert not budget.done(10, 99.9) and budget.done(10, 100.0)
    assert budget.estimated_total_steps(10, 50.0) == 20
    assert budget.warmup_fraction(0.05) == 0.05
    with pytest.raises(ValueError, match="fraction"):
        budget.warmup_fraction(100)


def test_steps_and_time_together_end_at_whichever_comes_first():
    budget = Budget(total_steps=50, seconds=10.0)
    assert budget.done(50, 1.0) and budget.done(3, 10.0) and not budget.done(3, 1.0)
    assert budget.progress_after(24, 9.0) == 0.5  # the step budget drives the schedule

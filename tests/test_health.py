"""A non-finite step names the loss term and the config fields behind it (train/health.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmdistill import dist
from lmdistill.config import LossConfig, RunConfig
from lmdistill.errors import NonFiniteError
from lmdistill.train.health import check_finite_step

from .helpers import tiny_llama


@pytest.mark.parametrize("term", ["kl", "jsd", "reverse_kl"])
def test_a_non_finite_logit_term_is_named_as_logged(term):
    """Whatever its divergence, the logit term is traced to loss.temperature and loss.kl, under
    the name metrics.jsonl gives it."""
    config = RunConfig(loss=LossConfig(divergence="forward_kl" if term == "kl" else term))
    setup = SimpleNamespace(config=config, student=tiny_llama(num_layers=1), ranks=dist.SINGLE,
                            device=torch.device("cpu"))
    with pytest.raises(NonFiniteError, match=rf"\({term}: check loss.temperature and loss.kl; or lower train.lr"):
        check_finite_step(setup, {"loss": math.inf, term: math.inf, "ce": 2.5}, grad_norm=1.0)
    with pytest.raises(NonFiniteError, match=r"weighted sum overflowed: check the loss weights "
                                             r"\(loss.kl=5, loss.ce=2, loss.cos=1\)"):
        check_finite_step(setup, {"loss": math.inf, term: 1.0, "ce": 2.5}, grad_norm=1.0)
    check_finite_step(setup, {"loss": 1.0, term: 1.0, "ce": 2.5}, grad_norm=1.0)  # finite: no error

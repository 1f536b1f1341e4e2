"""How a run computes its logit terms (loss.objective.logit_path): the fused lm_head loss where it
gives the same terms, else full logits, with the reason stated."""

from __future__ import annotations

import re

import pytest
from torch import nn

from lmdistill.config import LossConfig
from lmdistill.loss.objective import logit_path

from .helpers import tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def models():
    return tiny_llama(num_layers=2), tiny_llama(num_layers=1, seed=1), tiny_gpt2(n_layer=1, vocab_size=97)


def scaled(model: nn.Module) -> nn.Module:
    """``model`` with logits scaled after its lm_head (as Cohere's ``logit_scale`` does)."""
    model.config.logit_scale = 0.5
    return model


def test_plain_heads_and_forward_kl_take_the_fused_path(models):
    teacher, student, gpt2 = models
    assert logit_path(LossConfig(), teacher, student) == (256, "fused with the lm_head, 256 positions per chunk "
                                                                 "(loss.chunk_tokens)")
    assert logit_path(LossConfig(chunk_tokens=7), gpt2, student).chunk_tokens == 7  # GPT-2's head has no bias


@pytest.mark.parametrize("loss, use_teacher, student_scaled, chunk_tokens, reason", [
    ({"chunk_tokens": 0}, True, False, 0, r"^full logits \(loss.chunk_tokens=0\)$"),
    ({"kl": 0, "ce": 0}, True, False, 0, r"^none \(loss.kl and loss.ce are 0\)$"),
    ({"divergence": "jsd"}, True, False, 0,
     r"^full logits, loss.chunk_tokens=256 ignored: loss.divergence=jsd has no fused path \(forward_kl only\)$"),
    ({"divergence": "tv", "kl": 0}, True, False, 256, "^fused"),  # the divergence is off: CE alone is fused
    ({}, True, True, 0, r"ignored: the student's logits are not a plain linear head \(logit_scale\)$"),
    ({"divergence": "reverse_kl"}, True, True, 0,
     r"loss.divergence=reverse_kl has no fused path \(forward_kl only\); the student's logits are not a plain"),
])
def test_full_logits_where_the_fused_path_would_differ(models, loss, use_teacher, student_scaled, chunk_tokens,
                                                       reason):
    teacher, student, _ = models
    student = scaled(tiny_llama(num_layers=1)) if student_scaled else student
    path = logit_path(LossConfig(**loss), teacher if use_teacher else None, student)
    assert path.chunk_tokens == chunk_tokens
    assert re.search(reason, path.reason), path.reason


def test_the_teacher_counts_only_when_its_logits_are_read(models):
    _, student, _ = models
    teacher = tiny_llama(num_layers=1)
    teacher.lm_head = nn.Sequential(teacher.lm_head)  # not a plain nn.Linear: the fused loss cannot read it
    assert logit_path(LossConfig(), teacher, student) == (
        0, "full logits, loss.chunk_tokens=256 ignored: the teacher's logits are not a plain linear head (Sequential)")
    assert logit_path(LossConfig(kl=0), teacher, student).chunk_tokens == 256  # CE only: the student's head alone
    assert logit_path(LossConfig(), None, student).chunk_tokens == 256  # stored targets: no teacher head


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_training_forwards_build_no_kv_cache(make, fused, monkeypatch):
    # A key/value cache is for generation; in a training step it would only hold a copy of every
    # layer's keys and values until the step's outputs are freed (600 MB for GPT-2 at 8 x 1024).
    import torch
    from transformers import cache_utils

    from lmdistill.loss.objective import forward_model

    def refuse(*args, **kwargs):
        raise AssertionError("a training forward built a KV cache")

    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", refuse)
    model = make()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    logits, states = forward_model(model, ids, want_hidden=True, fused=fused, want_layers=False)
    assert states[-1].shape[:2] == (2, 8)
    with pytest.raises(AssertionError, match="KV cache"):
        model(input_ids=ids)  # the model's own default would have built one

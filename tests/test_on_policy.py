"""On-policy distillation: the student's own samples, scored by the teacher on the sampled tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmdistill.config import ConfigError
from lmdistill.recipe import load_config
from lmdistill.train.on_policy import is_on_policy_step, sample_generator, student_continuations
from lmdistill.train.run import run_training
from lmdistill.train.setup import build_setup
from lmdistill.train.step import step_loss

from .helpers import tiny_gpt2, tiny_llama, tiny_run_overrides


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_continuations_are_the_students_samples(family):
    student = (tiny_llama(num_layers=2, vocab_size=97) if family == "llama" else tiny_gpt2(n_layer=2, vocab_size=97))
    student = student.double()
    blocks = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    input_ids, labels = blocks[:, :-1], blocks[:, 1:]
    ids, continued, mask = student_continuations(student, input_ids, labels, 5, 0.8, torch.Generator().manual_seed(7))
    # The prompt is the data's; the labels are the inputs shifted by one; the mask keeps the sampled labels.
    assert torch.equal(ids[:, :5], input_ids[:, :5]) and torch.equal(continued[:, :-1], ids[:, 1:])
    assert mask[:, :4].sum() == 0 and bool(mask[:, 4:].all())
    # Reference: the same draws, without the KV cache (the whole prefix each time), in a plain loop.
    generator = torch.Generator().manual_seed(7)
    sequence = input_ids[:, :5]
    with torch.no_grad():
        for _ in range(17 - 5):
            logits = student(input_ids=sequence).logits[:, -1].float()
            draw = torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1, generator=generator)
            sequence = torch.cat([sequence, draw], dim=1)
    assert torch.equal(torch.cat([ids, continued[:, -1:]], dim=1), sequence)
    assert not torch.equal(ids[:, 5:], input_ids[:, 5:])  # the data's own continuation is gone


def test_steps_are_chosen_by_seed_and_fraction():
    config = load_config(None, ["train.max_steps=1", "loss.on_policy_fraction=0.3", "train.seed=4"])
    chosen = [is_on_policy_step(config, step) for step in range(1, 2001)]
    assert chosen == [is_on_policy_step(config, step) for step in range(1, 2001)]  # the same on every call
    assert 0.27 < np.mean(chosen) < 0.33  # 2,000 draws: 3 standard deviations are about 0.03
    off = load_config(None, ["train.max_steps=1"])
    assert not any(is_on_policy_step(off, step) for step in range(1, 100))
    draws = [torch.randint(0, 10**9, (1,), generator=sample_generator(config, 5, i, 0, torch.device("cpu"))).item()
             for i in range(2)]
    assert draws[0] != draws[1]  # micro-batches draw apart


@pytest.fixture(scope="module")
def pair(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("on_policy")
    _, _, base = tiny_run_overrides(root, gpt2_tokenizer)
    return root, [*base, "train.checkpoint_every=2", "train.max_steps=4", "loss.on_policy_prompt_tokens=8"]


@pytest.mark.parametrize("chunk_tokens", [0, 16])
def test_the_on_policy_loss_is_the_divergence_on_the_sampled_tokens(pair, chunk_tokens):
    _, overrides = pair
    config = load_config(None, [*overrides, "loss.on_policy_fraction=1", f"loss.chunk_tokens={chunk_tokens}",
                                "loss.temperature=2.0", "loss.kl=3.0"])
    setup = build_setup(config)
    setup.student.double(), setup.teacher.double()
    blocks = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(3))
    ids, labels, mask = student_continuations(setup.student, blocks[:, :-1], blocks[:, 1:], 8, 1.0,
                                              torch.Generator().manual_seed(5))
    out = step_loss(setup, ids, labels, mask=mask)
    # Reference in float64, written plainly: 3 * T^2 * sum over sampled positions of KL(p_t || p_s) at T=2.
    with torch.no_grad():
        s = setup.student(input_ids=ids).logits.double() / 2.0
        t = setup.teacher(input_ids=ids).logits.double() / 2.0
    kl = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    expected = 3.0 * 4.0 * kl[mask].sum()
    assert set(out.terms) == {"kl"}  # no CE or hidden-state terms on the student's own samples
    torch.testing.assert_close(out.total.double(), expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(out.terms["kl"].double(), 4.0 * kl[mask].sum(), rtol=1e-9, atol=0)


def test_a_run_with_on_policy_steps_logs_them_and_resumes_the_same(pair):
    root, overrides = pair
    config = load_config(None, [*overrides, "loss.on_policy_fraction=0.5"])
    whole = root / "whole"
    run_training(config, whole, progress=False)
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    flags = [r["on_policy"] for r in steps]
    assert flags == [float(is_on_policy_step(config, s)) for s in range(1, 5)] and 0 < sum(flags) < 4
    assert all(set(r) >= {"kl"} and ("ce" not in r) == bool(r["on_policy"]) for r in steps)
    # Stopped after step 2 and resumed: the same steps on-policy, the same samples, the same losses.
    split = root / "split"
    run_training(config, split, stop_at_step=2, progress=False)
    run_training(None, split, resume=True, progress=False)
    again = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again if "loss" in r] == [r["loss"] for r in steps]


def test_on_policy_settings_are_checked():
    with pytest.raises(ConfigError, match="on_policy_fraction"):
        load_config(None, ["train.max_steps=1", "loss.on_policy_fraction=1.5"])
    with pytest.raises(ConfigError, match="data.block_size"):
        load_config(None, ["train.max_steps=1", "loss.on_policy_fraction=0.5", "data.block_size=64",
                           "loss.on_policy_prompt_tokens=64"])
    with pytest.raises(ConfigError, match="live teacher"):
        load_config(None, ["train.max_steps=1", "loss.on_policy_fraction=0.5", "model.teacher_cache=/x", "loss.cos=0"])
    with pytest.raises(ConfigError, match="loss.kl"):
        load_config(None, ["train.max_steps=1", "loss.on_policy_fraction=0.5", "loss.kl=0"])

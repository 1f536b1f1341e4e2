"""lmdistill.measure.speed: the one prefill/decode timing loop and its round-robin schedule,
and that bench, generate --compare (and the demo, in test_demo) all time through it."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig

from lmdistill.cli import main
from lmdistill.generate import SamplingError
from lmdistill.measure import speed
from lmdistill.measure.bench import BenchConfig, bench_models

from .helpers import save_with_tokenizer, tiny_gpt2, tiny_llama

PROMPT = torch.tensor([[5, 17, 42, 8, 33, 2, 71, 64]])


def _wide(model):
    for p in model.parameters():  # wide logits so greedy output varies from step to step
        p.data.mul_(8.0)
    return model


class ForwardCountingClock(speed.Clock):
    """A clock whose time is the number of forward calls the model has started: an interval's
    "seconds" are the forwards that ran inside it. Exact, unlike wall time on a shared machine."""

    def __init__(self, model) -> None:
        super().__init__(torch.device("cpu"))
        self.inputs: list[int] = []  # sequence length fed to each forward, in order
        model.register_forward_pre_hook(lambda module, args, kwargs: self.inputs.append(_length(args, kwargs)),
                                        with_kwargs=True)

    def mark(self) -> float:
        return float(len(self.inputs))


def _length(args, kwargs) -> int:
    ids = args[0] if args else kwargs["input_ids"]
    return ids.shape[1]


@pytest.mark.parametrize("make", [lambda: tiny_gpt2(2, seed=3), lambda: tiny_llama(2, seed=3)], ids=["gpt2", "llama"])
def test_the_loop_times_one_prefill_and_exactly_n_decode_steps_apart(make):
    model = _wide(make())
    clock = ForwardCountingClock(model)
    run = speed.time_generation(model, PROMPT, 10, clock)
    # The prefill interval holds exactly the one forward of the whole prompt, the decode
    # interval exactly the 10 single-token forwards.
    assert clock.inputs == [PROMPT.shape[1]] + [1] * 10
    assert (run.prefill_seconds, run.decode_seconds) == (1.0, 10.0)
    assert run.new_ids.shape == (11,)  # the prefill's token, then one per decode step


@pytest.mark.parametrize("make", [lambda: tiny_gpt2(2, seed=3), lambda: tiny_llama(2, seed=3)], ids=["gpt2", "llama"])
def test_the_loop_decodes_what_generate_decodes(make):
    model = _wide(make())
    run = speed.time_generation(model, PROMPT, 10, speed.Clock(torch.device("cpu")))
    assert run.prefill_seconds > 0 and run.decode_seconds > 0
    config = GenerationConfig(max_new_tokens=11, min_new_tokens=11, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), generation_config=config)[0, 8:]
    assert run.new_ids.tolist() == expected.tolist()
    assert len(set(expected.tolist())) > 1
    assert speed.time_forward(model, torch.randint(0, 90, (2, 12)), speed.Clock(torch.device("cpu"))) > 0


def test_eos_does_not_stop_the_loop():
    model = _wide(tiny_gpt2(2, seed=3))
    first = speed.time_generation(model, PROMPT, 1, speed.Clock(torch.device("cpu"))).new_ids[0].item()
    model.config.eos_token_id = model.generation_config.eos_token_id = first  # generate() would stop at once
    clock = ForwardCountingClock(model)
    assert speed.time_generation(model, PROMPT, 6, clock).new_ids.shape == (7,)
    assert clock.inputs == [PROMPT.shape[1]] + [1] * 6


def test_round_robin_warms_up_each_model_then_interleaves_the_phases():
    log = []
    phases = [lambda i, timed, name=name: log.append((name, i, timed)) for name in ("gen", "fwd")]
    speed.round_robin(3, phases, repeats=2, warmup=1)
    warmup = [(name, i, False) for i in range(3) for name in ("gen", "fwd")]
    per_repeat = [("gen", i, True) for i in range(3)] + [("fwd", i, True) for i in range(3)]
    assert log == warmup + per_repeat * 2


@pytest.fixture
def spy(monkeypatch):
    """Every call of the one timing loop: (layers, prompt ids, new tokens, training flag)."""
    calls: list = []
    original = speed.time_generation

    def recording(model, prompt_ids, new_tokens, clock):
        calls.append((model.config.n_layer, prompt_ids.clone(), new_tokens, model.training))
        return original(model, prompt_ids, new_tokens, clock)

    monkeypatch.setattr(speed, "time_generation", recording)
    return calls


def test_generation_speeds_interleaves_and_summarises(spy):
    models = [tiny_gpt2(2, seed=1).train(), tiny_gpt2(1, seed=2)]
    speeds = speed.generation_speeds(models, [PROMPT, PROMPT[:, :5]], new_tokens=6, repeats=3, warmup=2)
    assert [(layers, n) for layers, _, n, _ in spy] == [(2, 6), (2, 6), (1, 6), (1, 6)] + [(2, 6), (1, 6)] * 3
    assert not any(training for *_, training in spy)  # measured in eval mode ...
    assert models[0].training and not models[1].training  # ... and each model's mode restored
    assert [s.prompt_tokens for s in speeds] == [8, 5]
    for s in speeds:
        assert s.new_tokens == 6 and len(s.prefill_seconds) == len(s.decode_seconds) == 3  # timed runs only
        g = s.generation()
        assert g["tokens_per_second"] == s.tokens_per_second > 0 and math.isfinite(g["spread"]) and g["spread"] >= 0
        # Two float64 formulas from the same median time: a few roundings (~1e-16) apart.
        assert g["ms_per_token"] * g["tokens_per_second"] == pytest.approx(1000.0, rel=1e-9)
        assert s.prefill()["tokens_per_second"] == pytest.approx(s.prompt_tokens / sorted(s.prefill_seconds)[1],
                                                                 rel=1e-12)


def test_too_long_request_fails_before_any_model_runs(spy):
    models = [tiny_gpt2(1), tiny_gpt2(2)]  # 128 positions
    with pytest.raises(SamplingError, match="positions"):
        speed.generation_speeds(models, [PROMPT, PROMPT], new_tokens=121)
    assert spy == []
    with pytest.raises(ValueError, match="shape"):
        speed.generation_speeds(models[:1], [PROMPT[0]], new_tokens=4)  # (P,) rather than (1, P)
    with pytest.raises(ValueError):
        speed.generation_speeds([], [], new_tokens=4)
    with pytest.raises(ValueError, match="repeats"):
        speed.generation_speeds(models[:1], [PROMPT], new_tokens=4, repeats=0)


def test_bench_and_generate_compare_time_through_the_one_loop(spy, tmp_path, gpt2_tokenizer, capsys):
    """bench and generate --compare both measure by speed.time_generation (the demo: test_demo)."""
    folders = [str(save_with_tokenizer(tiny_gpt2(n, seed=n), gpt2_tokenizer, tmp_path / f"l{n}")) for n in (2, 1)]
    config = BenchConfig(prompt_tokens=8, new_tokens=5, repeats=2, warmup=1, batch_size=1, seq_len=8, device="cpu")
    results = bench_models(folders, config, progress=False)
    # Warm-up and timed runs of both models, then one untimed run each for peak memory.
    assert [(layers, n) for layers, _, n, _ in spy] == [(2, 5), (1, 5)] * 4
    assert all(ids.shape == (1, 8) for _, ids, _, _ in spy)
    assert "5 single-token forwards" in results["protocol"]

    spy.clear()
    assert main(["generate", folders[0], "--compare", folders[1], "--prompt", "Hello there", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    prompt = gpt2_tokenizer("Hello there")["input_ids"]
    assert [(layers, ids[0].tolist(), n) for layers, ids, n, _ in spy] == [(2, prompt, 4), (1, prompt, 4)] * (
        speed.WARMUP + speed.REPEATS)
    line = out.splitlines()[-1]
    assert line.startswith("--- speed (batch 1, greedy (argmax), KV cache") and "4 single-token forwards" in line
    assert f"median over repeats" in line and "(1.00x)" in line and "4 tokens in" in line

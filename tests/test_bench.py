"""lmdistill.bench.bench_models / format_bench on tiny saved GPT-2s with the real GPT-2 tokenizer."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from transformers import GenerationConfig

from lmdistill import bench
from lmdistill.bench import BenchConfig, bench_models, format_bench, measure_forward, measure_generation
from lmdistill.models.arch import count_parameters
from lmdistill.models.fingerprint import tokenizer_fingerprint
from lmdistill.models.load import load_model
from tests.helpers import save_with_tokenizer, tiny_gpt2, tiny_llama

SMALL = BenchConfig(prompt_tokens=16, new_tokens=8, repeats=2, warmup=1, batch_size=2, seq_len=32, device="cpu")
LAYERS = (3, 2, 1)  # one model per depth; the depth tells the models apart in the call log


@pytest.fixture(scope="module")
def folders(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("bench_models")
    return [str(save_with_tokenizer(tiny_gpt2(n, seed=n), gpt2_tokenizer, root / f"l{n}")) for n in LAYERS]


@pytest.fixture(scope="module")
def recorded(folders):
    """One bench run with every phase call logged as (phase, layers, input ids, new tokens)."""
    log: list = []
    original_gen, original_fwd = bench.measure_generation, bench.measure_forward

    def gen(model, prompt_ids, new_tokens, clock):
        log.append(("generation", model.config.n_layer, prompt_ids.clone(), new_tokens, model.training))
        return original_gen(model, prompt_ids, new_tokens, clock)

    def fwd(model, batch_ids, clock):
        log.append(("forward", model.config.n_layer, batch_ids.clone(), None, model.training))
        return original_fwd(model, batch_ids, clock)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "measure_generation", gen)
        mp.setattr(bench, "measure_forward", fwd)
        results = bench_models(folders, SMALL, progress=False)
    return results, log


def test_phases_are_interleaved_round_robin(recorded):
    _, log = recorded
    order = [(phase, layers) for phase, layers, *_ in log]
    warmup = [(phase, n) for n in LAYERS for phase in ("generation", "forward")]  # SMALL.warmup == 1
    per_repeat = [("generation", n) for n in LAYERS] + [("forward", n) for n in LAYERS]
    memory = [(phase, n) for n in LAYERS for phase in ("generation", "forward")]  # untimed, one model at a time
    assert order == warmup + per_repeat * SMALL.repeats + memory
    assert not any(training for *_, training in log)  # measured in eval mode


def test_every_model_gets_the_same_inputs(recorded):
    _, log = recorded
    prompts = [ids for phase, _, ids, _, _ in log if phase == "generation"]
    batches = [ids for phase, _, ids, _, _ in log if phase == "forward"]
    assert prompts[0].shape == (1, SMALL.prompt_tokens)
    assert batches[0].shape == (SMALL.batch_size, SMALL.seq_len)
    assert all(torch.equal(p, prompts[0]) for p in prompts)
    assert all(torch.equal(b, batches[0]) for b in batches)
    assert all(n == SMALL.new_tokens for phase, _, _, n, _ in log if phase == "generation")
    assert len(set(batches[0].flatten().tolist())) > 10  # real text, not one repeated id


def test_results_have_every_section_positive_and_finite(recorded, folders):
    results, _ = recorded
    assert results["device"] == "cpu"
    assert results["threads"] == torch.get_num_threads()
    assert results["torch"] == torch.__version__
    for words in ("16", "8 single-token", "greedy", "KV cache", "min_new_tokens", "2 timed repeats", "warm-up",
                  "median", "spread", "perf_counter", "batch 2 x 32", results["memory_method"]):
        assert words in results["protocol"]
    assert [m["model"] for m in results["models"]] == folders
    for m in results["models"]:
        for phase in ("generation", "prefill", "forward"):
            for key, value in m[phase].items():
                assert math.isfinite(value) and value >= 0, (phase, key, value)
            assert m[phase]["tokens_per_second"] > 0
        g = m["generation"]
        assert g["ms_per_token"] > 0
        # Two float64 formulas from the same median time: a few roundings (~1e-16) apart.
        assert g["ms_per_token"] * g["tokens_per_second"] == pytest.approx(1000.0, rel=1e-9)
        assert m["peak_memory_bytes"] >= m["weights_bytes"] > 0


def test_speedups_are_relative_to_the_first_model(recorded):
    models = recorded[0]["models"]
    assert models[0]["speedup"] == {"generation": 1.0, "prefill": 1.0, "forward": 1.0}
    for m in models[1:]:
        for phase in ("generation", "prefill", "forward"):
            expected = m[phase]["tokens_per_second"] / models[0][phase]["tokens_per_second"]
            assert m["speedup"][phase] == pytest.approx(expected, rel=1e-12)  # the same float64 division


def test_parameters_and_size_on_disk_match_the_saved_models(recorded, folders):
    for entry, folder in zip(recorded[0]["models"], folders):
        model = load_model(folder)
        assert entry["parameters"] == {
            "total": count_parameters(model),
            "non_embedding": count_parameters(model, exclude_embeddings=True),
        }
        weights = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]
        assert weights and entry["size_on_disk_bytes"] == sum(os.path.getsize(f) for f in weights)
        assert entry["weights_bytes"] == 4 * count_parameters(model) + sum(b.numel() * 4 for b in model.buffers())
    # deeper model: more parameters, bigger file
    sizes = [m["size_on_disk_bytes"] for m in recorded[0]["models"]]
    assert sizes == sorted(sizes, reverse=True)


def test_results_are_json_serialisable(recorded):
    import json

    assert json.loads(json.dumps(recorded[0])) == recorded[0]


def test_hub_id_has_no_size_on_disk():
    assert bench._size_on_disk_of("some-org/some-model") == (None, None)


def test_format_bench_one_row_per_model_and_the_protocol(recorded):
    results = copy.deepcopy(recorded[0])
    results["models"][1]["size_on_disk_bytes"] = None  # as for a hub id
    text = format_bench(results)
    assert f"Protocol: {results['protocol']}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == len(results["models"])
    for row, m in zip(rows, results["models"]):
        assert row.startswith(f"| {m['model']} |")
        assert len(row.strip("|").split("|")) == 8
    assert "(1.00x)" in rows[0]
    assert f"({results['models'][2]['speedup']['generation']:.2f}x)" in rows[2]
    assert " n/a " in rows[1]


# --------------------------------------------------------------------------- the measurement itself


@pytest.mark.parametrize("make", [lambda: tiny_gpt2(2, seed=3), lambda: tiny_llama(2, seed=3)], ids=["gpt2", "llama"])
def test_measure_generation_decodes_what_generate_decodes(make):
    model = make()
    for p in model.parameters():  # wide logits so greedy output varies from step to step
        p.data.mul_(8.0)
    prompt = torch.tensor([[5, 17, 42, 8, 33, 2, 71, 64]])
    clock = bench._Clock(torch.device("cpu"))
    prefill, decode, new_ids = measure_generation(model, prompt, 10, clock)
    assert prefill > 0 and decode > 0
    assert new_ids.shape == (11,)  # first token from the prefill, then one per decode step
    config = GenerationConfig(max_new_tokens=11, min_new_tokens=11, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)[0, 8:]
    assert new_ids.tolist() == expected.tolist()
    assert len(set(expected.tolist())) > 1
    assert measure_forward(model, torch.randint(0, 90, (2, 12)), clock) > 0


def test_peak_memory_sees_a_transient_allocation():
    memory = bench._PeakMemory(torch.device("cpu"))
    if "ru_maxrss" in memory.method:
        pytest.skip("lifetime high-water mark only; cannot measure a fresh peak here")
    size = 64 * 2**20

    def run():
        x = torch.ones(size // 4)  # touched, so resident
        assert x.sum() > 0
        del x

    assert memory.measure(run) >= 0.9 * size
    # The peak was reset, not carried over (which would read >= size every time). The reading is
    # process-wide, so another thread allocating meanwhile can inflate one attempt: take the least.
    assert min(memory.measure(lambda: None) for _ in range(3)) < size / 4


def test_psutil_sampler_sees_a_held_allocation():
    pytest.importorskip("psutil")
    import time

    size = 64 * 2**20

    def run():
        x = torch.ones(size // 4)
        time.sleep(0.05)  # held long enough for the sampling thread to see it
        del x

    assert bench._sampled_rss_growth(run) >= 0.9 * size


# --------------------------------------------------------------------------- errors before any weights load


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the checks")

    monkeypatch.setattr(bench, "load_model", refuse)


def test_mismatched_tokenizers_are_refused(folders, gpt2_tokenizer, tmp_path, no_weights):
    other = copy.deepcopy(gpt2_tokenizer)
    other.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(gpt2_tokenizer)
    odd = str(save_with_tokenizer(tiny_gpt2(1), other, tmp_path / "odd"))
    with pytest.raises(ValueError, match="tokenizer") as err:
        bench_models([folders[0], odd, folders[1]], SMALL, progress=False)
    assert odd in str(err.value) and folders[0] in str(err.value) and folders[1] in str(err.value)


def test_prompt_plus_new_tokens_beyond_context_is_refused(folders, no_weights):
    # The tiny models have 128 positions.
    with pytest.raises(ValueError, match=r"prompt_tokens \+ new_tokens.*128") as err:
        bench_models(folders[:2], BenchConfig(prompt_tokens=100, new_tokens=29, device="cpu"), progress=False)
    assert folders[0] in str(err.value)
    with pytest.raises(ValueError, match="seq_len 129"):
        bench_models(folders[:1], BenchConfig(prompt_tokens=16, new_tokens=8, seq_len=129, device="cpu"), progress=False)


def test_no_models_is_refused():
    with pytest.raises(ValueError, match="at least one model"):
        bench_models([], SMALL, progress=False)


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompt_tokens", 0),
        ("new_tokens", -1),
        ("new_tokens", 2.0),
        ("repeats", 0),
        ("repeats", True),
        ("warmup", -1),
        ("batch_size", 0),
        ("seq_len", 0),
        ("device", "gpu"),
        ("device", "cuda:x"),
    ],
)
def test_invalid_bench_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BenchConfig(**{field: value})


def test_bench_config_accepts_edge_values():
    BenchConfig(warmup=0, repeats=1, device="cuda:1")  # validated here, resolved only when benchmarking

"""lmdistill.measure.bench: bench_models / format_bench on tiny saved GPT-2s with the real GPT-2
tokenizer, parameter counts and size on disk."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from lmdistill.measure import bench, speed
from lmdistill.measure.bench import BenchConfig, bench_models, format_bench, parameter_counts, size_on_disk
from lmdistill.models.arch import count_parameters
from lmdistill.models.fingerprint import tokenizer_fingerprint
from lmdistill.models.load import load_model
from tests.helpers import save_with_tokenizer, tiny_gpt2

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
    original_gen, original_fwd = speed.time_generation, speed.time_forward

    def gen(model, prompt_ids, new_tokens, clock):
        log.append(("generation", model.config.n_layer, prompt_ids.clone(), new_tokens, model.training))
        return original_gen(model, prompt_ids, new_tokens, clock)

    def fwd(model, batch_ids, clock):
        log.append(("forward", model.config.n_layer, batch_ids.clone(), None, model.training))
        return original_fwd(model, batch_ids, clock)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speed, "time_generation", gen)
        mp.setattr(speed, "time_forward", fwd)
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
    assert (results["kind"], results["version"]) == ("bench", 2)
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
    text = "\n".join(format_bench(results))
    assert f"Protocol: {results['protocol']}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == len(results["models"])
    for row, m in zip(rows, results["models"]):
        assert row.startswith(f"| {m['model']} |")
        assert len(row.strip("|").split("|")) == 8
    assert "(1.00x)" in rows[0]
    assert f"({results['models'][2]['speedup']['generation']:.2f}x)" in rows[2]
    assert " - " in rows[1]
    spread = max(m[phase]["spread"] for m in results["models"] for phase in ("generation", "prefill", "forward"))
    assert text.endswith(f"Largest run-to-run spread: {100 * spread:.0f}% (cpu, {results['threads']} threads).")


def test_format_bench_leaves_out_what_no_model_has(recorded):
    # As the demo's result: parameters and generation only; a missing value shows as "-".
    results = {"protocol": "p", "models": [{k: m[k] for k in ("model", "parameters", "generation", "prefill", "speedup")}
                                           for m in recorded[0]["models"]]}
    del results["models"][1]["prefill"]
    lines = format_bench(results)
    assert lines[2] == "| model | params (total / non-emb) | gen tok/s (speed-up) | ms/token | prefill tok/s |"
    assert lines[5].endswith(" | - |")
    assert format_bench({"models": []}) == ["(benchmark results hold no models)"]


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


# --------------------------------------------------------------------------- parameters and size on disk

V, D, L, P = 50257, 32, 2, 128


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(L)


def test_parameter_counts_tied_gpt2_by_hand(model):
    assert model.lm_head.weight is model.transformer.wte.weight
    per_layer = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * 4 * D + 4 * D) + (4 * D * D + D)
    wte, wpe = V * D, P * D
    total = wte + wpe + L * per_layer + 2 * D  # + ln_f; lm_head shares wte
    assert parameter_counts(model) == {"total": total, "non_embedding": total - wte - wpe}


def test_size_on_disk_matches_weight_files(model, tmp_path, gpt2_tokenizer):
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"x" * 1000)  # not weights
    weights = list(folder.glob("*.safetensors"))
    assert weights
    size = size_on_disk(folder)
    assert size == sum(os.path.getsize(f) for f in weights)
    # fp32, tied embedding stored once, plus a small header.
    n = parameter_counts(model)["total"]
    assert 4 * n <= size < 4 * n + 65536

    # A folder in both formats counts the safetensors only; a .bin-only folder counts the .bin.
    (folder / "pytorch_model.bin").write_bytes(b"y" * 5000)
    assert size_on_disk(folder) == size
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    torch.save(model.state_dict(), bin_only / "pytorch_model.bin")
    assert size_on_disk(bin_only) == os.path.getsize(bin_only / "pytorch_model.bin")


def test_size_on_disk_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        size_on_disk(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        size_on_disk(tmp_path)

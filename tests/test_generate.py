"""lmdistill.generate on a tiny seeded GPT-2 with the real GPT-2 tokenizer (its speed is measured
by lmdistill.measure.speed: test_measure_speed)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmdistill.generate import SamplingConfig, _CallbackStreamer, continuation_text, generate, generate_ids

PROMPT = "The quick brown fox"
V, D, L, P = 50257, 32, 2, 128


def _tiny_gpt2(n_layer: int = L, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # initializer_range 0.2 (not 0.02) gives logits spread enough that greedy output varies
    # from step to step instead of repeating one token, which makes the comparisons meaningful.
    config = GPT2Config(n_layer=n_layer, n_embd=D, n_head=2, n_positions=P, vocab_size=V, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_gpt2()


@pytest.fixture(scope="module")
def prompt_ids(gpt2_tokenizer):
    return torch.tensor([gpt2_tokenizer(PROMPT)["input_ids"]])


def _manual_greedy(model, prompt_ids: torch.Tensor, steps: int, eos: int, penalty: float = 1.0) -> list[int]:
    """Argmax decoding with a full forward pass per step and no KV cache."""
    ids = prompt_ids.clone()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[0, -1].clone()
            if penalty != 1.0:  # CTRL repetition penalty, as transformers defines it
                seen = ids[0].unique()
                s = logits[seen]
                logits[seen] = torch.where(s < 0, s * penalty, s / penalty)
            nxt = int(logits.argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == eos:
                break
    return out


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_matches_manual_argmax_without_cache(model, gpt2_tokenizer, prompt_ids, penalty):
    config = SamplingConfig(max_new_tokens=20, repetition_penalty=penalty)
    got = generate_ids(model, prompt_ids, config).tolist()
    assert got == _manual_greedy(model, prompt_ids, 20, gpt2_tokenizer.eos_token_id, penalty)
    assert generate_ids(model, prompt_ids, config).tolist() == got  # deterministic
    text = generate(model, gpt2_tokenizer, PROMPT, config)
    assert text == gpt2_tokenizer.decode(got, skip_special_tokens=True)
    assert text == generate(model, gpt2_tokenizer, PROMPT, config)


def test_repetition_penalty_changes_greedy_output(model, prompt_ids):
    plain = generate_ids(model, prompt_ids, SamplingConfig(max_new_tokens=20)).tolist()
    penalised = generate_ids(model, prompt_ids, SamplingConfig(max_new_tokens=20, repetition_penalty=1.5)).tolist()
    assert len(set(plain)) < len(plain), "fixture should repeat tokens, else the penalty has nothing to do"
    assert penalised != plain


def test_generate_restores_training_mode(gpt2_tokenizer):
    m = _tiny_gpt2().train()
    a = generate(m, gpt2_tokenizer, PROMPT, SamplingConfig(max_new_tokens=8))
    b = generate(m, gpt2_tokenizer, PROMPT, SamplingConfig(max_new_tokens=8))
    assert a == b  # dropout off during generation
    assert m.training


def test_stream_pieces_concatenate_to_returned_text(model, gpt2_tokenizer):
    for config in (SamplingConfig(max_new_tokens=24), SamplingConfig(max_new_tokens=24, temperature=1.0, seed=3)):
        pieces: list[str] = []
        text = generate(model, gpt2_tokenizer, PROMPT, config, stream=pieces.append)
        assert len(pieces) > 1  # streamed as it went, not once at the end
        assert all(pieces)
        assert "".join(pieces) == text
        assert text == generate(model, gpt2_tokenizer, PROMPT, config)  # streaming changes nothing


def test_streamer_holds_back_split_multibyte_characters(gpt2_tokenizer):
    # Emoji and CJK are split across several byte-level BPE tokens; no piece may show U+FFFD.
    prompt_ids = gpt2_tokenizer("Say:")["input_ids"]
    target = " héllo 🙂🎉 wörld 日本語\nnext line."
    new_ids = gpt2_tokenizer(target)["input_ids"]
    assert any("\ufffd" in gpt2_tokenizer.decode([t]) for t in new_ids), "test needs a split character"
    pieces: list[str] = []
    streamer = _CallbackStreamer(gpt2_tokenizer, prompt_ids, pieces.append)
    streamer.put(torch.tensor([prompt_ids]))  # generate() pushes the prompt first
    for t in new_ids:
        streamer.put(torch.tensor([t]))
    streamer.end()
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == target == continuation_text(gpt2_tokenizer, prompt_ids, new_ids)


def test_sampling_is_seeded_and_seeds_differ(model, prompt_ids):
    def sample(seed):
        return generate_ids(model, prompt_ids, SamplingConfig(max_new_tokens=20, temperature=5.0, seed=seed)).tolist()

    first = sample(0)
    assert sample(0) == first
    others = [sample(s) for s in (1, 2, 3)]
    assert all(o != first for o in others)
    greedy = generate_ids(model, prompt_ids, SamplingConfig(max_new_tokens=20)).tolist()
    assert first != greedy


def test_sampling_leaves_global_rng_alone(model, prompt_ids):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    generate_ids(model, prompt_ids, SamplingConfig(max_new_tokens=5, temperature=1.0, seed=7))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("knobs", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_reduce_sampling_to_greedy(model, prompt_ids, knobs):
    greedy = generate_ids(model, prompt_ids, SamplingConfig(max_new_tokens=15)).tolist()
    for seed in (0, 1):
        sampled = generate_ids(model, prompt_ids, SamplingConfig(max_new_tokens=15, temperature=5.0, seed=seed, **knobs))
        assert sampled.tolist() == greedy


def test_model_generation_defaults_do_not_leak_in(prompt_ids):
    # A hub generation_config (GPT-2's has top_k=50) must not override an explicit "no limit".
    m = _tiny_gpt2()
    greedy = generate_ids(m, prompt_ids, SamplingConfig(max_new_tokens=15)).tolist()
    m.generation_config.top_k = 1
    m.generation_config.top_p = 1e-6
    sampled = generate_ids(m, prompt_ids, SamplingConfig(max_new_tokens=15, temperature=5.0)).tolist()
    assert sampled != greedy


def test_generation_stops_at_eos(prompt_ids):
    m = _tiny_gpt2()
    first = generate_ids(m, prompt_ids, SamplingConfig(max_new_tokens=10)).tolist()[0]
    m.generation_config.eos_token_id = first
    assert generate_ids(m, prompt_ids, SamplingConfig(max_new_tokens=10)).tolist() == [first]


def test_too_long_request_fails_before_generating(model, gpt2_tokenizer, prompt_ids):
    with pytest.raises(ValueError, match="positions"):
        generate_ids(model, prompt_ids, SamplingConfig(max_new_tokens=P))


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("seed", -1),
    ],
)
def test_invalid_sampling_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})

"""Perplexity against an independent float64 reference, on tiny GPT-2 and Llama models."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmdistill.evaluate import PerplexityProtocol, PerplexityResult, perplexity

VOCAB = 97
CONTEXT = 64


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=CONTEXT)
    return GPT2LMHeadModel(cfg).float().eval()


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=CONTEXT,
    )
    return LlamaForCausalLM(cfg).float().eval()


BUILDERS = {"gpt2": _gpt2, "llama": _llama}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def models(request):
    """(float32 model, float64 copy for the reference)."""
    model = BUILDERS[request.param]()
    return model, copy.deepcopy(model).double().eval()


def _stream(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.uint16)


def reference_nll(model64, tokens: np.ndarray, window: int, stride: int, max_tokens=None):
    """Sum of -log p(token t | its context), one un-batched float64 forward per token.

    Written from the protocol's definition, not from the implementation: token ``t`` is
    scored by the first window ``[k*stride, k*stride + window)`` that contains it, with
    the tokens before it in that window as context; it is not scored when it is that
    window's first token (nothing there predicts it).
    """
    toks = tokens if max_tokens is None else tokens[:max_tokens]
    total, count = 0.0, 0
    for t in range(1, len(toks)):
        k = 0
        while k * stride + window <= t:
            k += 1
        begin = k * stride
        if begin == t:
            continue
        ctx = torch.tensor(toks[begin:t].astype(np.int64)).unsqueeze(0)
        with torch.no_grad():
            logits = model64(input_ids=ctx).logits[0, -1].double()
        total += -F.log_softmax(logits, dim=-1)[int(toks[t])].item()
        count += 1
    return total, count


def expected_count(n: int, window: int, stride: int) -> int:
    # Disjoint: each window loses its first token. Overlapping: only the stream's first.
    return n - math.ceil(n / window) if stride == window else n - 1


CASES = [
    # (window, stride, stream length, max_tokens)
    pytest.param(16, None, 64, None, id="disjoint-exact-multiple"),
    pytest.param(16, None, 70, None, id="disjoint-ragged-tail"),
    pytest.param(16, None, 65, None, id="disjoint-1-token-tail"),
    pytest.param(16, 5, 70, None, id="overlap"),
    pytest.param(20, 7, 90, 53, id="overlap-max-tokens"),
    pytest.param(12, None, 90, 41, id="disjoint-max-tokens"),
    pytest.param(8, 1, 30, None, id="stride-1"),
    pytest.param(64, 32, 100, None, id="full-context"),
]


@pytest.mark.parametrize("window,stride,n,max_tokens", CASES)
def test_matches_float64_reference(models, window, stride, n, max_tokens):
    model, model64 = models
    tokens = _stream(n)
    proto = PerplexityProtocol(window=window, stride=stride, max_tokens=max_tokens, batch_size=3)
    res = perplexity(model, tokens, proto)

    eff_stride = window if stride is None else stride
    ref_nll, ref_count = reference_nll(model64, tokens, window, eff_stride, max_tokens)
    used = n if max_tokens is None else min(n, max_tokens)
    assert res.tokens_scored == ref_count == expected_count(used, window, eff_stride)
    assert proto.tokens_scored(n) == res.tokens_scored
    # float32 model against its float64 copy: ~1e-6 relative on each logit after 2 layers, so
    # ~1e-6 absolute on each NLL (~4.6) with random signs over <= 90 tokens (measured: <= 2% of
    # these bounds on every kernel); one token scored with the wrong context is off by ~1e-2.
    assert res.nll_sum == pytest.approx(ref_nll, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(ref_nll / ref_count), rel=1e-5)
    assert f"{res.tokens_scored:,} of {used:,} tokens scored" in res.protocol


@pytest.mark.parametrize("stride", [None, 6])
def test_batch_size_does_not_change_result(models, stride):
    model, _ = models
    tokens = _stream(150, seed=2)
    results = [
        perplexity(model, tokens, PerplexityProtocol(window=16, stride=stride, batch_size=b))
        for b in (1, 3, 64)
    ]
    for r in results[1:]:
        assert r.tokens_scored == results[0].tokens_scored
        # Other batch shapes may take other float32 matmul kernels (here they round alike:
        # measured equal); 1e-5 is float32 rounding, a window scored twice or lost is ~1%.
        assert r.nll_sum == pytest.approx(results[0].nll_sum, rel=1e-5)


@pytest.mark.parametrize("count", [2, 3, 7])
def test_shards_sum_to_the_whole_stream(models, count):
    """Data-parallel validation: each process scores every count-th batch; the shards' sums
    are the whole stream's, and no batch is scored twice or skipped."""
    model, _ = models
    tokens = _stream(150, seed=4)
    proto = PerplexityProtocol(window=16, batch_size=2)  # 10 windows, 5 batches
    whole = perplexity(model, tokens, proto)
    parts = [perplexity(model, tokens, proto, shard=(i, count)) for i in range(count)]
    assert sum(p.tokens_scored for p in parts) == whole.tokens_scored
    # The same batches, summed in float64 in another order (~1e-16): 1e-6 is far below one
    # batch's share (~20%).
    assert sum(p.nll_sum for p in parts) == pytest.approx(whole.nll_sum, rel=1e-6)
    assert all(p.tokens_scored > 0 for p in parts[: min(count, 5)])
    if count == 7:  # more shards than batches: the extra ones score nothing
        assert parts[6].tokens_scored == 0 and math.isnan(parts[6].perplexity)
    with pytest.raises(ValueError, match="shard must be"):
        perplexity(model, tokens, proto, shard=(2, 2))


def test_numpy_and_torch_streams_agree(models):
    model, _ = models
    tokens = _stream(80, seed=3)
    proto = PerplexityProtocol(window=16, stride=8)
    a = perplexity(model, tokens, proto)
    b = perplexity(model, torch.from_numpy(tokens.astype(np.int64)), proto)
    c = perplexity(model, tokens.astype(np.int32).tolist(), proto)
    # The same ids, so the same ops (measured: equal to the bit); 1e-6 is far below any token's share.
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-6)
    assert a.nll_sum == pytest.approx(c.nll_sum, rel=1e-6)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_uniform_logits_give_vocab_size(name):
    model = BUILDERS[name]()
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
        norm = model.transformer.ln_f if name == "gpt2" else model.model.norm
        for p in norm.parameters():
            p.zero_()
    for stride in (None, 5):
        res = perplexity(model, _stream(70), PerplexityProtocol(window=16, stride=stride))
        # All logits are exactly 0: every NLL is float32 log(97) (rel. rounding 6e-8), and exp of
        # the mean turns its ~3e-7 absolute error into ~3e-7 relative (measured: 0.2% of bounds).
        assert res.perplexity == pytest.approx(VOCAB, rel=1e-4)
        assert res.nll_sum == pytest.approx(res.tokens_scored * math.log(VOCAB), rel=1e-5)


def test_training_mode_restored():
    model = _gpt2()
    model.train()
    model.transformer.h[0].eval()  # a mixed state must come back exactly, not as all-train
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(m.training),
                                              with_kwargs=True)
    perplexity(model, _stream(40), PerplexityProtocol(window=16))
    handle.remove()
    assert seen and not any(seen)  # scored in eval mode (no dropout)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_training_mode_restored_after_error():
    model = _gpt2()
    model.train()

    def boom(*_):
        raise RuntimeError("forward failed")

    handle = model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        perplexity(model, _stream(40), PerplexityProtocol(window=16))
    handle.remove()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(window=1), "window"),
        (dict(window=0), "window"),
        (dict(window=16, stride=0), "stride"),
        (dict(window=16, stride=17), "stride"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_tokens=1), "max_tokens"),
        (dict(window=16.0), "window"),
    ],
)
def test_invalid_protocol_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PerplexityProtocol(**kwargs)


@pytest.mark.parametrize(
    "tokens,proto,match",
    [
        (_stream(40), PerplexityProtocol(window=CONTEXT + 1), "context"),
        (_stream(40).reshape(2, 20), PerplexityProtocol(window=16), "1-D"),
        (_stream(40).astype(np.float32), PerplexityProtocol(window=16), "integer"),
        (np.array([3]), PerplexityProtocol(window=16), "at least 2"),
        (np.array([3, VOCAB]), PerplexityProtocol(window=16), "vocabulary"),
        (np.array([3, -1]), PerplexityProtocol(window=16), ">= 0"),
    ],
)
def test_invalid_inputs_raise_before_work(tokens, proto, match):
    with pytest.raises(ValueError, match=match):
        perplexity(_gpt2(), tokens, proto)


def test_describe_states_the_protocol():
    d = PerplexityProtocol(window=512, max_tokens=32768).describe()
    assert "windows of 512 tokens" in d and "stride 512" in d and "disjoint" in d
    assert "first 32,768 tokens" in d and "first token of the stream not scored" in d
    s = PerplexityProtocol(window=1024, stride=256).describe(10_000)
    assert "stride 256" in s and "768 to 1,023 tokens of context" in s
    assert "whole stream" in s and "9,999 of 10,000 tokens scored" in s
    assert PerplexityProtocol(window=512).describe(1000).endswith("998 of 1,000 tokens scored")


def test_result_to_dict_and_progress():
    res = perplexity(_gpt2(), _stream(40), PerplexityProtocol(window=16), progress=True, desc="t")
    assert isinstance(res, PerplexityResult)
    d = res.to_dict()
    assert set(d) == {"perplexity", "nll_sum", "tokens_scored", "seconds", "protocol"}
    assert d["tokens_scored"] == 40 - 3 and d["seconds"] >= 0

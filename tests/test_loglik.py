"""Harness-compatible log-likelihood primitives against plain float64 reference computations.

Every reference below is one un-batched float64 forward per request (or per token), with the
tokens built by hand, so batching, padding, truncation and slicing bugs all show up.
"""

from __future__ import annotations

import copy
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmdistill.evaluate import loglik
from lmdistill.evaluate.rolling import count_words, score_documents
from tests.helpers import tiny_gpt2, tiny_llama

EOT = 50256
TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about."
)


# Tiny models: intra-op threads only add contention (several times slower on a busy 2-core box).
pytestmark = pytest.mark.usefixtures("one_thread")

# Tolerances: the float32 model's log-probability of one token is within ~2e-6 of its float64
# copy's (logits of ~1e-6 relative error after 2 layers, log-softmax over 50,257); sums over n
# tokens are then within ~n x 2e-6 at worst. LL_ABS covers requests of <= 50 tokens; rolling sums
# over the ~40-token TEXT get 1e-3 and the two documents of score_documents 2e-3. One token
# scored under the wrong context or left out moves a sum by > 1e-2.
LL_ABS = 1e-4


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(n_layer=2)


@pytest.fixture(scope="module")
def gpt2_64(gpt2):
    return copy.deepcopy(gpt2).double()


def ref_logprobs(model64, ids: list[int], keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log p(ids[i] | ids[:i]) for the last ``keep`` i (0: all i >= 1), and the argmaxes."""
    with torch.no_grad():
        logits = model64(input_ids=torch.tensor([ids[:-1]]), logits_to_keep=keep).logits[0]
    logp = logits.double().log_softmax(-1)
    target = torch.tensor(ids[1:])[-len(logp):]
    return logp.gather(-1, target[:, None]).squeeze(-1), logp.argmax(-1)


def ref_request(model64, ctx: list[int], cont: list[int], max_len: int) -> tuple[float, bool]:
    ids = (ctx + cont)[-(max_len + 1):]
    lp, am = ref_logprobs(model64, ids, keep=len(cont))
    return float(lp.sum()), bool((am == torch.tensor(cont)).all())


# --------------------------------------------------------------------------- model facts


def test_max_length_rule(gpt2_tokenizer):
    assert loglik.max_length(tiny_gpt2(n_layer=1), gpt2_tokenizer) == 128  # config.n_positions
    assert loglik.max_length(tiny_llama(num_layers=1), gpt2_tokenizer) == 128  # max_position_embeddings
    no_config = SimpleNamespace(config=SimpleNamespace())
    assert loglik.max_length(no_config, SimpleNamespace(model_max_length=1024)) == 1024
    unset = SimpleNamespace(model_max_length=loglik.TOKENIZER_INFINITY)
    assert loglik.max_length(no_config, unset) == 2048
    # Config wins over the tokenizer; n_positions wins over n_ctx; a nested text_config wins.
    both = SimpleNamespace(config=SimpleNamespace(n_ctx=64, n_positions=32))
    assert loglik.max_length(both, gpt2_tokenizer) == 32
    nested = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=1200,
                                                    text_config=SimpleNamespace(max_position_embeddings=4096)))
    assert loglik.max_length(nested, gpt2_tokenizer) == 4096


def test_prefix_token_id(gpt2_tokenizer):
    assert loglik.prefix_token_id(gpt2_tokenizer) == EOT
    assert loglik.prefix_token_id(SimpleNamespace(bos_token_id=1, eos_token_id=2)) == 1
    assert loglik.prefix_token_id(SimpleNamespace(bos_token_id=None, eos_token_id=2)) == 2


def test_encode_pair_moves_trailing_space(gpt2_tokenizer):
    tok = gpt2_tokenizer
    ctx, cont = loglik.encode_pair(tok, "The cat sat on the ", "mat")
    assert ctx == tok.encode("The cat sat on the")
    assert cont == tok.encode(" mat")
    # Naive separate encoding would leave a lone space token at the end of the context.
    assert tok.encode("The cat sat on the ")[-1] != ctx[-1]
    # Two spaces: both move.
    ctx2, cont2 = loglik.encode_pair(tok, "Hello  ", "world")
    assert ctx2 == tok.encode("Hello") and ctx2 + cont2 == tok.encode("Hello  world")


def test_encode_pair_splits_whole_string_by_count(gpt2_tokenizer):
    tok = gpt2_tokenizer
    # "cat" + "s" merges into " cats": the split is by the context's token count.
    whole = tok.encode("The cats sat")
    ctx, cont = loglik.encode_pair(tok, "The cat", "s sat")
    assert ctx == tok.encode("The cat") and cont == whole[len(ctx):]
    assert ctx + cont != tok.encode("The cat") + tok.encode("s sat")
    with pytest.raises(ValueError, match="non-empty"):
        loglik.encode_pair(tok, "", "x")


# --------------------------------------------------------------------------- loglikelihood


def _greedy_request(model64, tok) -> tuple[str, str]:
    """A (context, continuation) whose single continuation token is the model's argmax."""
    for ctx in ["The cat sat on the", "Once upon a time", "I went to the", "She said that", "Hello"]:
        ids = tok.encode(ctx)
        with torch.no_grad():
            t = int(model64(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        s = tok.decode([t])
        if s.strip() and loglik.encode_pair(tok, ctx, s) == (ids, [t]):
            return ctx, s
    pytest.skip("no round-tripping greedy token found")


def test_loglikelihood_matches_reference(gpt2, gpt2_64, gpt2_tokenizer):
    tok = gpt2_tokenizer
    greedy = _greedy_request(gpt2_64, tok)
    requests = [
        ("The cat sat on the", " mat"),
        ("", "Nothing came before this sentence."),      # empty context -> EOT prefix
        (" ".join(["word"] * 150), " and then more"),    # longer than 128: left-truncated
        ("Question: what is it?", " an extraordinarily long answer"),
        greedy,
    ]
    out = loglik.loglikelihood(gpt2, tok, requests, batch_size=2)
    max_len = 128
    expected_tokens = [
        (tok.encode("The cat sat on the"), tok.encode(" mat")),
        ([EOT], tok.encode("Nothing came before this sentence.")),
        (tok.encode(" ".join(["word"] * 150)), tok.encode(" and then more")),
        (tok.encode("Question: what is it?"), tok.encode(" an extraordinarily long answer")),
        (tok.encode(greedy[0]), tok.encode(greedy[1])),
    ]
    assert len(expected_tokens[2][0]) + len(expected_tokens[2][1]) > max_len + 1
    for (ll, is_greedy), (ctx, cont) in zip(out, expected_tokens):
        ref_ll, ref_greedy = ref_request(gpt2_64, ctx, cont, max_len)
        assert ll == pytest.approx(ref_ll, abs=LL_ABS)
        assert is_greedy == ref_greedy
    assert [g for _, g in out] == [False, False, False, False, True]
    # is_greedy needs *every* token greedy: the greedy token followed by an unlikely one is not.
    (_, both), = loglik.loglikelihood(gpt2, tok, [(greedy[0], greedy[1] + " zebra")])
    ctx, cont = loglik.encode_pair(tok, greedy[0], greedy[1] + " zebra")
    assert len(cont) >= 2 and cont[0] == expected_tokens[4][1][0]
    assert both is ref_request(gpt2_64, ctx, cont, max_len)[1] is False


def test_empty_context_when_continuation_starts_with_prefix(gpt2, gpt2_64, gpt2_tokenizer):
    # The harness then uses the continuation's own first token as the context.
    (ll, _), = loglik.loglikelihood(gpt2, gpt2_tokenizer, [("", "<|endoftext|>Hello there")])
    cont = gpt2_tokenizer.encode("Hello there")
    assert ll == pytest.approx(ref_request(gpt2_64, [EOT], cont, 128)[0], abs=LL_ABS)


def test_left_truncation_with_max_length_override(gpt2, gpt2_64, gpt2_tokenizer):
    tok = gpt2_tokenizer
    ctx, cont = TEXT, " and see the watery part of the world"
    c, k = tok.encode(ctx), tok.encode(cont)
    (short, _), = loglik.loglikelihood(gpt2, tok, [(ctx, cont)], max_length=12)
    (full, _), = loglik.loglikelihood(gpt2, tok, [(ctx, cont)])
    assert short == pytest.approx(ref_request(gpt2_64, c, k, 12)[0], abs=LL_ABS)
    assert full == pytest.approx(ref_request(gpt2_64, c, k, 128)[0], abs=LL_ABS)
    assert abs(short - full) > 1e-3  # the truncation really changed the conditioning
    with pytest.raises(ValueError, match="exceeds max_length"):
        loglik.loglikelihood(gpt2, tok, [(ctx, cont)], max_length=len(k) - 1)
    with pytest.raises(ValueError):
        loglik.loglikelihood(gpt2, tok, [("", "")])


def test_batch_size_does_not_change_results(gpt2, gpt2_tokenizer):
    requests = [(TEXT[: 10 * i + 5], " " + w) for i, w in enumerate(["sea", "whale", "a b c d e f", "x", "ship"])]
    requests.append(("", "Only a continuation."))
    runs = [loglik.loglikelihood(gpt2, gpt2_tokenizer, requests, batch_size=b) for b in (1, 3, 64)]
    for other in runs[1:]:
        # Other batch shapes (and padding) may take other float32 kernels: rounding only
        # (measured: <= 1e-6); a padding token attended to would move a request by > 1e-2.
        np.testing.assert_allclose([ll for ll, _ in other], [ll for ll, _ in runs[0]], rtol=0, atol=1e-5)
        assert [g for _, g in other] == [g for _, g in runs[0]]


def test_llama_and_float64(gpt2_tokenizer):
    model = tiny_llama(num_layers=2, vocab_size=50257)
    model64 = copy.deepcopy(model).double()
    requests = [("The cat sat on the", " mat"), ("Hello", " world, how are you today?")]
    out32 = loglik.loglikelihood(model, gpt2_tokenizer, requests, batch_size=2)
    out64 = loglik.loglikelihood(model64, gpt2_tokenizer, requests, batch_size=2)
    for (ctx, cont), (l32, _), (l64, _) in zip(requests, out32, out64):
        ref = ref_request(model64, gpt2_tokenizer.encode(ctx), gpt2_tokenizer.encode(cont), 128)[0]
        assert l64 == pytest.approx(ref, abs=1e-9)  # float64 model: float64 log-softmax, rounding ~1e-14
        assert l32 == pytest.approx(ref, abs=LL_ABS)


def test_training_mode_restored_and_dropout_off(gpt2_64, gpt2_tokenizer):
    model = tiny_gpt2(n_layer=2, dropout=0.5).train()
    requests = [("The cat sat on the", " mat and the dog")]
    (ll, _), = loglik.loglikelihood(model, gpt2_tokenizer, requests)
    assert model.training and all(m.training for m in model.modules())
    c, k = gpt2_tokenizer.encode(requests[0][0]), gpt2_tokenizer.encode(requests[0][1])
    assert ll == pytest.approx(ref_request(gpt2_64, c, k, 128)[0], abs=LL_ABS)  # same weights, seed 0


# --------------------------------------------------------------------------- rolling


def ref_rolling(model64, tokens: list[int], max_len: int) -> float:
    """Per token: log p(t_j | what the harness's window for j shows before it), one forward each.

    Window 0 predicts tokens [0, L) from EOT + tokens; window k >= 1 predicts [kL, min((k+1)L, n))
    and its input is the L tokens before its last target.
    """
    n, total = len(tokens), 0.0
    for j in range(n):
        if j < max_len:
            ctx = [EOT] + tokens[:j]
        else:
            end = min((j // max_len + 1) * max_len, n)
            ctx = tokens[end - max_len - 1 : j]
        lp, _ = ref_logprobs(model64, ctx + [tokens[j]], keep=1)
        total += float(lp[-1])
    return total


def test_rolling_several_windows(gpt2, gpt2_64, gpt2_tokenizer):
    tokens = gpt2_tokenizer.encode(TEXT)
    assert len(tokens) > 2 * 16 and len(tokens) % 16 != 0  # 3+ windows, a short last one
    got = loglik.loglikelihood_rolling(gpt2, gpt2_tokenizer, [TEXT, "short", ""], batch_size=3, max_length=16)
    assert got[0] == pytest.approx(ref_rolling(gpt2_64, tokens, 16), abs=1e-3)
    assert got[2] == 0.0  # no tokens: an empty sum, exactly 0
    # Text shorter than the window = the loglikelihood of the whole text after an empty context.
    (short, _), = loglik.loglikelihood(gpt2, gpt2_tokenizer, [("", "short")])
    assert got[1] == pytest.approx(short, abs=1e-6)  # the same request either way (measured: equal)
    # Full context gives a different number: the windows really cut the conditioning.
    full = loglik.loglikelihood_rolling(gpt2, gpt2_tokenizer, [TEXT])[0]
    assert full == pytest.approx(ref_rolling(gpt2_64, tokens, 128), abs=1e-3)
    assert abs(full - got[0]) > 1e-2
    one_by_one = loglik.loglikelihood_rolling(gpt2, gpt2_tokenizer, [TEXT], batch_size=1, max_length=16)
    assert one_by_one[0] == pytest.approx(got[0], abs=1e-5)  # other batch shapes: float32 rounding only


def test_rolling_windows_cover_every_token_once(gpt2_tokenizer):
    tokens = list(range(1000, 1037))
    windows = [loglik.make_disjoint_window(w) for w in loglik.get_rolling_token_windows(tokens, EOT, 16, 1)]
    assert [cont for _, cont in windows] == [tokens[:16], tokens[16:32], tokens[32:]]
    assert windows[0][0] == [EOT]
    # Each later window: context + targets = the 17 tokens ending at its last target.
    assert windows[1][0] + windows[1][1] == tokens[15:32]
    assert windows[2][0] + windows[2][1] == tokens[20:37]


def test_score_documents(gpt2, gpt2_64, gpt2_tokenizer):
    docs = [" = Title = \n Some text @-@ with a joiner . \n", TEXT]

    def detok(s: str) -> str:
        return s.replace(" @-@ ", "-").replace(" . ", ". ")

    res = score_documents(gpt2, gpt2_tokenizer, docs, detokenize=detok, batch_size=4, max_length=16)
    lls = [ref_rolling(gpt2_64, gpt2_tokenizer.encode(detok(d)), 16) for d in docs]
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    # The harness counts words on the original text, leading/trailing whitespace included.
    assert count_words(docs[0]) == len(docs[0].split()) + 2
    assert (res.documents, res.words, res.bytes) == (2, words, nbytes)
    assert res.tokens == sum(len(gpt2_tokenizer.encode(detok(d))) for d in docs)
    assert res.loglikelihood == pytest.approx(sum(lls), abs=2e-3)
    # exp(-ll / n) with ll within 2e-3 and n >= 40 words: ~5e-5 relative at most (the byte and
    # bit counts divide by more); measured: <= 2% of 1e-4.
    assert res.word_perplexity == pytest.approx(math.exp(-sum(lls) / words), rel=1e-4)
    assert res.byte_perplexity == pytest.approx(math.exp(-sum(lls) / nbytes), rel=1e-4)
    assert res.bits_per_byte == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-4)
    assert set(res.to_dict()) >= {"word_perplexity", "byte_perplexity", "bits_per_byte", "seconds"}
    raw = score_documents(gpt2, gpt2_tokenizer, docs, batch_size=4, max_length=16)
    assert raw.words == res.words and raw.loglikelihood != pytest.approx(res.loglikelihood, abs=1e-3)

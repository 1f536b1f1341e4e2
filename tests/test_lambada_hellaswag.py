"""LAMBADA and HellaSwag scoring against float64 reference computations on hand-made items."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch

from lmdistill.evaluate import hellaswag, lambada
from tests.helpers import tiny_gpt2

EOT = 50256


# Tiny models: intra-op threads only add contention (several times slower on a busy 2-core box).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(n_layer=2, seed=1)


@pytest.fixture(scope="module")
def gpt2_64(gpt2):
    return copy.deepcopy(gpt2).double()


def ref(model64, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum of float64 log p(cont | ctx) from one forward, and whether each token is the argmax."""
    ids = ctx + cont
    with torch.no_grad():
        logits = model64(input_ids=torch.tensor([ids[:-1]]), logits_to_keep=len(cont)).logits[0]
    logp = logits.log_softmax(-1)
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


# --------------------------------------------------------------------------- LAMBADA


def test_split_lambada():
    assert lambada.split_lambada("He looked at the sky") == ("He looked at the", " sky")
    assert lambada.split_lambada("Alone") == ("", " Alone")  # harness: empty context
    assert lambada.split_lambada("a\nb c") == ("a\nb", " c")  # only spaces split


def _greedy_passage(model64, tok) -> str:
    """A passage whose last word is a single token the model predicts greedily."""
    for ctx in ["The cat sat on the", "Once upon a time there was a", "I went to the", "She said that the",
                "He looked at the", "They walked into the"]:
        ids = tok.encode(ctx)
        with torch.no_grad():
            t = int(model64(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        word = tok.decode([t])
        if word.startswith(" ") and word[1:].isalpha() and tok.encode(ctx + word) == ids + [t]:
            return ctx + word
    pytest.skip("no greedy single-token word found for this seed")


def test_lambada_score(gpt2, gpt2_64, gpt2_tokenizer):
    tok = gpt2_tokenizer
    docs = [
        {"text": _greedy_passage(gpt2_64, tok)},
        {"text": "She leaned over and whispered the word antidisestablishmentarianism"},
        {"text": "The ship sailed into the harbour at dawn and the crew cheered for the captain"},
    ]
    assert len(tok.encode(" antidisestablishmentarianism")) > 2  # a target of several tokens
    refs = []
    for doc in docs:
        ctx, word = doc["text"].rsplit(" ", 1)
        refs.append(ref(gpt2_64, tok.encode(ctx), tok.encode(" " + word)))
    assert [g for _, g in refs] == [True, False, False]
    out = lambada.score(gpt2, tok, docs, batch_size=2)
    assert out["documents"] == 3
    # Greedy flags are argmaxes: the float32 model agrees with the float64 one because the top
    # two logits of the greedy passage are >= 0.02 apart and float32 logits are within ~1e-6.
    assert out["acc"] == pytest.approx(1 / 3)
    # float32 log-likelihoods of <= 5 target tokens: ~1e-5 absolute, so ~1e-5 relative on
    # exp(mean) (measured: <= 1% of 1e-4); one wrong token or context is off by > 1%.
    assert out["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in refs])), rel=1e-4)
    # Batch 1 vs 2: other matmul shapes, at most float32 rounding apart.
    assert lambada.score(gpt2, tok, docs, batch_size=1) == pytest.approx(out, rel=1e-5)


# --------------------------------------------------------------------------- HellaSwag


def test_preprocess_and_harness_doc():
    assert hellaswag.preprocess(" How to cook [title] Boil water. [step] Add salt  ") == "How to cook. Boil water. Add salt"
    doc = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he IS",
           "endings": ["is using wrap.", "rips [step] tiles  off."], "label": "1"}
    # str.capitalize lower-cases the rest of ctx_b: "he IS" -> "He is".
    assert hellaswag.harness_doc(doc) == {
        "query": "Roof shingle removal: A man is sitting on a roof. He is",
        "choices": ["is using wrap.", "rips tiles off."],
        "gold": 1,
    }


WORDS = ("a it go run the extraordinarily unquestionably sea whale ship harpoon ocean be "
         "incomprehensibilities so quickly and then ran away to").split()


def _candidate(rng: random.Random, i: int) -> dict:
    endings = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) + rng.choice(["", "."]) for _ in range(4)]
    return {"activity_label": "Sailing a small boat far across the cold ocean in winter", "ctx_a": f"Item {i}: the sailors were on deck.", "ctx_b": "they",
            "ctx": f"Item {i}: the sailors were on deck. they", "endings": endings, "label": 0}


def _completion_pred(model64, tok, context: str, endings: list[str]) -> int:
    ctx = tok.encode(context)
    mean_loss = []
    for e in endings:
        end = tok.encode(" " + e)
        mean_loss.append(-ref(model64, ctx, end)[0] / len(end))
    return int(np.argmin(mean_loss))


def _reference_preds(model64, tok, doc) -> tuple[int, int, int, int]:
    """(acc pred, acc_norm pred, pred if the delimiter were counted, completion-style pred)."""
    h = hellaswag.harness_doc(doc)
    lls = np.array([ref(model64, tok.encode(h["query"]), tok.encode(" " + c))[0] for c in h["choices"]])
    chars = np.array([len(c) for c in h["choices"]], dtype=float)
    comp = _completion_pred(model64, tok, doc["ctx"], doc["endings"])
    return int(np.argmax(lls)), int(np.argmax(lls / chars)), int(np.argmax(lls / (chars + 1))), comp


def test_hellaswag_score(gpt2, gpt2_64, gpt2_tokenizer):
    tok = gpt2_tokenizer
    rng = random.Random(0)
    # Pick items where the reference protocols disagree, so each metric is tested on its own:
    # A: acc and acc_norm pick different endings; B: counting the delimiter space would flip
    # acc_norm; C: completion style from the harness query instead of `ctx` would pick another.
    a_items, b_item, c_item = [], None, None
    for i in range(80):
        doc = _candidate(rng, i)
        pred, norm, norm_delim, comp = _reference_preds(gpt2_64, tok, doc)
        if pred != norm and len(a_items) < 2:
            a_items.append((doc, pred, norm, comp))
        elif norm != norm_delim and b_item is None:
            b_item = (doc, pred, norm, comp)
        elif c_item is None and comp != _completion_pred(gpt2_64, tok, hellaswag.harness_doc(doc)["query"], doc["endings"]):
            c_item = (doc, pred, norm, comp)
        if len(a_items) == 2 and b_item and c_item:
            break
    assert len(a_items) == 2 and b_item is not None and c_item is not None
    docs, expect = [], {"acc": 0, "acc_norm": 0, "completion_acc": 0}
    for k, (doc, pred, norm, comp) in enumerate([*a_items, b_item]):
        gold = norm  # gold = the acc_norm choice: acc_norm counts all three, acc not A's
        docs.append(dict(doc, label=str(gold)))
        expect["acc"] += pred == gold
        expect["acc_norm"] += 1
        expect["completion_acc"] += comp == gold
    # One more item with gold = the acc choice, where acc_norm disagrees.
    doc, pred, norm, comp = a_items[0]
    docs.append(dict(doc, label=pred))
    expect["acc"] += 1
    expect["completion_acc"] += comp == pred
    # And one with gold = the completion-style choice from `ctx`.
    doc, pred, norm, comp = c_item
    docs.append(dict(doc, label=comp))
    expect["acc"] += pred == comp
    expect["acc_norm"] += norm == comp
    expect["completion_acc"] += 1
    out = hellaswag.score(gpt2, tok, docs, batch_size=3)
    # The float32 choices equal the float64 ones: in the picked items the best two choices are
    # >= 0.009 nats (per token or per character) apart under every protocol, float32
    # log-likelihoods ~1e-5 from float64. The accuracies are fractions: approx's default 1e-6.
    n = len(docs)
    assert out["documents"] == n
    assert out["acc"] == pytest.approx(expect["acc"] / n)
    assert out["acc_norm"] == pytest.approx(expect["acc_norm"] / n)
    assert out["completion_acc"] == pytest.approx(expect["completion_acc"] / n)
    assert out["acc"] < out["acc_norm"]
    assert hellaswag.score(gpt2, tok, docs, batch_size=1) == out

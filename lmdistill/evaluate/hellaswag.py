"""HellaSwag commonsense completion: harness multiple-choice accuracy and nanoGPT completion style.

Two protocols, both reported, because published numbers use either:

1. lm-evaluation-harness 0.4.13 ``hellaswag`` (``lm_eval/tasks/hellaswag/hellaswag.yaml`` and
   ``utils.py``; scoring in ``ConfigurableTask.construct_requests`` / ``process_results``,
   ``output_type: multiple_choice``, zero-shot):

   * ``query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` --
     note that ``str.capitalize`` also lower-cases the rest of ``ctx_b``;
     ``choices = [preprocess(e) for e in endings]``; ``gold = int(label)``.
   * each choice is one ``loglikelihood`` request ``(query, " " + choice)``: the
     ``target_delimiter`` " " goes to the continuation (``loglik.encode_pair``).
   * ``acc``: the choice of highest summed log-likelihood is gold; ``acc_norm``: the highest
     ``loglikelihood / len(choice)``, where the length is in *characters* of the preprocessed
     choice *without* the delimiter space. Ties go to the lowest index (``np.argmax``).

2. nanoGPT / llm.c completion style (karpathy/build-nanogpt ``hellaswag.py``; llm.c
   ``dev/data/hellaswag.py``), reported as ``completion_acc``:

   * context = the raw ``ctx`` field (no preprocessing, no capitalisation, no activity label),
     tokenised alone; each ending tokenised alone as ``" " + ending``; no BOS/EOS prefix
     (only a tokenizer that adds BOS by itself, such as Llama's, puts one before the context).
   * the prediction is the ending with the lowest *mean* token cross-entropy over its own
     tokens (i.e. log-likelihood divided by its token count); ties go to the lowest index.

Reference values on the 10,042 validation items, GPT-2 124M: harness acc 0.2892 / acc_norm
0.3114; completion style 0.2955 (build-nanogpt's docstring). GPT-2 XL: 0.4004 / 0.5089; 0.4893.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..data.errors import DataError
from .loglik import (
    _resolve_max_length,
    loglikelihood,
    prefix_token_id,
    score_token_requests,
)

__all__ = ["harness_doc", "preprocess", "score"]


def preprocess(text: str) -> str:
    """The harness's ``hellaswag/utils.py::preprocess``: WikiHow bracket artefacts removed."""
    text = text.strip()
    # " [title]" separates a WikiHow title from its step text.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def harness_doc(doc: dict) -> dict:
    """``{"query", "choices", "gold"}`` as the harness's ``process_docs`` builds them."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def _nanogpt_context(doc: dict) -> str:
    # The dataset's ``ctx`` is ctx_a + " " + ctx_b (ctx_a alone when ctx_b is empty).
    if "ctx" in doc:
        return doc["ctx"]
    return doc["ctx_a"] + (" " + doc["ctx_b"] if doc["ctx_b"] else "")


def score(
    model: torch.nn.Module,
    tokenizer,
    docs: list[dict],
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """``{"acc", "acc_norm", "completion_acc", "documents"}`` of ``model`` on HellaSwag items.

    Each item needs ``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``, ``label`` (and
    ``ctx``, else it is rebuilt from ``ctx_a``/``ctx_b``).
    """
    if not docs:
        raise DataError("no HellaSwag items to score; pass a file with at least one item")

    # 1. harness multiple choice: one request per (item, choice), all batched together.
    hdocs = [harness_doc(doc) for doc in docs]
    requests = [(h["query"], " " + choice) for h in hdocs for choice in h["choices"]]
    results = loglikelihood(model, tokenizer, requests, batch_size=batch_size, progress=progress)

    # 2. completion style: context and ending tokenised separately.
    max_len = _resolve_max_length(model, tokenizer, None)
    token_requests, spans = [], []
    for doc in docs:
        ctx = list(tokenizer.encode(_nanogpt_context(doc)))
        ctx = ctx or [prefix_token_id(tokenizer)]  # something must predict the first ending token
        first = len(token_requests)
        for ending in doc["endings"]:
            token_requests.append((ctx, list(tokenizer.encode(" " + ending, add_special_tokens=False))))
        spans.append((first, len(token_requests)))
    completion = score_token_requests(model, token_requests, max_len, batch_size, progress, desc="completions")

    acc = acc_norm = completion_acc = 0
    k = 0
    for h, (lo, hi) in zip(hdocs, spans):
        lls = np.array([ll for ll, _ in results[k : k + len(h["choices"])]], dtype=np.float64)
        k += len(h["choices"])
        lengths = np.array([float(len(c)) for c in h["choices"]])
        with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice: as numpy decides
            pred_norm = int(np.argmax(lls / lengths))
        acc += int(int(np.argmax(lls)) == h["gold"])
        acc_norm += int(pred_norm == h["gold"])
        # Mean cross-entropy over the ending's tokens = -loglikelihood / token count.
        mean_loss = np.array([-completion[i][0] / len(token_requests[i][1]) for i in range(lo, hi)])
        completion_acc += int(int(np.argmin(mean_loss)) == h["gold"])
    n = len(docs)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "completion_acc": completion_acc / n, "documents": n}

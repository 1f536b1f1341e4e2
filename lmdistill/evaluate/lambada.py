"""LAMBADA last-word prediction: the lm-evaluation-harness ``lambada_openai`` task.

Mirrors lm-evaluation-harness 0.4.13 ``lm_eval/tasks/lambada/lambada_openai.yaml`` (zero-shot,
``output_type: loglikelihood``) with ``ConfigurableTask.process_results`` and the ``mean`` /
``perplexity`` aggregations of ``lm_eval/api/metrics.py``:

* context = ``" ".join(text.split(" ")[:-1])`` (``doc_to_text``), target =
  ``" " + text.split(" ")[-1]`` (``doc_to_target``); the context carries no trailing space,
  the target its leading one. A text without a space has an empty context (scored from the
  BOS/EOS prefix token).
* Each pair goes through ``loglik.loglikelihood`` (``HFLM.loglikelihood``): the target may be
  several tokens; its log-likelihood is their sum, and it counts as correct only when every
  target token is the model's argmax (greedy) prediction.
* ``acc = mean(is_greedy)``; ``perplexity = exp(-mean(loglikelihood))`` -- the mean over
  passages of the whole target's log-likelihood, not a per-token perplexity.

Reference (harness, lambada_openai): GPT-2 124M acc ~0.325, perplexity ~40.0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..data.errors import DataError
from .loglik import loglikelihood

__all__ = ["score", "split_lambada"]


def split_lambada(text: str) -> tuple[str, str]:
    """``(context, target)`` of a passage exactly as the harness's Jinja templates split it."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def score(
    model: torch.nn.Module,
    tokenizer,
    docs: list[dict],
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """``{"acc", "perplexity", "documents"}`` of ``model`` on LAMBADA passages ``docs[i]["text"]``."""
    if not docs:
        raise DataError("no LAMBADA passages to score; pass a file with at least one passage")
    requests = [split_lambada(doc["text"]) for doc in docs]
    results = loglikelihood(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    mean_ll = sum(ll for ll, _ in results) / len(results)
    try:
        ppl = math.exp(-mean_ll)
    except OverflowError:
        ppl = math.inf
    return {
        "acc": sum(int(greedy) for _, greedy in results) / len(results),
        "perplexity": ppl,
        "documents": len(docs),
    }

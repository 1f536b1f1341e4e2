"""Document-level perplexity: the lm-evaluation-harness ``wikitext`` protocol.

Mirrors lm-evaluation-harness 0.4.13 ``lm_eval/tasks/wikitext`` (``wikitext.yaml``,
``preprocess_wikitext.process_results``) with the aggregations of ``lm_eval/api/metrics.py``:

* Each document is scored whole by ``loglikelihood_rolling`` (``loglik.py``: disjoint windows
  of the model's max length, the first conditioned on the BOS/EOS prefix token, every token
  scored exactly once). The text scored is ``detokenize(doc)`` when a detokenizer is given
  (the harness's ``doc_to_target: wikitext_detokenizer``), else the document itself.
* Counts come from the *original* document, before detokenisation, as the harness's
  ``process_results`` does: ``words = len(re.split(r"\\s+", doc))`` (so leading or trailing
  whitespace adds an empty "word", exactly as there) and ``bytes = len(doc.encode("utf-8"))``.
* Aggregation is over the corpus, not a mean of per-document values (``weighted_perplexity``
  and ``bits_per_byte`` via ``weighted_mean = sum(LL) / sum(count)``):
  ``word_perplexity = exp(-sum LL / sum words)``, ``byte_perplexity = exp(-sum LL / sum bytes)``,
  ``bits_per_byte = -sum LL / sum bytes / ln 2``. Natural-log LL throughout.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..data.errors import DataError
from .loglik import _resolve_max_length, rolling_requests, score_token_requests

__all__ = ["RollingResult", "count_words", "score_documents"]


@dataclass
class RollingResult:
    word_perplexity: float
    """``exp(-loglikelihood / words)``."""
    byte_perplexity: float
    """``exp(-loglikelihood / bytes)``."""
    bits_per_byte: float
    """``-loglikelihood / bytes / ln 2`` (bits per character for ASCII text such as text8)."""
    documents: int
    words: int
    """Sum over documents of ``len(re.split(r"\\s+", doc))`` on the original text."""
    bytes: int
    """Sum over documents of the UTF-8 length of the original text."""
    tokens: int
    """Tokens scored (every token of every scored text, as the model's tokenizer splits it)."""
    loglikelihood: float
    """Sum of natural-log likelihoods over all documents."""
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_words(doc: str) -> int:
    """The harness's word count: ``len(re.split(r"\\s+", doc))`` (not ``len(doc.split())``)."""
    return len(re.split(r"\s+", doc))


def score_documents(
    model: torch.nn.Module,
    tokenizer,
    documents: list[str],
    detokenize: Callable[[str], str] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    max_length: int | None = None,
) -> RollingResult:
    """Word / byte perplexity and bits per byte of ``model`` on ``documents`` (see module doc).

    ``max_length`` overrides the model's context length (the rolling window size).
    """
    if not documents:
        raise DataError("no documents to score; pass a text with at least one document")
    total_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    if total_bytes == 0:
        raise DataError("all documents are empty, so bits per byte would divide by zero; pass a text with content")
    max_len = _resolve_max_length(model, tokenizer, max_length)
    start = time.perf_counter()
    texts = [detokenize(doc) if detokenize is not None else doc for doc in documents]
    windows = [w for text in texts for w in rolling_requests(tokenizer, text, max_len)]
    scores = score_token_requests(model, windows, max_len, batch_size, progress, desc="rolling windows")
    loglik = sum((ll for ll, _ in scores), 0.0)
    words = sum(count_words(doc) for doc in documents)
    return RollingResult(
        word_perplexity=_exp(-loglik / words),
        byte_perplexity=_exp(-loglik / total_bytes),
        bits_per_byte=-loglik / total_bytes / math.log(2),
        documents=len(documents),
        words=words,
        bytes=total_bytes,
        tokens=sum(len(cont) for _, cont in windows),
        loglikelihood=loglik,
        seconds=time.perf_counter() - start,
    )


def _exp(x: float) -> float:
    # An untrained model's word perplexity can pass float range; report inf, do not crash.
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf

"""Evaluate several models on the same text under one stated protocol, side by side."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.corpora import CORPORA
from ..data.prepare import tokenize_documents
from ..data.sources import parse_source
from ..models import (
    ModelError,
    config_context_length,
    load_model,
    load_tokenizer,
    model_config,
    resolve_device,
    tokenizer_fingerprint,
)
from .perplexity import PerplexityProtocol, perplexity


def expand_sources(specs: list[str]) -> list[str]:
    """``corpus:all`` stands for each bundled corpus, reported one by one."""
    out: list[str] = []
    for spec in specs:
        out.extend(f"corpus:{name}" for name in CORPORA) if spec == "corpus:all" else out.append(spec)
    return out


class TokenCache:
    """Each source tokenised once per distinct tokenizer (students share their teacher's)."""

    def __init__(self, split: str) -> None:
        self.split = split
        self._streams: dict[tuple[str, str], np.ndarray] = {}

    def tokens(self, source: str, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
        key = (source, tokenizer_fingerprint(tokenizer))
        if key not in self._streams:
            texts = list(parse_source(source).documents(self.split))
            self._streams[key] = tokenize_documents(tokenizer, texts)
        return self._streams[key]


def evaluate_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sources: list[str], cache: TokenCache,
                   protocol: PerplexityProtocol, name: str = "") -> dict[str, Any]:
    """Perplexity of one model on each source; a row of the side-by-side table."""
    row: dict[str, Any] = {"model": name, "tokenizer": tokenizer_fingerprint(tokenizer)[:12], "perplexity": {}}
    for source in sources:
        stream = cache.tokens(source, tokenizer)
        result = perplexity(model, stream, protocol, progress=True, desc=f"{name} {source}")
        row["perplexity"][source] = result.to_dict()
    return row


def evaluate_models(models: list[str], sources: list[str], split: str = "test", window: int = 512,
                    stride: int | None = None, max_tokens: int | None = None, batch_size: int = 4,
                    device: str = "auto") -> dict[str, Any]:
    """Load each MODEL in turn (one in memory at a time) and score it on every source."""
    sources = expand_sources(sources)
    for source in sources:
        parse_source(source)  # a bad source fails before any model loads
    protocol = PerplexityProtocol(window=window, stride=stride, max_tokens=max_tokens, batch_size=batch_size)
    for spec in models:
        context = config_context_length(model_config(spec))
        if context is not None and window > context:
            raise ModelError(f"--window {window} exceeds the context of {spec} ({context} tokens); use --window {context} or less")
    target = resolve_device(device)
    cache = TokenCache(split)
    rows = []
    for spec in models:
        started = time.perf_counter()
        tokenizer = load_tokenizer(spec)
        model = load_model(spec, device=target)
        row = evaluate_model(model, tokenizer, sources, cache, protocol, name=spec)
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"split": split, "sources": sources, "protocol": protocol.describe(), "models": rows}


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per model, one column per source, the protocol above it."""
    sources = results["sources"]
    fingerprints = {row["tokenizer"] for row in results["models"]}
    lines = [
        f"Perplexity on the {results['split']} split; {results['protocol']}.",
    ]
    if len(fingerprints) > 1:
        lines.append("Warning: these models use different tokenizers, so token-level perplexities are not comparable.")
    lines.append("")
    lines.append("| model | " + " | ".join(sources) + " |")
    lines.append("|---|" + "---:|" * len(sources))
    for row in results["models"]:
        cells = [f"{row['perplexity'][s]['perplexity']:,.2f}" for s in sources]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    scored = ", ".join(f"{s}: {results['models'][0]['perplexity'][s]['tokens_scored']:,}" for s in sources)
    lines.append("")
    lines.append(f"Tokens scored per model: {scored}.")
    return "\n".join(lines)

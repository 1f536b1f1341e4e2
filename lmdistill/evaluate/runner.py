"""Evaluate several models on the same tasks under one stated protocol, side by side; the
result and its tables are in :mod:`.results`."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models.arch import config_context_length
from ..models.device import resolve_device
from ..models.errors import ModelError
from ..models.fingerprint import tokenizer_fingerprint
from ..models.load import load_model, load_tokenizer, model_config
from .results import eval_result
from .tasks import PerplexityTask, Task


def evaluate_loaded(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: list[Task], name: str,
                    batch_size: int = 4) -> dict[str, Any]:
    """One row of the side-by-side tables: every task scored on one loaded model."""
    row: dict[str, Any] = {"model": name, "tokenizer": tokenizer_fingerprint(tokenizer)[:12], "tasks": {}}
    for task in tasks:
        started = time.perf_counter()
        result = task.score(model, tokenizer, batch_size)
        result["seconds"] = round(time.perf_counter() - started, 2)
        row["tasks"][task.label] = result
    return row


def check_windows(models: list[str], tasks: list[Task]) -> None:
    """A perplexity window longer than a model's context fails before anything loads."""
    for spec in models:
        context = config_context_length(model_config(spec))
        for task in tasks:
            if isinstance(task, PerplexityTask) and context is not None and task.protocol_.window > context:
                raise ModelError(
                    f"window {task.protocol_.window} of task {task.label} exceeds the context of {spec} "
                    f"({context} tokens); add :window={context} or less"
                )


def evaluate_models(models: list[str], tasks: list[Task], batch_size: int = 4, device: str = "auto") -> dict[str, Any]:
    """Load each MODEL in turn (one in memory at a time) and score it on every task; returns an
    evaluation result (:mod:`.results`)."""
    for task in tasks:
        task.load()  # bad data fails before any model loads
    check_windows(models, tasks)
    target = resolve_device(device)
    rows = []
    for spec in models:
        started = time.perf_counter()
        tokenizer = load_tokenizer(spec)
        model = load_model(spec, device=target)
        row = evaluate_loaded(model, tokenizer, tasks, spec, batch_size)
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return eval_result(tasks, str(target), rows)

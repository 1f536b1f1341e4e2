"""Evaluate several models on the same tasks under one stated protocol, side by side."""

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
    """Load each MODEL in turn (one in memory at a time) and score it on every task."""
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
    return {
        "tasks": [{"label": t.label, "name": t.name, "options": t.options, "protocol": t.protocol(),
                   "metrics": list(t.metrics)} for t in tasks],
        "device": str(target),
        "models": rows,
    }


def format_tables(results: dict[str, Any]) -> str:
    """Markdown: one table per task (rows = models, columns = metrics), its protocol above it."""
    out: list[str] = summary_table(results)
    if len({row["tokenizer"] for row in results["models"]}) > 1:
        out += ["Note: these models use different tokenizers, so token-level perplexities are not comparable "
                "(word- and byte-normalised metrics and accuracies are).", ""]
    for task in results["tasks"]:
        metrics = task["metrics"]
        out.append(f"### {task['label']}")
        out.append(f"Protocol: {task['protocol']}.")
        out.append("")
        out.append("| model | " + " | ".join(metrics) + " |")
        out.append("|---|" + "---:|" * len(metrics))
        for row in results["models"]:
            values = row["tasks"][task["label"]]
            out.append(f"| {row['model']} | " + " | ".join(_fmt(m, values[m]) for m in metrics) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def summary_table(results: dict[str, Any]) -> list[str]:
    """All tasks side by side, the headline metric of each (protocols in the tables below)."""
    tasks = results["tasks"]
    if len(tasks) < 2:
        return []
    heads = [(t["label"], t["metrics"][0]) for t in tasks]
    lines = ["### summary", "", "| model | " + " | ".join(f"{label} {metric}" for label, metric in heads) + " |",
             "|---|" + "---:|" * len(heads)]
    for row in results["models"]:
        lines.append(f"| {row['model']} | " + " | ".join(_fmt(m, row["tasks"][label][m]) for label, m in heads) + " |")
    return lines + [""]


def _fmt(metric: str, value: float) -> str:
    if metric.startswith("acc") or metric.endswith("_acc"):
        return f"{value:.4f}"
    if metric == "bits_per_byte":
        return f"{value:.4f}"
    return f"{value:,.2f}"

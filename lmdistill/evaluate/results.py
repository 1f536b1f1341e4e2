"""The evaluation result and its one renderer (``lmdistill eval``, the demo, the report).

The evaluation result, the only shape written and read (a JSON object)::

    kind: "eval", version: 2     (results from before version 2 lack both; same shape)
    device: str                  where the models ran
    tasks: one object per task, in order:
        label: str               the table's heading (``ppl austen``, ``lambada``, ...)
        name: str, options: {key: value}   the task as given (``name:key=value``)
        protocol: str            how the task's numbers were computed
        metrics: [str]           the table's columns, the headline metric first
    models: one object per model, in order:
        model: str               the MODEL argument, or the caller's label
        tokenizer: str           a tokenizer fingerprint prefix (token-level metrics compare
                                 only between equal ones)
        tasks: {label: {metric: value, ..., seconds}}
        seconds: float           (optional) load and scoring time
"""

from __future__ import annotations

from typing import Any

from ..markdown import finite, get, number, protocol_text, table
from .tasks import Task

__all__ = ["eval_result", "format_eval"]

KIND, VERSION = "eval", 2
TOKENIZER_NOTE = ("Note: these models use different tokenizers, so token-level perplexities are not comparable "
                  "(word- and byte-normalised metrics and accuracies are).")


def eval_result(tasks: list[Task], device: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """An evaluation result from the tasks scored and one row per model (``evaluate_loaded``)."""
    return {
        "kind": KIND, "version": VERSION,
        "tasks": [{"label": t.label, "name": t.name, "options": t.options, "protocol": t.protocol(),
                   "metrics": list(t.metrics)} for t in tasks],
        "device": device,
        "models": rows,
    }


def _metric(metric: str, value: Any) -> str:
    if metric.startswith("acc") or metric.endswith("_acc") or metric == "bits_per_byte":
        return number(value, ".4f")
    return number(value, ",.2f")


def _tasks(results: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The task list with each task's metrics; taken from the rows where the result lacks it."""
    tasks = [t for t in results.get("tasks") or [] if isinstance(t, dict) and "label" in t]
    if not tasks:
        labels = dict.fromkeys(label for row in rows for label in (row.get("tasks") or {}))
        tasks = [{"label": label} for label in labels]
    out = []
    for task in tasks:
        metrics = [m for m in task.get("metrics") or [] if isinstance(m, str)]
        if not metrics:  # every metric with a number in some row, in the order first seen
            values = [get(row, "tasks", task["label"]) or {} for row in rows]
            metrics = list(dict.fromkeys(m for v in values for m in v if finite(v[m]) and m != "seconds"))
        out.append({**task, "metrics": metrics})
    return out


def _summary(tasks: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    """All tasks side by side, the headline metric of each (protocols in the tables below)."""
    heads = [(t["label"], t["metrics"][0]) for t in tasks if t["metrics"]]
    if len(heads) < 2:
        return []
    body = [[r.get("model", "?"), *(_metric(m, get(r, "tasks", label, m)) for label, m in heads)] for r in rows]
    return ["### summary", "", *table(["model", *(f"{label} {m}" for label, m in heads)], body), ""]


def format_eval(results: dict[str, Any]) -> list[str]:
    """Markdown lines of an evaluation result: a summary table when there are several tasks,
    then one table per task (rows = models, columns = metrics) with its protocol above it.
    A missing value shows as ``-``."""
    rows = [r for r in results.get("models") or [] if isinstance(r, dict)]
    if not rows:
        return ["(evaluation results hold no models)"]
    tasks = _tasks(results, rows)
    lines = _summary(tasks, rows)
    if len({r.get("tokenizer") for r in rows if r.get("tokenizer")}) > 1:
        lines += [TOKENIZER_NOTE, ""]
    for task in tasks:
        label, metrics = task["label"], task["metrics"]
        lines.append(f"### {label}")
        protocol = protocol_text(task.get("protocol"))
        if protocol:
            lines.append(f"Protocol: {protocol}.")
        body = [[r.get("model", "?"), *(_metric(m, get(r, "tasks", label, m)) for m in metrics)] for r in rows]
        lines += ["", *table(["model", *metrics], body), ""]
    return lines[:-1] if lines and lines[-1] == "" else lines

"""Result files in the report: evaluation, bench and demo results, each by its one renderer.

A demo result (the demo's ``results.json``) holds an evaluation result and a bench result,
plus what only the demo has::

    kind: "demo", version: 2
    teacher: str, student_layers: int, models: {label: path}
    train: the run's summary.json, budget: str, precision: str (how it trained, e.g. bf16 autocast)
    eval: an evaluation result (lmdistill.evaluate.results)
    bench: a bench result with generation only (lmdistill.measure.bench)
    samples: {prompts: [str], sampling: str, label: [continuation per prompt], ...}
    total_seconds: float

A ``results.json`` written before version 2 (``models`` a dict of label -> parameters,
perplexity per source and generation speed) is read by :func:`upgrade_demo`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..evaluate.results import format_eval
from ..markdown import finite, get
from ..measure.bench import format_bench
from .run import read_json

KIND, VERSION = "demo", 2
INITIAL, DISTILLED = "student (initialised)", "student (distilled)"


def is_demo(results: dict[str, Any]) -> bool:
    """A demo result, of this version or one from before version 2 (``models`` a dict)."""
    return results.get("kind") == KIND or isinstance(results.get("models"), dict)


def upgrade_demo(results: dict[str, Any]) -> dict[str, Any]:
    """A demo result from before version 2 in this version's shape; others unchanged.

    Its generation speeds were measured through ``model.generate`` with the prefill included
    (not this version's protocol), which the bench protocol it gets says.
    """
    if results.get("kind") == KIND:
        return results
    models = {label: row for label, row in (results.get("models") or {}).items() if isinstance(row, dict)}
    sources = list(dict.fromkeys(s for row in models.values() for s in row.get("perplexity") or {}))
    labels = {s: f"ppl {s.removeprefix('corpus:')}" for s in sources}
    tasks = [{"label": labels[s], "protocol": results.get("protocol"), "metrics": ["perplexity"]} for s in sources]
    rows = [{"model": label, "tasks": {labels[s]: {"perplexity": get(row, "perplexity", s),
                                                   "tokens_scored": get(row, "tokens_scored", s)} for s in sources}}
            for label, row in models.items()]
    gen = next((row["generation"] for row in models.values() if isinstance(row.get("generation"), dict)), {})
    protocol = (f"Generation (measured by an earlier lmdistill): batch 1, greedy, KV cache, {gen.get('new_tokens', '?')} "
                f"new tokens through model.generate with the prefill of a {gen.get('prompt_tokens', '?')}-token prompt "
                f"included, median of {gen.get('repeats', '?')} interleaved runs, on {gen.get('device', '?')} "
                f"({gen.get('threads', '?')} threads). Speed-ups relative to the first model.")
    entries = [{"model": label, "parameters": row.get("parameters"), "generation": _old_generation(row.get("generation"))}
               for label, row in models.items()]
    first = get(entries[0], "generation", "tokens_per_second") if entries else None
    for entry in entries:
        tps = get(entry, "generation", "tokens_per_second")
        if finite(tps) and finite(first) and first > 0:
            entry["speedup"] = {"generation": tps / first}
    return {**results, "kind": KIND, "version": VERSION, "models": {label: row.get("path") for label, row in models.items()},
            "eval": {"tasks": tasks, "models": rows}, "bench": {"protocol": protocol, "models": entries}}


def _old_generation(gen: Any) -> dict[str, Any] | None:
    if not isinstance(gen, dict):
        return None
    seconds = gen.get("seconds_per_token")
    return {"tokens_per_second": gen.get("tokens_per_second"), "spread": gen.get("spread"),
            "ms_per_token": 1000.0 * seconds if finite(seconds) else None}


def _gains(results: dict[str, Any]) -> list[str]:
    """How much distillation lowered each perplexity of the initialised student."""
    rows = {r.get("model"): r for r in get(results, "eval", "models") or [] if isinstance(r, dict)}
    gains = []
    for task in get(results, "eval", "tasks") or []:
        label = task.get("label") if isinstance(task, dict) else None
        a, b = get(rows.get(INITIAL), "tasks", label, "perplexity"), get(rows.get(DISTILLED), "tasks", label, "perplexity")
        if finite(a) and finite(b) and b > 0:
            gains.append(f"{label.removeprefix('ppl ')} {a / b:,.{0 if a / b >= 100 else 1}f}x")
    return ["", "Distillation lowered the student's perplexity by: " + ", ".join(gains) + "."] if gains else []


def _samples(samples: Any) -> list[str]:
    if not isinstance(samples, dict) or not isinstance(samples.get("prompts"), list):
        return []
    labels = [k for k, v in samples.items() if k != "prompts" and isinstance(v, list)]
    lines = ["", "## Sample continuations", ""]
    if samples.get("sampling"):
        lines += [f"Decoding: {samples['sampling']}.", ""]
    for i, prompt in enumerate(samples["prompts"]):
        lines += [f"**Prompt:** {prompt}", ""]
        lines += [f"- *{label}:* {str(samples[label][i]).strip()}".replace("\n", " ")
                  for label in labels if i < len(samples[label])]
        lines.append("")
    return lines


def format_demo(results: dict[str, Any]) -> list[str]:
    """Markdown sections of a demo result: evaluation, size and speed, sample continuations."""
    results = upgrade_demo(results)
    lines = ["## Evaluation", "", *format_eval(results.get("eval") or {}), *_gains(results)]
    if isinstance(results.get("bench"), dict):
        lines += ["", "## Size and speed", "", *format_bench(results["bench"])]
    return lines + _samples(results.get("samples"))


def result_sections(run_dir: Path, eval_results: dict | None, bench_results: dict | None) -> list[str]:
    """The report's result sections: ``eval_results`` (an evaluation or demo result) or
    RUN_DIR/eval.json; RUN_DIR/results.json (a demo result) unless ``eval_results`` is one;
    ``bench_results`` or RUN_DIR/bench.json."""
    documents = []
    found = eval_results if eval_results is not None else read_json(run_dir / "eval.json")
    if found is not None:
        documents.append(found)
    if not (eval_results is not None and is_demo(eval_results)):
        if (demo := read_json(run_dir / "results.json")) is not None:
            documents.append(demo)
    lines: list[str] = []
    for results in documents:
        lines += ["", *(format_demo(results) if is_demo(results) else ["## Evaluation", "", *format_eval(results)])]
    bench = bench_results if bench_results is not None else read_json(run_dir / "bench.json")
    if bench is not None:
        lines += ["", "## Size and speed", "", *format_bench(bench)]
    return lines

"""The embedded demo: distil the bundled SmolLM2-135M into a 15-layer student and compare.

Steps: convert the teacher (once, cached) → cut the student (the 15 most influential layers) → distil on
the bundled corpora for a time budget → score teacher, initialised student and distilled
student on each corpus's test split under one protocol → measure generation speed → show
sample continuations → write ``results.json`` and ``report.md`` in the run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .bench import generation_speeds, parameter_counts
from .atomic import write_text_atomic
from .report import write_report
from .train.rundir import RunDir
from .config import load_config
from .data.corpora import CORPORA
from .evaluate.perplexity import PerplexityProtocol
from .evaluate.runner import evaluate_loaded
from .evaluate.tasks import PerplexityTask
from .generate import SamplingConfig, generate
from .models.arch import config_context_length
from .models.load import load_model, load_tokenizer, model_config
from .student import resolve_strategy
from .train.rundir import RunDirError, check_run_dir
from .train.run import run_training

RECIPE = "smollm2-demo"
PROMPTS = [
    "It is a truth universally acknowledged, that",
    "Mr. Speaker, Mr. Vice President, members of Congress, my fellow Americans:",
    "Call me Ishmael. Some years ago,",
]
EVAL_WINDOW = 512
# Greedy decoding loops on small models; a mild repetition penalty keeps samples readable.
SAMPLING = SamplingConfig(max_new_tokens=40, repetition_penalty=1.3)


def run_demo(out: Path, minutes: float = 10.0, eval_tokens: int = 32768, resume: bool = False,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the results, or {} when training was stopped early.

    ``overrides`` (``section.field=value``) change the recipe, e.g. a tiny teacher in tests.
    """
    run = RunDir(out)
    started = time.perf_counter()
    # Checked before training so a bad value cannot waste the training budget.
    protocol = PerplexityProtocol(window=EVAL_WINDOW, max_tokens=eval_tokens, batch_size=4)
    if resume:
        if not run.config.is_file():
            raise RunDirError(f"{out} holds no demo to resume; start one with lmdistill demo --out {out}")
        config = load_config(run.config)
        summary = run_training(None, out, resume=True)
    else:
        if run.config.is_file():
            raise RunDirError(f"{out} already holds a demo run; continue it with lmdistill demo --resume --out {out} "
                              f"or choose another --out")
        config = load_config(RECIPE, [f"train.max_minutes={minutes}", *(overrides or [])])
        check_run_dir(run, config, resume=False)  # before the teacher is converted or loaded
        strategy = resolve_strategy(config.model.strategy, model_config(config.model.teacher))
        print(f"[demo] teacher {config.model.teacher} -> {config.model.num_layers}-layer student ({strategy}); "
              f"{minutes:g} minutes of training on {torch.get_num_threads()} threads")
        summary = run_training(config, out)
    if not summary["finished"]:
        print(f"[demo] training stopped early; continue with: lmdistill demo --resume --out {out}")
        return {}

    print("[demo] evaluating teacher, initialised student and distilled student on the test splits")
    names = {"teacher": config.model.teacher, "student (initialised)": str(run.student_init),
             "student (distilled)": str(run.student)}
    sources = [f"corpus:{name}" for name in CORPORA]
    context = config_context_length(model_config(config.model.teacher))
    window = min(protocol.window, context or protocol.window)
    tasks = [PerplexityTask("ppl", {"corpus": s.split(":")[1], "split": "test", "window": str(window),
                                    "max_tokens": str(eval_tokens)}) for s in sources]
    for task in tasks:
        task.load()
    tokenizer = load_tokenizer(config.model.teacher)
    models = {label: load_model(spec) for label, spec in names.items()}
    rows = {label: evaluate_loaded(model, tokenizer, tasks, label) for label, model in models.items()}

    prompt_ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    speeds = generation_speeds(models, prompt_ids, new_tokens=64, repeats=3)
    params = {label: parameter_counts(model) for label, model in models.items()}

    samples = {label: [generate(models[label], tokenizer, p, SAMPLING) for p in PROMPTS]
               for label in ("teacher", "student (distilled)")}

    results = {
        "protocol": tasks[0].protocol_.describe() + "; test split of each bundled corpus",
        "teacher": config.model.teacher, "student_layers": config.model.num_layers,
        "train": summary, "budget": describe_budget(config),
        "models": {label: {"path": names[label], "parameters": params[label],
                           "perplexity": {s: rows[label]["tasks"][t.label]["perplexity"] for s, t in zip(sources, tasks)},
                           "tokens_scored": {s: rows[label]["tasks"][t.label]["tokens_scored"] for s, t in zip(sources, tasks)},
                           "generation": speeds[label].to_dict()} for label in names},
        "samples": {"prompts": PROMPTS, **samples},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    text = format_results(results, sources)
    # The report adds the training plots and the config to the table printed below.
    write_report(out)
    print()
    print(text)
    print(f"[demo] wrote {run.report} and {out / 'results.json'}; total {results['total_seconds']:.0f} s")
    return results


def describe_budget(config) -> str:
    parts = []
    if config.train.max_minutes:
        parts.append(f"{config.train.max_minutes:g} minutes")
    if config.train.max_steps:
        parts.append(f"{config.train.max_steps} steps")
    if config.train.max_tokens:
        parts.append(f"{config.train.max_tokens:,} tokens")
    return ", whichever first: ".join(parts) if len(parts) > 1 else parts[0]


def format_results(results: dict[str, Any], sources: list[str]) -> str:
    models = results["models"]
    teacher = models["teacher"]
    lines = [
        f"# lmdistill demo: {results['teacher']} → {results['student_layers']}-layer student",
        "",
        f"Training: {results['train']['step']} steps, {results['train']['tokens_seen']:,} tokens, "
        f"{results['train'].get('train_seconds', '?')} s of training (budget: {results['budget']}).",
        "",
        f"Perplexity protocol: {results['protocol']}.",
        "Generation: batch 1, greedy, KV cache, 64 new tokens after a short prompt, median of 3 (interleaved).",
        "",
        "| model | parameters | " + " | ".join(f"ppl {s.split(':')[1]}" for s in sources) + " | generation tokens/s |",
        "|---|---:|" + "---:|" * len(sources) + "---:|",
    ]
    for label, row in models.items():
        ppl = " | ".join(f"{row['perplexity'][s]:,.1f}" for s in sources)
        speed = row["generation"]["tokens_per_second"]
        ratio = speed / teacher["generation"]["tokens_per_second"]
        lines.append(f"| {label} | {row['parameters']['total'] / 1e6:.1f}M | {ppl} | {speed:.1f} ({ratio:.2f}x) |")
    init, final = models["student (initialised)"], models["student (distilled)"]
    gains = ", ".join(f"{s.split(':')[1]} {init['perplexity'][s] / final['perplexity'][s]:,.0f}x" for s in sources)
    lines += ["", f"Distillation lowered the student's test perplexity by: {gains}.", "", f"## Sample continuations (greedy, repetition penalty {SAMPLING.repetition_penalty})", ""]
    for i, prompt in enumerate(results["samples"]["prompts"]):
        lines.append(f"**Prompt:** {prompt}")
        lines.append("")
        for label in ("teacher", "student (distilled)"):
            continuation = results["samples"][label][i].replace("\n", " ")
            lines.append(f"- *{label}:* {continuation}")
        lines.append("")
    return "\n".join(lines)

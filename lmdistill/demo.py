"""The embedded demo: distil the bundled SmolLM2-135M into a 15-layer student and compare.

Steps: convert the teacher (once, cached) → cut the student (the 15 most influential layers) → distil on
the bundled corpora for a time budget → score teacher, initialised student and distilled
student on each corpus's test split under one protocol → measure generation speed by the one
speed protocol (``lmdistill.measure.speed``) → show sample continuations → write
``results.json`` (a demo result, ``lmdistill.report.results``) and ``report.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .atomic import write_text_atomic
from .config import RunConfig
from .recipe import load_config
from .data.corpora import CORPORA
from .evaluate.perplexity import PerplexityProtocol
from .evaluate.results import eval_result
from .evaluate.runner import evaluate_loaded
from .evaluate.tasks import PerplexityTask
from .generate import SamplingConfig, generate
from .markdown import join
from .measure.bench import bench_generation
from .models.arch import config_context_length
from .models.device import cpu_computes_bf16, model_device, resolve_device
from .models.load import load_model, load_tokenizer, model_config
from .report import results as demo_results
from .card import add_results, current_command
from .report.write import write_report
from .student.maps import resolve_strategy
from .train.run import run_training
from .train.setup import describe_precision, resolve_precision
from .train.rundir import RunDir, RunDirError, check_run_dir

RECIPE = "smollm2-demo"
PROMPTS = [
    "It is a truth universally acknowledged, that",
    "Mr. Speaker, Mr. Vice President, members of Congress, my fellow Americans:",
    "Call me Ishmael. Some years ago,",
]
EVAL_WINDOW = 512
NEW_TOKENS = 64  # decode steps timed per generation-speed run
# Greedy decoding loops on small models; a mild repetition penalty keeps samples readable.
SAMPLING = SamplingConfig(max_new_tokens=40, repetition_penalty=1.3)


def run_demo(out: Path, minutes: float = 10.0, eval_tokens: int = 32768, resume: bool = False,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the demo result, or {} when training was stopped early.

    ``overrides`` (``section.field=value``) change the recipe, e.g. a tiny teacher in tests.
    """
    run = RunDir(out)
    started = time.perf_counter()
    # Checked before training so a bad value cannot waste the training budget.
    protocol = PerplexityProtocol(window=EVAL_WINDOW, max_tokens=eval_tokens, batch_size=4)
    config, summary = _train(run, minutes, resume, overrides)
    if not summary["finished"]:
        print(f"[demo] training stopped early; continue with: lmdistill demo --resume --out {out}")
        return {}

    results = {"kind": demo_results.KIND, "version": demo_results.VERSION, "teacher": config.model.teacher,
               "student_layers": config.model.num_layers, "train": summary, "budget": describe_budget(config),
               "precision": precision_name(config),
               **_compare(config, run, protocol, eval_tokens)}
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    add_results(run.student, evaluation={"result": results["eval"], "student": demo_results.DISTILLED,
                                         "teacher": "teacher"},
                bench=results["bench"], command=current_command("lmdistill demo"))
    # The report adds the training plots and the config to what is printed below.
    write_report(out)
    print()
    print(format_results(results), end="")
    print(f"[demo] wrote {run.report}, {out / 'results.json'} and the student's model card "
          f"{run.student / 'README.md'}; total {results['total_seconds']:.0f} s")
    return results


def _train(run: RunDir, minutes: float, resume: bool, overrides: list[str] | None) -> tuple[RunConfig, dict[str, Any]]:
    """Start the demo's training run, or resume it; returns its config and summary."""
    out = run.root
    if resume:
        if not run.config.is_file():
            raise RunDirError(f"{out} holds no demo to resume; start one with lmdistill demo --out {out}")
        return load_config(run.config), run_training(None, out, resume=True)
    if run.config.is_file():
        raise RunDirError(f"{out} already holds a demo run; continue it with lmdistill demo --resume --out {out} "
                          f"or choose another --out")
    config = load_config(RECIPE, [f"train.max_minutes={minutes}", *(overrides or [])])
    choose_precision(config)
    check_run_dir(run, config, resume=False)  # before the teacher is converted or loaded
    strategy = resolve_strategy(config.model.strategy, model_config(config.model.teacher))
    print(f"[demo] teacher {config.model.teacher} -> {config.model.num_layers}-layer student ({strategy}); "
          f"{minutes:g} minutes of training on {torch.get_num_threads()} threads, {precision_name(config)}")
    return config, run_training(config, out)


def _compare(config: RunConfig, run: RunDir, protocol: PerplexityProtocol, eval_tokens: int) -> dict[str, Any]:
    """Teacher, initialised and distilled student side by side: the demo result's ``models``,
    ``eval``, ``bench`` and ``samples``."""
    print("[demo] evaluating teacher, initialised student and distilled student on the test splits")
    names = {"teacher": config.model.teacher, demo_results.INITIAL: str(run.student_init),
             demo_results.DISTILLED: str(run.student)}
    context = config_context_length(model_config(config.model.teacher))
    window = min(protocol.window, context or protocol.window)
    tasks = [PerplexityTask("ppl", {"corpus": corpus, "split": "test", "window": str(window),
                                    "max_tokens": str(eval_tokens)}) for corpus in CORPORA]
    for task in tasks:
        task.load()
    tokenizer = load_tokenizer(config.model.teacher)
    models = {label: load_model(spec) for label, spec in names.items()}
    rows = [evaluate_loaded(model, tokenizer, tasks, label) for label, model in models.items()]

    prompt_ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    bench = bench_generation(models, prompt_ids, f"{PROMPTS[0]!r} ({prompt_ids.shape[1]} tokens)", NEW_TOKENS)
    samples = {label: [generate(models[label], tokenizer, p, SAMPLING) for p in PROMPTS]
               for label in ("teacher", demo_results.DISTILLED)}
    sampling = (f"up to {SAMPLING.max_new_tokens} new tokens, greedy, repetition penalty "
                f"{SAMPLING.repetition_penalty}")
    return {"models": names, "eval": eval_result(tasks, str(model_device(models["teacher"])), rows),
            "bench": bench, "samples": {"prompts": PROMPTS, "sampling": sampling, **samples}}


def choose_precision(config: RunConfig) -> None:
    """``train.precision=auto`` on a CPU that computes bf16 natively becomes bf16: about twice
    the float32 step rate, so about twice the tokens in the demo's minutes. Elsewhere, or when
    the precision was set, it stays as it is."""
    if config.train.precision == "auto" and resolve_device(config.train.device).type == "cpu" and cpu_computes_bf16():
        config.train.precision = "bf16"


def precision_name(config: RunConfig) -> str:
    """How the demo trains, in words (train.setup.describe_precision)."""
    device = resolve_device(config.train.device)
    return describe_precision(resolve_precision(config.train.precision, device), device)


def describe_budget(config: RunConfig) -> str:
    parts = []
    if config.train.max_minutes:
        parts.append(f"{config.train.max_minutes:g} minutes")
    if config.train.max_steps:
        parts.append(f"{config.train.max_steps} steps")
    if config.train.max_tokens:
        parts.append(f"{config.train.max_tokens:,} tokens")
    return ", whichever first: ".join(parts) if len(parts) > 1 else parts[0]


def format_results(results: dict[str, Any]) -> str:
    """What the demo prints: its training in one line, then the demo result's sections."""
    train = results["train"]
    return join([
        f"# lmdistill demo: {results['teacher']} → {results['student_layers']}-layer student",
        "",
        f"Training: {train['step']} steps, {train['tokens_seen']:,} tokens, {train.get('train_seconds', '?')} s of "
        f"training (budget: {results['budget']}; {results.get('precision', 'float32')}).",
        "",
        *demo_results.format_demo(results),
    ])

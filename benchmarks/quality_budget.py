"""Quality per budget: test perplexity of the demo pair against training tokens or minutes, for named variants.

Run from the repository root (docs/quality_budget.md describes the options and protocols):
``PYTHONPATH=. python benchmarks/quality_budget.py --out runs/quality_budget [--protocol loco --minutes 30]``.
Each run is the bundled ``smollm2-demo`` recipe with a budget of training tokens (``--tokens``) or
minutes (``--minutes``: time in optimiser steps) plus a variant's overrides (``VARIANTS``, or
``--variant NAME=OVERRIDE,OVERRIDE``). It stops at each curve point with a checkpoint, is scored
on the first ``--eval-tokens`` tokens of each bundled test split, and resumes exactly. ``--protocol
loco`` trains each variant once per held-out corpus on the other two. A failing variant is
recorded, the others go on. Results: ``OUT/results.json`` (after every run; a rerun skips finished
runs and retries failed ones), ``OUT/quality_budget.md`` and ``OUT/quality_budget.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

from lmdistill.atomic import write_text_atomic
from lmdistill.cli.args import DEFAULT_TAIL_SAMPLES
from lmdistill.recipe import load_config
from lmdistill.data.corpora import CORPORA
from lmdistill.data.prepare import prepare
from lmdistill.errors import LmdistillError
from lmdistill.evaluate.runner import evaluate_loaded
from lmdistill.evaluate.tasks import PerplexityTask
from lmdistill.models.arch import count_parameters
from lmdistill.models.fingerprint import tokenizer_fingerprint
from lmdistill.models.load import load_model, load_tokenizer
from lmdistill.schedule import Budget
from lmdistill.teacher_cache.build import build_teacher_cache
from lmdistill.teacher_cache.format import data_fingerprint
from lmdistill.train.plan import prepared_dir
from lmdistill.train.rundir import RunDir, read_metrics
from lmdistill.train.run import run_training

RECIPE = "smollm2-demo"
WINDOW = 512
CACHE_OVERRIDE = "model.teacher_cache=@cache"
CACHE_TOP_K = 64

# name -> (what differs from the demo recipe, overrides). The shapes keep about the demo student's
# 81.4M parameters of SmolLM2-135M (docs/quality_budget.md has the arithmetic).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "every-other-kd": ("depth: every other layer", ["model.strategy=every-other"]),
    "importance-kd": ("the demo recipe: depth, 15 most influential layers", ["model.strategy=importance"]),
    "search-kd": ("depth: greedy search (KL, 1,024 tokens)",
                  ["model.strategy=search", "model.calibration_tokens=1024"]),
    "importance-kd-align": ("+ all-layer cosine", ["model.strategy=importance", "loss.align_cos=1.0"]),
    "importance-ce": ("CE only (the baseline KD must beat)", ["model.strategy=importance", "loss.kl=0", "loss.cos=0",
                                                              "loss.ce=1.0"]),
    "width-mlp": ("width: 30 layers, MLP 512", ["model.num_layers=30", "model.intermediate_size=512"]),
    "width-heads-mlp": ("width: 30 layers, 6 heads / 2 kv, MLP 680",
                        ["model.num_layers=30", "model.num_attention_heads=6", "model.num_key_value_heads=2",
                         "model.intermediate_size=680"]),
    "mixed-20": ("mixed: 20 layers, MLP 1,024", ["model.strategy=importance", "model.num_layers=20",
                                                 "model.intermediate_size=1024"]),
    "mixed-24": ("mixed: 24 layers, MLP 768", ["model.strategy=importance", "model.num_layers=24",
                                               "model.intermediate_size=768"]),
    "t1": ("temperature 1", ["loss.temperature=1.0"]),
    "skew-kl": ("skew KL (alpha 0.1)", ["loss.divergence=skew_kl", "loss.skew_alpha=0.1"]),
    "reverse-kl": ("reverse KL", ["loss.divergence=reverse_kl"]),
    "skew-reverse-kl": ("skew reverse KL (alpha 0.1)", ["loss.divergence=skew_reverse_kl", "loss.skew_alpha=0.1"]),
    "lr-5e-4": ("lr 5e-4", ["train.lr=5e-4"]),
    "lr-2e-3": ("lr 2e-3", ["train.lr=2e-3"]),
    "batch-2": ("batch 2 x 256", ["train.batch_size=2"]),
    "batch-8": ("batch 8 x 256", ["train.batch_size=8"]),
    "clip-1": ("clipping at 1", ["train.max_grad_norm=1.0"]),
    "no-clip": ("no clipping", ["train.max_grad_norm=0"]),
    "teacher-correction": ("teacher fine-tuned on 100,000 training tokens first",
                           ["model.teacher_correction_tokens=100000"]),
    "bf16": ("the demo recipe under bf16 autocast, as make demo trains on a CPU with native bf16",
             ["model.strategy=importance", "train.precision=bf16"]),
    "freeze-emb": ("token embeddings (and the tied head) frozen: no head-weight gradient, ~13% faster steps",
                   ["model.strategy=importance", "train.freeze_embeddings=true"]),
    "kd-nocos": ("live teacher, 5 KL + 2 CE (no cosine)", ["loss.cos=0"]),
    "kd-nocos-cache": ("stored teacher cache (top-64 + 256 tail samples), 5 KL + 2 CE", ["loss.cos=0", CACHE_OVERRIDE]),
}
DEFAULT_VARIANTS = ["importance-kd", "importance-ce", "every-other-kd", "importance-kd-align", "search-kd"]


class VariantError(SystemExit):
    """A bad --variant / --variants / --holdout argument: the script stops before training."""


class RunBudget(NamedTuple):
    """Training tokens or training minutes per variant (exactly one is set). NamedTuples, not
    dataclasses: the tests load this file as a module that is not in sys.modules."""

    tokens: int | None = None
    minutes: float | None = None

    def overrides(self) -> list[str]:
        tokens = f"train.max_tokens={self.tokens}" if self.tokens else "train.max_tokens=null"
        minutes = f"train.max_minutes={self.minutes}" if self.minutes else "train.max_minutes=null"
        return [tokens, minutes, "train.max_steps=null", "train.eval_every=0", "train.checkpoint_every=0"]

    def describe(self) -> str:
        if self.minutes:
            return f"{self.minutes:g} training minutes (time in optimiser steps)"
        return f"{self.tokens:,} training tokens"


class Job(NamedTuple):
    """One training run: a variant, and under the loco protocol the corpus it holds out."""

    key: str
    variant: str
    description: str
    overrides: list[str]
    holdout: str | None = None


def split_overrides(text: str) -> list[str]:
    """``a.b=1,c.d=[x,y]`` -> ``['a.b=1', 'c.d=[x,y]']``: commas inside brackets belong to a list value."""
    # a comma splits unless a "]" comes before the next "[" (it is then inside a list)
    return [part.strip() for part in re.split(r",(?![^\[]*\])", text) if part.strip()]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``--variant NAME=OVERRIDE,OVERRIDE`` as (name, overrides)."""
    name, sep, rest = text.partition("=")
    overrides = split_overrides(rest)
    if not sep or not name or "." in name or not overrides:
        raise VariantError(f"--variant {text!r} must look like NAME=section.field=value[,section.field=value...] "
                           f"(e.g. --variant t1-lr2e-3=loss.temperature=1.0,train.lr=2e-3)")
    return name, overrides


def choose_variants(names: list[str], ad_hoc: list[str]) -> dict[str, tuple[str, list[str]]]:
    """The registry's variants named by --variants, then the --variant ones, in order."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise VariantError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}, or define it with "
                           f"--variant {unknown[0]}=section.field=value,...")
    chosen = {n: VARIANTS[n] for n in names}
    for text in ad_hoc:
        name, overrides = parse_variant(text)
        if name in chosen:
            raise VariantError(f"--variant {name} is already chosen (a registry name or a repeat); "
                               f"give it another name")
        chosen[name] = ("ad hoc: " + " ".join(overrides), overrides)
    return chosen


def added_sources(overrides: list[str]) -> list[str]:
    """The sources other than bundled corpora in the last data.sources=[...] of ``overrides``."""
    lists = [o.partition("=")[2].strip("[]") for o in overrides if o.startswith("data.sources=")]
    return [s.strip() for s in lists[-1].split(",") if s.strip() and not s.strip().startswith("corpus:")] if lists else []


def make_jobs(variants: dict[str, tuple[str, list[str]]], holdouts: list[str] | None, corpora: list[str],
              base_overrides: list[str]) -> list[Job]:
    """In-domain: one job per variant; loco: one per (variant, held-out corpus), trained on the
    others and on any source other than a bundled corpus that the variant's data.sources names
    (a generate-corpus folder, say); a data.prepared_dir given for every run gets one sub-folder
    per training set."""
    if holdouts is None:
        return [Job(name, name, desc, overrides) for name, (desc, overrides) in variants.items()]
    prepared = [o.partition("=")[2] for o in base_overrides if o.startswith("data.prepared_dir=")]
    jobs = []
    for held in holdouts:
        for name, (desc, overrides) in variants.items():
            sources = [f"corpus:{c}" for c in corpora if c != held] + added_sources(overrides)
            data = [f"data.sources=[{','.join(sources)}]"]
            data += [f"data.prepared_dir={prepared[-1]}/without-{held}"] if prepared else []
            jobs.append(Job(f"{name}--holdout-{held}", name, desc, [*overrides, *data], held))
    return jobs


def eval_tasks(eval_tokens: int, corpora: list[str]) -> list[PerplexityTask]:
    tasks = [PerplexityTask("ppl", {"corpus": name, "split": "test", "window": str(WINDOW),
                                    "max_tokens": str(eval_tokens)}) for name in corpora]
    for task in tasks:
        task.load()
    return tasks


def score(model, name: str, tokenizer, tasks: list[PerplexityTask], corpora: list[str]) -> dict[str, float]:
    row = evaluate_loaded(model, tokenizer, tasks, name)
    return {c: row["tasks"][task.label]["perplexity"] for c, task in zip(corpora, tasks)}


def stop_steps(total_steps: int, points: int) -> list[int]:
    """``points`` evenly spaced steps from 0 to ``total_steps`` (both included)."""
    return sorted({round(k * total_steps / (points - 1)) for k in range(points)})


def segment_ends(config, budget: RunBudget, points: int, curve_every: int):
    """The steps at which a run stops to be scored: evenly spaced for a token budget; every
    ``curve_every`` steps, without end (the run finishing ends it), for a time budget."""
    if budget.tokens:
        tokens_per_step = config.data.block_size * config.train.batch_size * config.train.grad_accum
        # The steps the run will take: a token budget rounds down to whole steps, as in training.
        yield from stop_steps(Budget.from_config(None, budget.tokens, None, tokens_per_step).total_steps, points)[1:]
        return
    yield from itertools.count(curve_every, curve_every)


def with_teacher_cache(overrides: list[str], out: Path) -> tuple[list[str], dict[str, Any] | None]:
    """``model.teacher_cache=@cache`` replaced by a cache of the run's data, built here once
    (top-64, the default tail samples, at the run's temperature); returns what was built."""
    if CACHE_OVERRIDE not in overrides:
        return overrides, None
    config = load_config(RECIPE, [o for o in overrides if o != CACHE_OVERRIDE])
    tokenizer = load_tokenizer(config.model.teacher)
    data = prepare(tokenizer, config.data.sources, prepared_dir(config, tokenizer), tokenizer_name=config.model.teacher)
    settings = [config.model.teacher, data_fingerprint(data), config.data.block_size, config.loss.temperature,
                CACHE_TOP_K, DEFAULT_TAIL_SAMPLES]
    folder = out / "teacher_cache" / hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    started = time.perf_counter()
    result = build_teacher_cache(load_model(config.model.teacher), data, folder, top_k=CACHE_TOP_K,
                                 temperatures=[config.loss.temperature], block_size=config.data.block_size,
                                 tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                                 tail_samples=DEFAULT_TAIL_SAMPLES, progress=False)
    built = {"folder": str(folder), "blocks": result.blocks_total,
             "build_seconds": round(time.perf_counter() - started, 1)}
    return [f"model.teacher_cache={folder}" if o == CACHE_OVERRIDE else o for o in overrides], built


def run_job(job: Job, out: Path, budget: RunBudget, points: int, curve_every: int, tasks, corpora,
            tokenizer, base_overrides: list[str]) -> dict[str, Any]:
    """Train one job to its budget, scoring the student at each curve point."""
    overrides, cache = with_teacher_cache([*base_overrides, *budget.overrides(), *job.overrides], out)
    config = load_config(RECIPE, overrides)
    run = RunDir(out / job.key)
    if run.root.exists():  # a job killed half-way: its earlier curve points are gone, so start again
        shutil.rmtree(run.root)
    curve: list[dict[str, Any]] = []
    started, eval_seconds, parameters = time.perf_counter(), 0.0, 0

    def evaluate(step: int, model_path: Path) -> None:
        nonlocal eval_seconds, parameters
        t0 = time.perf_counter()
        model = load_model(model_path)
        parameters = count_parameters(model)
        ppl = score(model, str(model_path), tokenizer, tasks, corpora)
        eval_seconds += time.perf_counter() - t0
        seen = max([r["tokens_seen"] for r in read_metrics(run.metrics) if r.get("step") == step] or [0])
        curve.append({"step": step, "tokens_seen": seen, "perplexity": ppl})
        if step == 0:
            print(f"[{job.key}] student: {parameters:,} parameters", flush=True)
        print(f"[{job.key}] step {step} ({seen:,} tokens): " + ", ".join(f"{c} {p:,.1f}" for c, p in ppl.items()),
              flush=True)

    for end in segment_ends(config, budget, points, curve_every):
        if run.config.is_file():
            summary = run_training(None, run.root, resume=True, stop_at_step=end, progress=False)
        else:
            summary = run_training(config, run.root, stop_at_step=end, progress=False)
            evaluate(0, run.student_init)  # written before the first step
        if summary["finished"] or summary["step"] != curve[-1]["step"]:
            evaluate(summary["step"], run.student if summary["finished"] else run.latest_checkpoint() / "student")
        if summary["finished"]:
            break
    return job_row(job, run, curve, parameters, overrides, budget, cache,
                   round(time.perf_counter() - started - eval_seconds, 1))


def job_row(job: Job, run: RunDir, curve: list[dict[str, Any]], parameters: int, overrides: list[str],
            budget: RunBudget, cache: dict[str, Any] | None, wall_seconds: float) -> dict[str, Any]:
    """What the table and the JSON say of one finished job."""
    train_rows = [r for r in read_metrics(run.metrics) if "loss" in r]
    train_seconds = train_rows[-1]["elapsed_s"] if train_rows else 0.0
    student_config = json.loads((run.student_init / "config.json").read_text())
    choice = student_config.get("lmdistill_layer_choice")
    return {
        "name": job.key, "variant": job.variant, "description": job.description, "overrides": job.overrides,
        "holdout": job.holdout, "train_sources": load_config(RECIPE, overrides).data.sources,
        "command": distill_command(job.key, overrides),
        "parameters": parameters, "layers": student_config.get("lmdistill_layer_map"),
        "layer_choice_cuts": choice["cuts"] if choice else None,
        "curve": curve, "steps": curve[-1]["step"], "tokens_seen": curve[-1]["tokens_seen"],
        "train_seconds": train_seconds, "wall_seconds_without_eval": wall_seconds,
        "tokens_per_s": round(curve[-1]["tokens_seen"] / train_seconds, 1) if train_seconds else None,
        "budget": budget.describe(), **({"teacher_cache": cache} if cache else {}),
    }


def distill_command(key: str, overrides: list[str]) -> str:
    return f"lmdistill distill --config {RECIPE} --out runs/{key} " + " ".join(overrides)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarise(row: dict[str, Any], teacher: dict[str, float]) -> dict[str, Any]:
    """Final student / teacher ratios of a row: per corpus, in-domain (the corpora it trained
    on, or all under in-domain) geomean, and the held-out corpus's ratio under loco."""
    per = {c: row["curve"][-1]["perplexity"][c] / teacher[c] for c in teacher}
    summary = {"per_corpus": per, "in_domain_geomean": geomean([per[c] for c in teacher if c != row["holdout"]])}
    return {**summary, "held_out": per[row["holdout"]]} if row["holdout"] else summary


def format_table(results: dict[str, Any]) -> str:
    teacher, corpora = results["teacher"]["perplexity"], results["corpora"]
    loco = results["protocol"]["name"] == "loco"
    rows = [r for r in results["variants"].values() if "error" not in r]
    lines = [f"Protocol: {results['protocol']['describe']}", "",
             f"Evaluation: {results['protocol']['evaluation']}. Budget: {results['budget']} per run; "
             f"{results['threads']} CPU threads. Ratio = student / teacher perplexity.", ""]
    head = "| run | what differs | parameters | tokens | steps | tokens/s | train min | wall min | "
    if loco:
        lines += [head + "held out | held-out ppl | held-out ratio | in-domain ratios | in-domain geomean |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    else:
        lines += [head + " | ".join(corpora) + " | ratio (" + " / ".join(corpora) + ") | geomean ratio |",
                  "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(corpora) + "---|---:|",
                  f"| teacher | - | {results['teacher']['parameters']:,} | - | - | - | - | - | "
                  + " | ".join(f"{teacher[c]:.1f}" for c in corpora) + " | 1 | 1.00 |"]
    for row in rows:
        s, final = summarise(row, teacher), row["curve"][-1]["perplexity"]
        cells = (f"| {row['name']} | {row['description']} | {row['parameters']:,} | {row['tokens_seen']:,} | "
                 f"{row['steps']} | {row['tokens_per_s'] or 0:.1f} | {row['train_seconds'] / 60:.1f} | "
                 f"{row['wall_seconds_without_eval'] / 60:.1f} | ")
        if loco:
            trained = [c for c in corpora if c != row["holdout"]]
            lines.append(cells + f"{row['holdout']} | {final[row['holdout']]:,.1f} | {s['held_out']:.2f} | "
                         + " / ".join(f"{c} {s['per_corpus'][c]:.2f}" for c in trained)
                         + f" | {s['in_domain_geomean']:.2f} |")
        else:
            lines.append(cells + " | ".join(f"{final[c]:,.1f}" for c in corpora) + " | "
                         + " / ".join(f"{s['per_corpus'][c]:.2f}" for c in corpora)
                         + f" | {s['in_domain_geomean']:.2f} |")
    if loco:
        lines += ["", "Teacher perplexity: " + ", ".join(f"{c} {teacher[c]:.1f}" for c in corpora)
                  + f" ({results['teacher']['parameters']:,} parameters).", "",
                  "Per variant, over its held-out choices (geomean): held-out ratio / in-domain ratio", ""]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            mine = [summarise(r, teacher) for r in rows if r["variant"] == variant]
            lines.append(f"- {variant}: {geomean([m['held_out'] for m in mine]):.2f} / "
                         f"{geomean([m['in_domain_geomean'] for m in mine]):.2f} ({len(mine)} held-out choices)")
    failed = [r for r in results["variants"].values() if "error" in r]
    if failed:
        lines += ["", "Failed (not in the table; a rerun retries them):", ""]
        lines += [f"- {r['name']}: {r['error']}" for r in failed]
    lines += ["", "Curve points (tokens: perplexity " + " / ".join(corpora) + "):", ""]
    lines += [f"- {r['name']} (layers {r['layers']}): " + "; ".join(
        f"{p['tokens_seen']:,}: " + "/".join(f"{p['perplexity'][c]:,.1f}" for c in corpora) for p in r["curve"])
        for r in rows]
    lines += ["", "Commands (as plain runs; the curve points stop and resume them):", ""]
    lines += [f"- {r['name']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Test perplexity per corpus against tokens, and the student / teacher ratio (held-out under loco)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora, teacher = results["corpora"], results["teacher"]["perplexity"]
    fig, axes = plt.subplots(1, len(corpora) + 1, figsize=(4.2 * (len(corpora) + 1), 3.8))
    for row in (r for r in results["variants"].values() if "error" not in r):
        xs = [p["tokens_seen"] for p in row["curve"]]
        for ax, c in zip(axes, corpora):
            ax.plot(xs, [p["perplexity"][c] for p in row["curve"]], marker="o", label=row["name"])
        shown = [row["holdout"]] if row["holdout"] else corpora
        axes[-1].plot(xs, [geomean([p["perplexity"][c] / teacher[c] for c in shown]) for p in row["curve"]],
                      marker="o", label=row["name"])
    for ax, c in zip(axes, corpora):
        ax.axhline(teacher[c], color="black", linestyle="--", linewidth=1, label="teacher")
        ax.set_title(f"{c} test perplexity")
    axes[-1].axhline(1.3, color="grey", linestyle=":", linewidth=1, label="1.3x teacher")
    axes[-1].set_title("student / teacher: held-out corpus" if results["protocol"]["name"] == "loco"
                       else "student / teacher (geomean)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe_protocol(loco: bool, corpora: list[str]) -> str:
    if loco:
        return (f"leave one corpus out: each run holds out one of {', '.join(corpora)} (column 'held out'), trains "
                "on the others' training splits only (data.sources) and is scored on every test split; the "
                "held-out ratio is out of domain, the others in domain (the same student)")
    return ("in-domain: every student trains on the same data (data.sources: the recipe's corpus:all unless --set "
            "changes it) and is scored on each corpus's test split")


def start_results(path: Path, setup: dict[str, Any]) -> dict[str, Any]:
    """Earlier results in ``path`` when they were measured the same way, else a fresh start."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    if any(results.get(k) != setup[k] for k in ("budget", "eval_tokens", "protocol", "corpora", "base_overrides")):
        results = {"variants": {}}
    results.update(setup)
    return results


def run_grid(out: Path, variants: dict[str, tuple[str, list[str]]], budget: RunBudget, points: int = 5,
             eval_tokens: int = 16_384, base_overrides: list[str] | None = None, corpora: list[str] | None = None,
             holdouts: list[str] | None = None, curve_every: int = 100, with_plot: bool = True) -> dict[str, Any]:
    """Train and score each job (skipping finished ones); write results, table and plot.
    ``holdouts`` None is the in-domain protocol; a list of corpora is leave-one-corpus-out."""
    import torch

    if points < 2:
        raise VariantError("--points must be at least 2 (the start and the end)")
    corpora = corpora or list(CORPORA)
    if holdouts is not None and (not holdouts or set(holdouts) - set(corpora) or len(corpora) < 2):
        raise VariantError(f"--holdout must name corpora among {', '.join(corpora)} (and leave one to train on)")
    base_overrides = base_overrides or []
    out.mkdir(parents=True, exist_ok=True)
    tasks = eval_tasks(eval_tokens, corpora)
    protocol = {"name": "loco" if holdouts is not None else "in-domain",
                "describe": describe_protocol(holdouts is not None, corpora),
                "evaluation": tasks[0].protocol_.describe() + " on each corpus's test split"}
    results_path = out / "results.json"
    results = start_results(results_path, {
        "recipe": RECIPE, "budget": budget.describe(), "eval_tokens": eval_tokens, "corpora": corpora,
        "protocol": protocol, "base_overrides": base_overrides, "threads": torch.get_num_threads()})
    config = load_config(RECIPE, [*base_overrides, *budget.overrides()])
    tokenizer = load_tokenizer(config.model.teacher)
    if "teacher" not in results:
        teacher = load_model(config.model.teacher)
        results["teacher"] = {"model": config.model.teacher, "parameters": count_parameters(teacher),
                              "perplexity": score(teacher, config.model.teacher, tokenizer, tasks, corpora)}
        print("[teacher] " + ", ".join(f"{c} {p:,.1f}" for c, p in results["teacher"]["perplexity"].items()))
    for job in make_jobs(variants, holdouts, corpora, base_overrides):
        if "error" not in results["variants"].get(job.key, {"error": "not run"}):
            print(f"[{job.key}] already measured; skipped")
            continue
        try:
            row = run_job(job, out, budget, points, curve_every, tasks, corpora, tokenizer, base_overrides)
        except Exception as err:  # noqa: BLE001 - one failure (often a field not there yet) must not stop the grid
            if not isinstance(err, LmdistillError):  # a bug, not a bad setting: keep where it happened
                traceback.print_exc()
            row = {"name": job.key, "variant": job.variant, "overrides": job.overrides, "holdout": job.holdout,
                   "error": f"{type(err).__name__}: {err}"}
            print(f"[{job.key}] failed, skipped: {row['error']}", flush=True)
        results["variants"][job.key] = row
        write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
    write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
    table = format_table(results)
    write_text_atomic(out / "quality_budget.md", table)
    written = [results_path, out / "quality_budget.md"]
    if with_plot and any("error" not in r for r in results["variants"].values()):
        plot(results, out / "quality_budget.png")
        written.append(out / "quality_budget.png")
    print(table)
    print("wrote " + ", ".join(map(str, written)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="variants: " + "; ".join(f"{n} ({d})" for n, (d, _) in VARIANTS.items()))
    parser.add_argument("--out", type=Path, default=Path("runs/quality_budget"))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated names from the registry (listed below); empty for only --variant ones")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDE,OVERRIDE",
                        help="an ad-hoc variant (repeatable), e.g. mine=loss.temperature=1.0,train.lr=2e-3")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, help="training tokens per run (default 100,000)")
    budget.add_argument("--minutes", type=float, help="training minutes per run (train.max_minutes)")
    parser.add_argument("--points", type=int, default=5, help="with --tokens: evaluations from step 0 to the end")
    parser.add_argument("--curve-every", type=int, default=100, help="with --minutes: evaluate every this many steps")
    parser.add_argument("--protocol", choices=["in-domain", "loco"], default="in-domain",
                        help="loco: leave one corpus out (train on the others, score the held-out test split)")
    parser.add_argument("--holdout", default=",".join(CORPORA),
                        help="loco: comma-separated corpora to hold out in turn")
    parser.add_argument("--eval-tokens", type=int, default=16_384, help="test tokens scored per corpus")
    parser.add_argument("--no-plot", action="store_true", help="skip OUT/quality_budget.png (matplotlib)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="extra override for every run (e.g. train.threads=2)")
    args = parser.parse_args()
    if args.curve_every < 1 or (args.tokens is not None and args.tokens < 1) or (args.minutes is not None
                                                                                 and args.minutes <= 0):
        parser.error("--tokens, --minutes and --curve-every must be positive")
    try:
        chosen = choose_variants([v for v in args.variants.split(",") if v], args.variant)
    except VariantError as err:
        parser.error(str(err))
    if not chosen:
        parser.error("no variant chosen: name some with --variants or define one with --variant")
    holdouts = [h for h in args.holdout.split(",") if h] if args.protocol == "loco" else None
    run_grid(args.out, chosen, RunBudget(minutes=args.minutes) if args.minutes else RunBudget(args.tokens or 100_000),
             args.points, args.eval_tokens, args.set, holdouts=holdouts, curve_every=args.curve_every,
             with_plot=not args.no_plot)


if __name__ == "__main__":
    main()

"""Quality per budget: test perplexity of the demo pair against training tokens, for a grid of variants.

Run from the repository root (about 10 minutes per variant on 2 CPU cores at the defaults):

    PYTHONPATH=. python benchmarks/quality_budget.py --out runs/quality_budget
    PYTHONPATH=. python benchmarks/quality_budget.py --variants importance-kd,importance-ce --tokens 50000

Every variant is the bundled ``smollm2-demo`` recipe (SmolLM2-135M teacher -> 15-layer
student, batch 4 x 256 tokens, lr 1e-3 cosine) with a token budget instead of a time budget,
plus the overrides listed in ``VARIANTS``; one variant differs from another in one thing:

- initialisation: every other layer, the 15 of largest block influence (importance), or
  greedy search (removing, one at a time, the layer whose removal raises KL to the teacher
  least, on 1,024 calibration tokens);
- hidden-state loss: the recipe's cosine loss on the last hidden states only, or also on
  every intermediate student layer against the teacher layer it was copied from;
- the objective: distillation (5 KL + 2 CE + 1 cos) or causal-LM cross-entropy only.

Each variant trains through ``lmdistill.train.run_training`` and stops at ``--points``
evenly spaced steps (a checkpoint, then an exact resume), where the student is scored on the
first ``--eval-tokens`` tokens of each bundled corpus's test split (disjoint 512-token
windows, token-level perplexity); the teacher is scored once the same way. Results go to
``OUT/results.json`` after every variant (a rerun skips finished variants and restarts an
unfinished one), then ``OUT/quality_budget.md`` (table) and ``OUT/quality_budget.png`` (plot).
Wall time per variant includes choosing the layers, evaluation excluded; training time is
the time in optimiser steps.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from lmdistill.atomic import write_text_atomic
from lmdistill.train.rundir import RunDir, read_metrics
from lmdistill.config import load_config
from lmdistill.data.corpora import CORPORA
from lmdistill.evaluate.runner import evaluate_loaded
from lmdistill.evaluate.tasks import PerplexityTask
from lmdistill.models.load import load_model, load_tokenizer
from lmdistill.schedule import Budget
from lmdistill.train.run import run_training

RECIPE = "smollm2-demo"
WINDOW = 512

VARIANTS: dict[str, dict[str, Any]] = {
    "every-other-kd": {"init": "every-other", "loss": "KD, last-layer cos",
                       "overrides": ["model.strategy=every-other"]},
    "importance-kd": {"init": "importance", "loss": "KD, last-layer cos",
                      "overrides": ["model.strategy=importance"]},
    "search-kd": {"init": "search (KL, 1,024 tokens)", "loss": "KD, last-layer cos",
                  "overrides": ["model.strategy=search", "model.calibration_tokens=1024"]},
    "importance-kd-align": {"init": "importance", "loss": "KD, last-layer cos + all-layer cos",
                            "overrides": ["model.strategy=importance", "loss.align_cos=1.0"]},
    "importance-ce": {"init": "importance", "loss": "causal-LM CE only",
                      "overrides": ["model.strategy=importance", "loss.kl=0", "loss.cos=0", "loss.ce=1.0"]},
}


def budget_overrides(tokens: int) -> list[str]:
    return [f"train.max_tokens={tokens}", "train.max_minutes=null", "train.eval_every=0", "train.checkpoint_every=0"]


def eval_tasks(eval_tokens: int, corpora: list[str]) -> list[PerplexityTask]:
    tasks = [PerplexityTask("ppl", {"corpus": name, "split": "test", "window": str(WINDOW),
                                    "max_tokens": str(eval_tokens)}) for name in corpora]
    for task in tasks:
        task.load()
    return tasks


def score(model_path: str | Path, tokenizer, tasks: list[PerplexityTask], corpora: list[str]) -> dict[str, float]:
    row = evaluate_loaded(load_model(model_path), tokenizer, tasks, str(model_path))
    return {name: row["tasks"][task.label]["perplexity"] for name, task in zip(corpora, tasks)}


def stop_steps(total_steps: int, points: int) -> list[int]:
    """``points`` evenly spaced steps from 0 to ``total_steps`` (both included)."""
    return sorted({round(k * total_steps / (points - 1)) for k in range(points)})


def run_variant(name: str, spec: dict[str, Any], out: Path, tokens: int, points: int, tasks, corpora,
                tokenizer, base_overrides: list[str]) -> dict[str, Any]:
    overrides = [*base_overrides, *budget_overrides(tokens), *spec["overrides"]]
    config = load_config(RECIPE, overrides)
    run = RunDir(out / name)
    tokens_per_step = config.data.block_size * config.train.batch_size * config.train.grad_accum
    # The steps the run will take: a token budget rounds down to whole steps, as in training.
    total_steps = Budget.from_config(None, tokens, None, tokens_per_step).total_steps
    curve: list[dict[str, Any]] = []
    if run.root.exists():  # a variant killed half-way: its earlier curve points are gone, so start again
        shutil.rmtree(run.root)
    started = time.perf_counter()
    eval_seconds = 0.0

    def evaluate(step: int, model_path: Path) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        ppl = score(model_path, tokenizer, tasks, corpora)
        eval_seconds += time.perf_counter() - t0
        seen = max([r["tokens_seen"] for r in read_metrics(run.metrics) if r.get("step") == step] or [0])
        curve.append({"step": step, "tokens_seen": seen, "perplexity": ppl})
        print(f"[{name}] step {step} ({seen:,} tokens): " + ", ".join(f"{c} {p:,.1f}" for c, p in ppl.items()),
              flush=True)

    for step in stop_steps(total_steps, points)[1:]:
        if run.config.is_file():
            summary = run_training(None, run.root, resume=True, stop_at_step=step, progress=False)
        else:
            summary = run_training(config, run.root, stop_at_step=step, progress=False)
            evaluate(0, run.student_init)  # written before the first step
        evaluate(step, run.student if summary["finished"] else run.latest_checkpoint() / "student")
    train_rows = [r for r in read_metrics(run.metrics) if "loss" in r]
    choice = json.loads((run.student_init / "config.json").read_text()).get("lmdistill_layer_choice")
    return {
        "name": name, "init": spec["init"], "loss": spec["loss"], "overrides": spec["overrides"],
        "command": distill_command(name, spec["overrides"], tokens),
        "layers": json.loads((run.student_init / "config.json").read_text()).get("lmdistill_layer_map"),
        "layer_choice_cuts": choice["cuts"] if choice else None,
        "curve": curve, "train_seconds": train_rows[-1]["elapsed_s"] if train_rows else 0.0,
        "wall_seconds_without_eval": round(time.perf_counter() - started - eval_seconds, 1),
        "tokens_seen": curve[-1]["tokens_seen"],
    }


def distill_command(name: str, overrides: list[str], tokens: int) -> str:
    return (f"lmdistill distill --config {RECIPE} --out runs/{name} "
            + " ".join([*budget_overrides(tokens), *overrides]))


def ratios(variant: dict[str, Any], teacher: dict[str, float]) -> dict[str, float]:
    final = variant["curve"][-1]["perplexity"]
    per = {c: final[c] / teacher[c] for c in teacher}
    per["geomean"] = math.exp(sum(math.log(v) for v in per.values()) / len(teacher))
    return per


def format_table(results: dict[str, Any]) -> str:
    teacher, corpora = results["teacher"]["perplexity"], results["corpora"]
    lines = [
        f"Protocol: {results['protocol']}. Budget: {results['tokens']:,} training tokens; "
        f"{results['threads']} CPU threads. Ratio = student / teacher perplexity (geomean over corpora).",
        "",
        "| variant | init | loss | tokens | train min | wall min | " + " | ".join(corpora)
        + " | ratio (" + " / ".join(corpora) + ") | geomean ratio |",
        "|---|---|---|---:|---:|---:|" + "---:|" * len(corpora) + "---|---:|",
        "| teacher | - | - | - | - | - | " + " | ".join(f"{teacher[c]:.1f}" for c in corpora) + " | 1 | 1.00 |",
    ]
    for v in results["variants"].values():
        final, r = v["curve"][-1]["perplexity"], ratios(v, teacher)
        lines.append(
            f"| {v['name']} | {v['init']} | {v['loss']} | {v['tokens_seen']:,} | {v['train_seconds'] / 60:.1f} | "
            f"{v['wall_seconds_without_eval'] / 60:.1f} | " + " | ".join(f"{final[c]:,.1f}" for c in corpora)
            + " | " + " / ".join(f"{r[c]:.2f}" for c in corpora) + f" | {r['geomean']:.2f} |")
    lines += ["", "Initial perplexity (step 0) and curve points:", ""]
    for v in results["variants"].values():
        points = "; ".join(f"{p['tokens_seen']:,}: " + "/".join(f"{p['perplexity'][c]:,.1f}" for c in corpora)
                           for p in v["curve"])
        lines.append(f"- {v['name']} (layers {v['layers']}): {points}")
    lines += ["", "Commands (one variant each, same figures):", ""]
    for v in results["variants"].values():
        lines.append(f"- {v['name']}: `PYTHONPATH=. python benchmarks/quality_budget.py --variants {v['name']} "
                     f"--tokens {results['tokens']}`; as a plain run: `{v['command']}`")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora, teacher = results["corpora"], results["teacher"]["perplexity"]
    fig, axes = plt.subplots(1, len(corpora) + 1, figsize=(4.2 * (len(corpora) + 1), 3.8))
    for v in results["variants"].values():
        xs = [p["tokens_seen"] for p in v["curve"]]
        for ax, c in zip(axes, corpora):
            ax.plot(xs, [p["perplexity"][c] for p in v["curve"]], marker="o", label=v["name"])
        geo = [math.exp(sum(math.log(p["perplexity"][c] / teacher[c]) for c in corpora) / len(corpora))
               for p in v["curve"]]
        axes[-1].plot(xs, geo, marker="o", label=v["name"])
    for ax, c in zip(axes, corpora):
        ax.axhline(teacher[c], color="black", linestyle="--", linewidth=1, label="teacher")
        ax.set_title(f"{c} test perplexity")
    axes[-1].axhline(3.0, color="grey", linestyle=":", linewidth=1, label="3x teacher")
    axes[-1].set_title("student / teacher (geomean)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_grid(out: Path, variants: list[str], tokens: int, points: int, eval_tokens: int,
             base_overrides: list[str] | None = None, corpora: list[str] | None = None) -> dict[str, Any]:
    """Train and score each variant (skipping finished ones); write results, table and plot."""
    import torch

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if points < 2:
        raise SystemExit("--points must be at least 2 (the start and the end)")
    base_overrides = base_overrides or []
    corpora = corpora or list(CORPORA)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("tokens") != tokens or results.get("eval_tokens") != eval_tokens:
        results = {"variants": {}}
    config = load_config(RECIPE, [*base_overrides, *budget_overrides(tokens)])
    tokenizer = load_tokenizer(config.model.teacher)
    tasks = eval_tasks(eval_tokens, corpora)
    results.update({
        "recipe": RECIPE, "tokens": tokens, "eval_tokens": eval_tokens, "corpora": corpora,
        "threads": torch.get_num_threads(), "base_overrides": base_overrides,
        "protocol": tasks[0].protocol_.describe() + " on each corpus's test split",
    })
    if "teacher" not in results:
        results["teacher"] = {"model": config.model.teacher,
                              "perplexity": score(config.model.teacher, tokenizer, tasks, corpora)}
        print("[teacher] " + ", ".join(f"{c} {p:,.1f}" for c, p in results["teacher"]["perplexity"].items()))
    for name in variants:
        if name in results["variants"]:
            print(f"[{name}] already measured; skipped")
            continue
        results["variants"][name] = run_variant(name, VARIANTS[name], out, tokens, points, tasks, corpora,
                                                tokenizer, base_overrides)
        write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
    write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
    table = format_table(results)
    write_text_atomic(out / "quality_budget.md", table)
    plot(results, out / "quality_budget.png")
    print(table)
    print(f"wrote {results_path}, {out / 'quality_budget.md'} and {out / 'quality_budget.png'}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quality_budget"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--tokens", type=int, default=100_000, help="training tokens per variant")
    parser.add_argument("--points", type=int, default=5, help="evaluations from step 0 to the end, evenly spaced")
    parser.add_argument("--eval-tokens", type=int, default=16_384, help="test tokens scored per corpus")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="extra override for every variant (e.g. train.threads=2)")
    args = parser.parse_args()
    run_grid(args.out, [v for v in args.variants.split(",") if v], args.tokens, args.points, args.eval_tokens,
             args.set)


if __name__ == "__main__":
    main()

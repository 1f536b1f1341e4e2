"""Stored teacher targets against the live teacher, on the demo recipe, side by side.

Run from the repository root (about 25 minutes on 2 CPU cores at the defaults):

    PYTHONPATH=. python benchmarks/teacher_cache.py --out runs/teacher_cache
    PYTHONPATH=. python benchmarks/teacher_cache.py --out runs/tc --variants live,cached,bucket --steps 60

What it does:

1. Data: the bundled corpora cut to ``--train-chars`` of training text (an equal share of each
   corpus, its training documents in file order) and ``--eval-chars`` of validation and test
   text, written to ``OUT/data``. A cache covers the whole training split, and the teacher
   runs over it once: on the full 2.9M-token demo split that is hours on 2 CPU cores, while a
   run of ``--steps`` steps reads ``steps x 1,024`` tokens. The default 600,000 characters
   are 137,144 tokens, 535 blocks of 256: 140 steps of 4 blocks read each block once and 25
   of them twice.
2. Caches: ``lmdistill cache-teacher --top-k K --temperatures 2 --block-size 256`` with
   ``--tail-samples S`` (variant ``cached``) and, for variant ``bucket``, with 0 tail samples.
   The wall time of each build is printed.
3. Runs, one after another, each in its own process: the ``smollm2-demo`` recipe on that data
   for ``--steps`` steps (``train.max_steps``, so both have the same learning-rate schedule),
   with the recipe's loss terms that a cache can serve: ``5 KL(T=2) + 2 CE`` (the cosine
   term needs the teacher's hidden states, so it is off in every variant). Same seed, same
   initial student (the importance cut of the teacher; the cached runs load the teacher only
   to cut it), same batches. ``live`` runs the teacher on every batch; ``cached`` and
   ``bucket`` read the caches instead and never keep the teacher. ``live-seed1`` is ``live``
   with ``train.seed=1`` (another order of the batches): how far two live runs drift apart
   gives the scale of the gaps.
4. Report: validation perplexity at every evaluation (``--eval-every`` steps, on the first
   ``--eval-tokens`` validation tokens, the same for all), its gap to ``live``, and training
   tokens/s (tokens of all steps / seconds in optimiser steps, evaluation excluded) with the
   ratio to ``live``. Printed, and written to ``OUT/teacher_cache.md`` and
   ``OUT/results.json``.

Runs are skipped when ``OUT/runs/NAME/summary.json`` exists (delete it to redo one). Compare
tokens/s only between runs of one invocation on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lmdistill.atomic import write_text_atomic
from lmdistill.train.rundir import read_metrics
from lmdistill.data.corpora import CORPORA, corpus_documents

RECIPE = "smollm2-demo"
TEACHER = "smollm2-135m"
BLOCK = 256
TEMPERATURE = 2.0
VARIANTS = ("live", "cached", "bucket", "live-seed1")


def write_data(out: Path, train_chars: int, eval_chars: int) -> Path:
    """``out/{train,validation,test}.txt``: an equal share of each bundled corpus's split."""
    out.mkdir(parents=True, exist_ok=True)
    for split, chars in (("train", train_chars), ("validation", eval_chars), ("test", eval_chars)):
        share, parts = chars // len(CORPORA), []
        for name in CORPORA:
            text = "\n\n".join(doc.text for doc in corpus_documents(name, split))
            parts.append(text[:share])
        path = out / f"{split}.txt"
        text = "\n\n".join(parts)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            write_text_atomic(path, text)
    return out


def lmdistill(*args: str, log: Path) -> float:
    """Run ``python -m lmdistill ARGS`` in a fresh process, output to ``log``; wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "lmdistill", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"lmdistill {args[0]} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def build_cache(data: Path, out: Path, top_k: int, tail_samples: int, log: Path) -> float | None:
    if any(out.glob("train.*-of-*.bin")):
        return None  # complete already (cache-teacher would only verify it)
    return lmdistill("cache-teacher", "--teacher", TEACHER, "--data", str(data), "--top-k", str(top_k),
                     "--temperatures", f"{TEMPERATURE:g}", "--block-size", str(BLOCK),
                     "--tail-samples", str(tail_samples), "--out", str(out), log=log)


def train(run: Path, data: Path, cache: Path | None, args: argparse.Namespace, seed: int = 0) -> dict:
    if (run / "summary.json").exists():
        return json.loads((run / "summary.json").read_text())
    overrides = [f"data.sources=[{data}]", "model.strategy=importance", "loss.cos=0", "train.max_minutes=null",
                 f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}",
                 f"train.eval_tokens={args.eval_tokens}", "train.checkpoint_every=0", f"train.seed={seed}"]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    if run.exists():  # an unfinished run from an interrupted benchmark: start it again
        import shutil

        shutil.rmtree(run)
    extra = ["--teacher-cache", str(cache)] if cache is not None else []
    lmdistill("distill", "--config", RECIPE, "--out", str(run), *extra, *overrides, log=run.with_suffix(".log"))
    return json.loads((run / "summary.json").read_text())


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    names = list(results)
    steps = sorted({s for r in results.values() for s in r["val_ppl"]}, key=int)
    lines = [
        f"Stored teacher targets vs the live teacher: {RECIPE} recipe (SmolLM2-135M -> 15-layer importance cut), "
        f"loss 5 KL(T={TEMPERATURE:g}) + 2 CE, batch 4 x {BLOCK}, {args.steps} steps, on "
        f"{args.train_chars:,} characters of bundled training text; cache top-{args.top_k}"
        f" with {args.tail_samples} tail samples (`cached`) or the tail bucket only (`bucket`).",
        "",
        "Validation perplexity (first {:,} validation tokens):".format(args.eval_tokens),
        "",
        "| step | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    live = results.get("live")
    for step in steps:
        cells = []
        for name in names:
            ppl = results[name]["val_ppl"].get(step)
            cell = "" if ppl is None else f"{ppl:.2f}"
            if ppl is not None and live and name != "live" and step in live["val_ppl"]:
                cell += f" ({100 * (ppl / live['val_ppl'][step] - 1):+.1f}%)"
            cells.append(cell)
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "| run | train tokens/s | vs live | train seconds | cache build (s) |", "|---|---:|---:|---:|---:|"]
    for name in names:
        r = results[name]
        ratio = f"{r['tokens_per_s'] / live['tokens_per_s']:.2f}x" if live else ""
        build = "" if r.get("cache_build_s") is None else f"{r['cache_build_s']:.0f}"
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {ratio} | {r['train_seconds']:.1f} | {build} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/teacher_cache"))
    p.add_argument("--variants", default="live,cached", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=140)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--tail-samples", type=int, default=256)
    p.add_argument("--train-chars", type=int, default=600_000)
    p.add_argument("--eval-chars", type=int, default=60_000)
    p.add_argument("--threads", type=int, default=0, help="train.threads (0: torch's default)")
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    out = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    data = write_data(out / "data", args.train_chars, args.eval_chars)
    caches = {"cached": (out / f"cache-k{args.top_k}-s{args.tail_samples}", args.tail_samples),
              "bucket": (out / f"cache-k{args.top_k}-s0", 0)}
    results: dict[str, dict] = {}
    for name in variants:
        cache, build_s = None, None
        if name in caches:
            cache, samples = caches[name]
            build_s = build_cache(data, cache, args.top_k, samples, out / f"{cache.name}.log")
            if build_s is not None:
                print(f"[{name}] cache built in {build_s:.0f} s: {cache}", flush=True)
        summary = train(out / "runs" / name, data, cache, args, seed=1 if name == "live-seed1" else 0)
        metrics = read_metrics(out / "runs" / name / "metrics.jsonl")
        val = {str(r["step"]): r["val_ppl"] for r in metrics if "val_ppl" in r}
        results[name] = {"val_ppl": val, "train_seconds": summary["train_seconds"],
                         "tokens_per_s": summary["tokens_seen"] / summary["train_seconds"],
                         "tokens_seen": summary["tokens_seen"], "cache_build_s": build_s}
        print(f"[{name}] {summary['step']} steps, validation perplexity {summary['val_ppl']:.2f}, "
              f"{results[name]['tokens_per_s']:.1f} tokens/s", flush=True)
        write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    table = report(results, args)
    write_text_atomic(out / "teacher_cache.md", table)
    print(table)


if __name__ == "__main__":
    main()

"""Check on a GPU machine that evaluation and training give the CPU's results on CUDA.

Run from the repository root on a machine with CUDA (no network needed):

    PYTHONPATH=. python benchmarks/cuda_check.py --tokenizer DIR --out results.json

``DIR`` is a saved GPT-2 tokenizer folder (``load_tokenizer("gpt2").save_pretrained(DIR)``
on a machine with the offline files). It builds a small GPT-2-shaped teacher with random
weights, then:

1. scores it with every offline evaluation task on the CPU and on CUDA, and compares
   (accuracies identical, perplexities to 1e-4 relative);
2. runs the same 8-step distillation on the CPU and on CUDA, and compares the losses;
3. times a few distillation steps of a GPT-2-124M-shaped teacher into DistilGPT2's 6 layers
   at sequence length 1024 on CUDA (float32), and reports tokens/s.

It prints one line per comparison and writes everything as JSON; exit status 1 if any
comparison fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmdistill.train.rundir import read_metrics
from lmdistill.recipe import load_config
from lmdistill.evaluate.runner import evaluate_models
from lmdistill.evaluate.tasks import parse_tasks
from lmdistill.models.load import load_tokenizer
from lmdistill.train.run import run_training

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "lm_eval_tasks" / "fixtures"


def save_teacher(folder: Path, tokenizer, n_layer: int, n_embd: int, n_head: int, n_positions: int) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def compare_eval(teacher: Path, other: str) -> tuple[dict, bool]:
    specs = ["ppl:corpus=moby_dick:window=256:max_tokens=8192", "rolling:corpus=moby_dick:max_docs=2",
             f"lambada:path={FIXTURES / 'lambada_openai.jsonl'}", f"hellaswag:path={FIXTURES / 'hellaswag.jsonl'}",
             "lastword:max_docs=100"]
    results = {}
    for run_name, device in (("reference", "cpu"), ("compared", other)):
        tasks = [t for spec in specs for t in parse_tasks(spec)]
        started = time.perf_counter()
        results[run_name] = evaluate_models([str(teacher)], tasks, batch_size=8, device=device)
        results[run_name]["seconds"] = round(time.perf_counter() - started, 2)
    ok = True
    cpu_row, cuda_row = results["reference"]["models"][0]["tasks"], results["compared"]["models"][0]["tasks"]
    for task in results["reference"]["tasks"]:
        for metric in task["metrics"]:
            a, b = cpu_row[task["label"]][metric], cuda_row[task["label"]][metric]
            same = a == b if "acc" in metric else math.isclose(a, b, rel_tol=1e-4)
            ok &= same
            print(f"eval {task['label']:>18} {metric:>16}: cpu {a:.6g}  {other} {b:.6g}  {'ok' if same else 'DIFFERENT'}")
    return results, ok


def compare_training(teacher: Path, work: Path, other: str) -> tuple[dict, bool]:
    losses = {}
    for run_name, device in (("reference", "cpu"), ("compared", other)):
        config = load_config(None, [
            f"model.teacher={teacher}", "model.num_layers=2", "data.sources=[corpus:moby_dick]",
            f"data.prepared_dir={work / 'data'}", "data.block_size=128", "train.batch_size=4", "train.max_steps=8",
            "train.eval_every=0", "train.checkpoint_every=0", "train.eval_tokens=1024", f"train.device={device}",
            "train.precision=fp32", "train.tf32=false",  # parity with the CPU: no bf16 autocast, no TF32
        ])
        run_training(config, work / run_name, progress=False)
        losses[run_name] = [r["loss"] for r in read_metrics(work / run_name / "metrics.jsonl") if "loss" in r]
    worst = max(abs(a - b) / abs(a) for a, b in zip(losses["reference"], losses["compared"]))
    ok = worst < 1e-3
    print(f"train 8 steps: worst relative loss difference cpu vs cuda {worst:.2e} {'ok' if ok else 'DIFFERENT'}")
    return {"losses": losses, "worst_relative_difference": worst}, ok


def time_distilgpt2_step(tokenizer, work: Path) -> dict:
    teacher = save_teacher(work / "gpt2-124m", tokenizer, 12, 768, 12, 1024)
    config = load_config("distilgpt2", [
        f"model.teacher={teacher}", "data.sources=[corpus:all]", f"data.prepared_dir={work / 'data-gpt2'}",
        "train.batch_size=8", "train.grad_accum=1", "train.max_steps=12", "train.eval_every=0",
        "train.checkpoint_every=0", "train.eval_tokens=8192", "train.device=cuda", "train.precision=fp32",
        "train.tf32=false",
    ])
    run_training(config, work / "run-distilgpt2", progress=False)
    rows = [r for r in read_metrics(work / "run-distilgpt2" / "metrics.jsonl") if "loss" in r]
    steady = rows[4:]  # the first steps include CUDA start-up and allocator warm-up
    result = {
        "device": torch.cuda.get_device_name(), "dtype": "float32", "seq": 1024, "batch": 8,
        "tokens_per_s_median": sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2],
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "losses": [r["loss"] for r in rows],
    }
    print(f"distilgpt2 step on {result['device']}: {result['tokens_per_s_median']:.0f} tokens/s (float32, seq 1024, "
          f"batch 8, median of steps 5-12), peak memory {result['peak_memory_gib']} GiB")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="saved GPT-2 tokenizer folder")
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--against", default="cuda", help="device compared with the CPU (cpu: a dry run of the script)")
    args = parser.parse_args()
    if args.against.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="lmdistill-cuda-"))
    teacher = save_teacher(work / "teacher", tokenizer, 4, 128, 4, 256)
    eval_results, eval_ok = compare_eval(teacher, args.against)
    train_results, train_ok = compare_training(teacher, work, args.against)
    speed = time_distilgpt2_step(tokenizer, work) if args.against.startswith("cuda") else None
    Path(args.out).write_text(json.dumps({"eval": eval_results, "train": train_results, "distilgpt2_speed": speed,
                                          "torch": torch.__version__}, indent=2) + "\n")
    print("ALL OK" if eval_ok and train_ok else "SOME CHECKS FAILED")
    return 0 if eval_ok and train_ok else 1


if __name__ == "__main__":
    sys.exit(main())

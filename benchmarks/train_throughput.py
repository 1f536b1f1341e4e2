"""Tokens/s and MFU of one distillation step (teacher forward + student forward/backward +
losses + optimiser step), for given recipes and sequence lengths.

Run from the repository root:

    PYTHONPATH=. python benchmarks/train_throughput.py --out results.json
    PYTHONPATH=. python benchmarks/train_throughput.py --recipe my.yaml --seq 512 --batch 8 --device cuda

Recipes (``--recipe``, several allowed):

- ``smollm2-demo``: the bundled demo (SmolLM2-135M teacher, 15-layer student);
- ``gpt2-124m-random``: the ``distilgpt2`` recipe (12 → 6 layers, DistilGPT2's layer map)
  with a GPT-2-124M-shaped teacher of random weights (``GPT2Config()`` defaults, dropout
  0.1 included) and the real GPT-2 tokenizer, saved to a temporary folder: speed does not
  depend on the weights, and no download is needed;
- any other bundled recipe name or YAML file, used as written (its teacher must load).

Each (recipe, seq) builds its set-up with ``lmdistill.train.setup.build_setup`` from the recipe
plus overrides (``data.block_size=SEQ``, ``train.batch_size=B``, ``train.grad_accum=1``, a
small data source so preparation is quick, ``train.device``; ``--set`` adds more), runs one
warm-up ``train_step`` (timed apart: first-call allocation and kernel selection), then times
``--steps`` steps, synchronising the device before and after each.

MFU = (matmul FLOPs of the step / median step time) / peak, where the FLOPs come from
:func:`lmdistill.measure.flops.step_flops` (teacher 2N + student 6N per token, plus attention, no
causal halving; see that module) and the peak is *measured* in the same run on the same
device and dtype: the best of several square matmuls (2048 on CPU, 8192 on CUDA), timed at
the start and again at the end, best of both. MFU here is thus relative to what this machine
achieved on a large plain matmul, not to a datasheet number.

It prints a table and writes everything as JSON (device, threads, versions, dtype, per-step
times, FLOP breakdown).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from lmdistill.recipe import load_config
from lmdistill.data.sampler import BlockSampler
from lmdistill.measure.flops import matmul_params, matmul_peak, step_flops
from lmdistill.models.arch import config_num_layers
from lmdistill.models.device import cpu_name, resolve_device
from lmdistill.models.load import load_tokenizer
from lmdistill.train.setup import build_setup, make_optimizer
from lmdistill.train.step import train_step

RANDOM_GPT2 = "gpt2-124m-random"
DEFAULT_RECIPES = ["smollm2-demo", RANDOM_GPT2]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_random_gpt2(folder: Path) -> Path:
    """A GPT-2-124M-shaped teacher (GPT2Config defaults, dropout included) with random weights
    (seed 0) and the real tokenizer, written once, atomically (``benchmarks/peers.py`` keeps it)."""
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(scratch)
    load_tokenizer("gpt2").save_pretrained(scratch)
    scratch.rename(folder)
    return folder


def recipe_config(recipe: str, seq: int, batch: int, device: str, source: str, extra: list[str], work: Path):
    overrides = [f"data.block_size={seq}", f"train.batch_size={batch}", "train.grad_accum=1",
                 f"data.sources=[{source}]", f"train.device={device}",
                 "train.precision=fp32", "train.tf32=false"]  # float32, as the peak it is compared with
    if recipe == RANDOM_GPT2:
        teacher = save_random_gpt2(work / "gpt2-124m")
        return load_config("distilgpt2", [f"model.teacher={teacher}", *overrides, *extra])
    return load_config(recipe, [*overrides, *extra])


def bench_case(recipe: str, seq: int, args: argparse.Namespace, work: Path) -> dict:
    config = recipe_config(recipe, seq, args.batch, args.device, args.source, args.set, work)
    started = time.perf_counter()
    setup = build_setup(config)
    setup_s = time.perf_counter() - started
    optimizer = make_optimizer(config, setup.student)
    train_tokens = setup.data.tokens("train")
    sampler = BlockSampler(len(train_tokens), seq, config.train.batch_size, seed=config.train.seed)
    tokens_per_step = sampler.tokens_per_batch  # grad_accum is 1

    def one_step() -> float:
        batches = [sampler.next_batch(train_tokens) for _ in range(config.train.grad_accum)]
        synchronize(setup.device)
        t0 = time.perf_counter()
        train_step(setup, optimizer, batches)
        synchronize(setup.device)
        return time.perf_counter() - t0

    load_before = load_average()
    warmup = [one_step() for _ in range(args.warmup)]
    times = [one_step() for _ in range(args.steps)]
    load_after = load_average()
    median = statistics.median(times)
    flops = step_flops(setup.teacher, setup.student, seq, tokens_per_step)
    result = {
        "recipe": recipe,
        "teacher": config.model.teacher,
        "teacher_layers": config_num_layers(setup.teacher.config) if setup.teacher is not None else None,
        "student_layers": config_num_layers(setup.student.config),
        "teacher_matmul_params": matmul_params(setup.teacher) if setup.teacher is not None else 0,
        "student_matmul_params": matmul_params(setup.student),
        "seq": seq,
        "batch": config.train.batch_size,
        "grad_accum": config.train.grad_accum,
        "tokens_per_step": tokens_per_step,
        "setup_s": round(setup_s, 2),
        "warmup_step_s": warmup,
        "step_s": times,
        "median_step_s": median,
        "tokens_per_s": tokens_per_step / median,
        "best_step_s": min(times),
        "tokens_per_s_best": tokens_per_step / min(times),
        "flops": flops,
        "achieved_flops_per_s": flops["total"] / median,
        "achieved_flops_per_s_best": flops["total"] / min(times),
        "load_average_1min": [load_before, load_after],
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(setup.device) / 2**30, 2) if setup.device.type == "cuda" else None,
        "config": config.to_dict(),
    }
    del setup, optimizer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def load_average() -> float | None:
    """The 1-minute load average (CPU contention from other processes skews CPU timings)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def print_table(cases: list[dict], peak: float) -> None:
    scale, unit = (1e12, "TFLOP/s") if peak >= 1e12 else (1e9, "GFLOP/s")
    header = f"{'recipe':<18} {'seq':>5} {'batch':>5} {'tokens/s':>10} {'step s':>8} {'achieved ' + unit:>17} {'peak ' + unit:>13} {'MFU':>7}"
    print(header)
    print("-" * len(header))
    for c in cases:
        print(f"{c['recipe']:<18} {c['seq']:>5} {c['batch']:>5} {c['tokens_per_s']:>10.1f} {c['median_step_s']:>8.3f} "
              f"{c['achieved_flops_per_s'] / scale:>17.2f} {peak / scale:>13.2f} {c['mfu']:>7.1%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--recipe", nargs="+", default=DEFAULT_RECIPES,
                        help=f"bundled recipe names or YAML files, or {RANDOM_GPT2} (default: %(default)s)")
    parser.add_argument("--seq", nargs="+", type=int, default=[256, 1024], help="sequence lengths (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: 1 on CPU, 8 on CUDA)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per case (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument("--source", default="corpus:moby_dick", help="data source to sample blocks from (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="extra config override for every case (repeatable), e.g. train.threads=2")
    parser.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default: 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--out", default="train_throughput.json", help="JSON results file (default: %(default)s)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    device = resolve_device(args.device)
    args.device = str(device)
    if args.batch is None:
        args.batch = 8 if device.type == "cuda" else 1
    dtype = torch.float32  # build_setup loads teacher and student in float32
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    work = Path(tempfile.mkdtemp(prefix="lmdistill-throughput-"))

    print(f"[throughput] device {device_name(device)} ({device}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    peak_before = matmul_peak(device, dtype, peak_size)
    print(f"[throughput] peak {peak_size}x{peak_size} {str(dtype).removeprefix('torch.')} matmul: "
          f"{peak_before['flops_per_s'] / 1e9:.1f} GFLOP/s")
    cases = []
    try:
        for recipe in args.recipe:
            for seq in args.seq:
                print(f"[throughput] {recipe} seq {seq} batch {args.batch}: {args.warmup} warm-up + {args.steps} timed steps")
                case = bench_case(recipe, seq, args, work)
                print(f"[throughput]   median step {case['median_step_s']:.3f} s, {case['tokens_per_s']:.1f} tokens/s")
                cases.append(case)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the random GPT-2 teacher is 500 MB
    peak_after = matmul_peak(device, dtype, peak_size)
    peak = max(peak_before["flops_per_s"], peak_after["flops_per_s"])
    for case in cases:
        case["mfu"] = case["achieved_flops_per_s"] / peak
        case["mfu_best_step"] = case["achieved_flops_per_s_best"] / peak

    print()
    print_table(cases, peak)
    busy = [c["recipe"] + f" seq {c['seq']}" for c in cases
            if device.type == "cpu" and any(l is not None and l > torch.get_num_threads() + 1 for l in c["load_average_1min"])]
    if busy:
        print(f"[throughput] warning: the machine was busy with other work (1-minute load average above this run's {torch.get_num_threads()} threads + 1) "
              f"during {', '.join(busy)}; CPU timings are noisy. best-step MFU: "
              + ", ".join(f"{c['recipe']} seq {c['seq']} {c['mfu_best_step']:.1%}" for c in cases))
    result = {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "flop_convention": "matmul FLOPs only; teacher 2N+attn, student 3x(2N+attn); attention 4*L*H*hd*seq per token, "
                           "no causal halving; N = Linear/Conv1D weights incl. lm_head, excl. embeddings (lmdistill.measure.flops)",
        "peak": {"before": peak_before, "after": peak_after, "flops_per_s": peak, "dtype": str(dtype).removeprefix("torch.")},
        "cases": cases,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n[throughput] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

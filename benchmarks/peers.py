"""Distillation step speed and memory: lmdistill against TRL's GKDTrainer, side by side.

Run from the repository root, on a quiet machine:

    PYTHONPATH=. .venv/bin/python benchmarks/peers.py                      # every shape, 2 rounds
    PYTHONPATH=. .venv/bin/python benchmarks/peers.py --shapes gpt2-4x256 --rounds 1

Each measurement is a fresh process: lmdistill through its own ``lmdistill distill`` command
(the recipe as shipped, with the shape's overrides), TRL through ``benchmarks/peers_trl.py``
in a virtual environment this script builds once (``$LMDISTILL_CACHE/peers-venv``: TRL
pinned from PyPI beside this project's torch and transformers versions, as the lm-eval
parity test does). Both start from the same teacher and the same student folder (cut once
by ``lmdistill init-student``; lmdistill gets it as ``model.student``), float32, the same
batch and block, the same threads. Rounds interleave the systems so that a drift of the machine hits both.

Shapes:

- ``gpt2-4x256`` and ``gpt2-8x1024``: a GPT-2-124M-shaped teacher with random weights (speed
  does not depend on the weights; no download) and the real GPT-2 tokenizer, student layers
  0,2,4,7,9,11 (DistilGPT2's), the ``distilgpt2`` recipe; 8 x 1024 is DistilGPT2's own block.
- ``demo``: the bundled SmolLM2-135M teacher and the demo's 15-layer importance cut, batch
  4 x 256, the ``smollm2-demo`` recipe.

Systems: ``lmdistill`` (the live teacher), ``trl``, and ``lmdistill-cache``: lmdistill reading
stored teacher targets instead of running the teacher (``lmdistill cache-teacher --top-k 64``
with its default tail samples, built once per shape over the first ``CACHE_CHARS`` characters
of the source's training documents; the recipe's loss without its cosine term, which a cache
cannot serve). TRL has no such path; its limit is the step without the teacher forward.

Per process: step time = wall time between the ends of consecutive optimiser steps (data,
forward, backward, optimiser and logging: lmdistill's ``elapsed_s`` in ``metrics.jsonl``, a
step-end callback in TRL), median over the steps after the first; peak RSS two ways, both read
from ``/proc/PID/status`` every 0.25 s: the largest ``VmRSS`` seen, and the kernel's own
high-water mark ``VmHWM`` (which also catches peaks between readings; its last reading is at
most 0.25 s before the process ends). A process whose RSS passes ``--max-rss-gib`` is killed and reported
so (TRL at 8 x 1024 needs more than this machine's 24 GB). Achieved FLOP/s use
:func:`lmdistill.measure.flops.step_flops` (matmul FLOPs; teacher forward + student forward
+ 2x backward); MFU is against the float32 matmul peak measured here before and after the
rounds (best of both); the limit is that peak divided by the FLOPs per token.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TRL_VERSION = "1.16.0"
SYSTEMS = ("lmdistill", "lmdistill-cache", "trl")
CACHE_CHARS = 300_000  # about 70,000 GPT-2 tokens: a cache build of about a minute per shape
CACHE_TOP_K = 64
POLL_S = 0.25


@dataclass(frozen=True)
class Shape:
    name: str
    recipe: str
    teacher: str  # "random-gpt2" or a model spec lmdistill resolves
    cut: tuple[str, ...]  # init-student flags that make the same student distill cuts
    batch: int
    seq: int
    steps: int


SHAPES = {
    shape.name: shape for shape in [
        Shape("gpt2-4x256", "distilgpt2", "random-gpt2", ("--layers", "0,2,4,7,9,11"), 4, 256, 8),
        Shape("gpt2-8x1024", "distilgpt2", "random-gpt2", ("--layers", "0,2,4,7,9,11"), 8, 1024, 3),
        Shape("demo", "smollm2-demo", "smollm2-135m",
              ("--num-layers", "15", "--strategy", "importance", "--calibration", "corpus:all"), 4, 256, 8),
    ]
}


@dataclass
class Measured:
    """One process: its exit, its peak memory, and (when it finished) its step ends."""

    returncode: int
    sampled_peak_rss: int  # bytes
    vm_hwm: int  # bytes, the kernel's high-water mark of the process (its last reading)
    killed_over: int | None = None  # the RSS at which it was killed, if it was
    step_ends: list[float] = field(default_factory=list)  # seconds

    @property
    def step_seconds(self) -> list[float]:
        """Time between consecutive step ends, the first step (warm-up) left out."""
        return [b - a for a, b in zip(self.step_ends, self.step_ends[1:])]


def memory_of(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of a live process in bytes ((0, 0) once it is gone).

    VmHWM is read here, not taken from ``wait4``'s ``ru_maxrss``: that one also counts the
    parent's pages the child held between fork and exec (a Python parent's whole RSS).
    """
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def run_measured(cmd: Sequence[str], *, log: Path, env: dict[str, str] | None = None,
                 max_rss: int | None = None, cwd: Path = REPO) -> Measured:
    """Run ``cmd``, reading its memory every 0.25 s and killing it past ``max_rss`` bytes of RSS."""
    with open(log, "w") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    peak, high_water, killed = 0, 0, None
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        rss, hwm = memory_of(proc.pid)
        peak, high_water = max(peak, rss), max(high_water, hwm)
        if max_rss is not None and rss > max_rss and killed is None:
            killed = rss
            os.kill(proc.pid, signal.SIGKILL)
        time.sleep(POLL_S)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return Measured(proc.returncode, peak, high_water, killed)


def lmdistill_step_ends(run_dir: Path) -> list[float]:
    """``elapsed_s`` of every step logged in a run's ``metrics.jsonl`` (validation rows left out)."""
    ends = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "elapsed_s" in row and "loss" in row:
            ends.append(float(row["elapsed_s"]))
    return ends


# ---------------------------------------------------------------------------------------
# The TRL environment and the shared assets


def trl_python(venv: Path, trl_version: str) -> Path:
    """A Python with TRL ``trl_version`` and this project's torch and transformers (built once)."""
    import torch
    import transformers

    python = venv / "bin" / "python"
    wanted = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
              f"trl=={trl_version}"]
    marker = venv / "lmdistill-requirements.json"  # written last: the venv is complete
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == wanted:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    print(f"[peers] building {venv} with {' '.join(wanted)} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *wanted], check=True)
    marker.write_text(json.dumps(wanted))
    return python


def teacher_folder(shape: Shape, work: Path) -> Path:
    if shape.teacher == "random-gpt2":
        # The script's folder is on sys.path when it runs (``python benchmarks/peers.py``).
        from train_throughput import save_random_gpt2

        return save_random_gpt2(work / "gpt2-124m-random")
    from lmdistill.models.bundled import ensure_alias_cached

    return ensure_alias_cached(shape.teacher)


def student_folder(shape: Shape, teacher: Path, work: Path) -> Path:
    """The student both systems train, cut once by ``lmdistill init-student``."""
    out = work / f"student-{teacher.name}-{'-'.join(shape.cut).replace('-', '').replace(',', '_')}"
    if not (out / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "lmdistill", "init-student", "--teacher", str(teacher), *shape.cut,
                        "--out", str(out)], check=True, cwd=REPO, env=lmdistill_env())
    return out


def token_blocks(shape: Shape, teacher: Path, work: Path, source: str) -> Path:
    """``batch * steps`` random blocks of ``seq`` tokens from ``source``'s train split (seed 0)."""
    out = work / f"blocks-{teacher.name}-{shape.batch}x{shape.seq}x{shape.steps}.npy"
    if not out.is_file():
        from lmdistill.models.load import load_tokenizer
        from lmdistill.train.plan import prepare_sources

        tokens = prepare_sources(load_tokenizer(str(teacher)), [source], str(teacher)).tokens("train")
        starts = np.random.default_rng(0).integers(0, len(tokens) - shape.seq, size=shape.batch * shape.steps)
        np.save(out, np.stack([np.asarray(tokens[s:s + shape.seq], dtype=np.int64) for s in starts]))
    return out


def cache_text(work: Path, source: str) -> Path:
    """The first ``CACHE_CHARS`` characters of ``source``'s training documents, as a text source."""
    from lmdistill.data.sources import parse_source

    out = work / f"cache-text-{source.replace(':', '_')}-{CACHE_CHARS}.txt"
    if not out.is_file():
        text = "\n\n".join(parse_source(source).documents("train"))[:CACHE_CHARS]
        out.with_suffix(".partial").write_text(text)
        out.with_suffix(".partial").rename(out)
    return out


def teacher_cache(shape: Shape, teacher: Path, text: Path, work: Path) -> Path:
    """Stored targets of ``teacher`` on ``text`` for the shape's block (built once)."""
    out = work / f"cache-{teacher.name}-{text.stem}-{shape.seq}-k{CACHE_TOP_K}"
    if not any(out.glob("train.*.bin")):  # one part, renamed into place when complete
        subprocess.run([sys.executable, "-m", "lmdistill", "cache-teacher", "--teacher", str(teacher), "--data",
                        str(text), "--top-k", str(CACHE_TOP_K), "--temperatures", "2", "--block-size", str(shape.seq),
                        "--out", str(out)], check=True, cwd=REPO, env=lmdistill_env())
    return out


def lmdistill_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


# ---------------------------------------------------------------------------------------
# One measurement of each system


def measure_lmdistill(shape: Shape, teacher: Path, student: Path, args: argparse.Namespace,
                      run_dir: Path, cached: tuple[Path, Path] | None = None) -> Measured:
    """lmdistill with the live teacher, or, with ``cached`` ``(text, cache)``, reading stored targets."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    source = args.source if cached is None else cached[0]
    overrides = [f"model.teacher={teacher}", f"model.student={student}", f"data.sources=[{source}]", f"data.block_size={shape.seq}",
                 f"train.batch_size={shape.batch}", "train.grad_accum=1", f"train.max_steps={shape.steps}",
                 "train.max_minutes=null", "train.max_tokens=null", "train.eval_every=0", "train.checkpoint_every=0",
                 f"train.eval_tokens={shape.seq}", f"train.threads={args.threads}", "train.precision=fp32",
                 *args.set]
    if cached is not None:
        overrides += [f"model.teacher_cache={cached[1]}", "loss.cos=0"]
    cmd = [sys.executable, "-m", "lmdistill", "distill", "--config", shape.recipe, "--out", str(run_dir), *overrides]
    measured = run_measured(cmd, log=run_dir.with_suffix(".log"), env=lmdistill_env(), max_rss=args.max_rss)
    if measured.returncode == 0:
        measured.step_ends = lmdistill_step_ends(run_dir)
    return measured


def measure_trl(shape: Shape, teacher: Path, student: Path, blocks: Path, python: Path, args: argparse.Namespace,
                run_dir: Path) -> Measured:
    run_dir.mkdir(parents=True, exist_ok=True)
    times = run_dir / "times.json"
    cmd = [str(python), str(REPO / "benchmarks" / "peers_trl.py"), "--teacher", str(teacher), "--student",
           str(student), "--blocks", str(blocks), "--batch", str(shape.batch), "--steps", str(shape.steps),
           "--threads", str(args.threads), "--out", str(times)]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    measured = run_measured(cmd, log=run_dir.with_suffix(".log"), env=env, max_rss=args.max_rss)
    if measured.returncode == 0:
        measured.step_ends = json.loads(times.read_text())["step_end_s"]
    return measured


# ---------------------------------------------------------------------------------------
# Summary


def summarize(runs: list[dict[str, Any]], flops_per_token: dict[str, float], peak: float) -> list[dict[str, Any]]:
    """One row per (shape, system): median tokens/s over rounds, the largest peaks, ratios to TRL.
    ``flops_per_token`` is keyed ``"SHAPE"`` (the step with a teacher forward) and, for systems
    whose step differs, ``"SHAPE/SYSTEM"``."""
    rows = []
    for shape in dict.fromkeys(run["shape"] for run in runs):
        for system in dict.fromkeys(run["system"] for run in runs if run["shape"] == shape):
            mine = [run for run in runs if run["shape"] == shape and run["system"] == system]
            rates = [run["tokens_per_s"] for run in mine if run["tokens_per_s"]]
            rate = statistics.median(rates) if rates else None
            flops = flops_per_token.get(f"{shape}/{system}", flops_per_token[shape])
            achieved = rate * flops if rate else None
            rows.append({
                "shape": shape, "system": system, "rounds": len(mine), "tokens_per_s": rate,
                "tokens_per_s_each": rates, "achieved_flops_per_s": achieved,
                "limit_tokens_per_s": peak / flops,
                "fraction_of_limit": achieved / peak if achieved else None,
                "sampled_peak_rss": max(run["sampled_peak_rss"] for run in mine),
                "vm_hwm": max(run["vm_hwm"] for run in mine),
                "failed": [f"round {run['round']}: " + (f"killed at {run['killed_over'] / 2**30:.1f} GiB RSS"
                                                        if run["killed_over"] else f"exit {run['returncode']}")
                           for run in mine if run["returncode"] != 0],
            })
    for row in rows:
        trl = next((r for r in rows if r["shape"] == row["shape"] and r["system"] == "trl"), None)
        usable = trl is not None and trl["tokens_per_s"] and row["tokens_per_s"]
        row["speed_vs_trl"] = row["tokens_per_s"] / trl["tokens_per_s"] if usable else None
        row["rss_vs_trl"] = row["vm_hwm"] / trl["vm_hwm"] if trl is not None and not trl["failed"] else None
    return rows


def format_rows(rows: list[dict[str, Any]], peak: float) -> list[str]:
    gib = 2**30
    lines = [f"float32 matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s", "",
             "| shape | system | tokens/s | vs TRL | GFLOP/s | of the limit | peak RSS (VmHWM) | sampled | vs TRL |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        def num(value, fmt):
            return format(value, fmt) if value is not None else "-"
        rate = num(row["tokens_per_s"], ".1f") + (f" ({' / '.join(f'{r:.1f}' for r in row['tokens_per_s_each'])})"
                                                  if len(row["tokens_per_s_each"]) > 1 else "")
        note = f" ({'; '.join(row['failed'])})" if row["failed"] else ""
        lines.append(f"| {row['shape']} | {row['system']}{note} | {rate} | {num(row['speed_vs_trl'], '.2f')} | "
                     f"{num(row['achieved_flops_per_s'] and row['achieved_flops_per_s'] / 1e9, '.1f')} | "
                     f"{num(row['fraction_of_limit'], '.0%')} | {row['vm_hwm'] / gib:.2f} GiB | "
                     f"{row['sampled_peak_rss'] / gib:.2f} GiB | {num(row['rss_vs_trl'], '.2f')} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, among {', '.join(SHAPES)}")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, among {', '.join(SYSTEMS)}")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for both (default: all)")
    parser.add_argument("--source", default="corpus:moby_dick", help="training text (default: %(default)s)")
    parser.add_argument("--max-rss-gib", type=float, default=20.0,
                        help="kill a process whose RSS passes this, and report it (default: %(default)s)")
    parser.add_argument("--trl-version", default=TRL_VERSION, help="TRL from PyPI (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="an extra lmdistill override for every lmdistill run (repeatable)")
    parser.add_argument("--work", default=None, help="assets and runs (default: $LMDISTILL_CACHE/peers)")
    parser.add_argument("--out", default="peers.json", help="results (default: %(default)s)")
    args = parser.parse_args(argv)
    shapes = [SHAPES[name] for name in args.shapes.split(",") if name]
    systems = [name for name in args.systems.split(",") if name]
    if set(systems) - set(SYSTEMS) or args.rounds < 1:
        parser.error(f"--systems among {', '.join(SYSTEMS)} and --rounds >= 1")
    args.max_rss = int(args.max_rss_gib * 2**30)

    import torch
    from transformers import AutoConfig

    from lmdistill.measure.flops import matmul_peak, step_flops
    from lmdistill.models.cache import cache_dir

    work = Path(args.work) if args.work else cache_dir() / "peers"
    work.mkdir(parents=True, exist_ok=True)
    python = trl_python(cache_dir() / "peers-venv", args.trl_version) if "trl" in systems else None
    assets, flops_per_token, caches = {}, {}, {}
    for shape in shapes:
        teacher = teacher_folder(shape, work)
        student = student_folder(shape, teacher, work)
        teacher_config, student_config = AutoConfig.from_pretrained(teacher), AutoConfig.from_pretrained(student)
        tokens = shape.batch * shape.seq
        flops_per_token[shape.name] = step_flops(teacher_config, student_config, shape.seq, tokens)["per_token"]
        assets[shape.name] = (teacher, student, token_blocks(shape, teacher, work, args.source))
        if "lmdistill-cache" in systems:
            text = cache_text(work, args.source)
            caches[shape.name] = (text, teacher_cache(shape, teacher, text, work))
            flops_per_token[f"{shape.name}/lmdistill-cache"] = step_flops(None, student_config, shape.seq,
                                                                          tokens)["per_token"]

    torch.set_num_threads(args.threads)
    peaks = [matmul_peak(torch.device("cpu"), torch.float32, 2048)["flops_per_s"]]
    runs = []
    for round_ in range(1, args.rounds + 1):
        for shape in shapes:
            teacher, student, blocks = assets[shape.name]
            for system in systems:
                run_dir = work / "runs" / f"{shape.name}-{system}-{round_}"
                print(f"[peers] round {round_}: {shape.name} {system} ...", flush=True)
                if system == "lmdistill":
                    measured = measure_lmdistill(shape, teacher, student, args, run_dir)
                elif system == "lmdistill-cache":
                    measured = measure_lmdistill(shape, teacher, student, args, run_dir, caches[shape.name])
                else:
                    measured = measure_trl(shape, teacher, student, blocks, python, args, run_dir)
                seconds = measured.step_seconds
                rate = shape.batch * shape.seq / statistics.median(seconds) if seconds else None
                runs.append({"shape": shape.name, "system": system, "round": round_, "tokens_per_s": rate,
                             "step_s": seconds, **asdict(measured)})
                print(f"[peers]   {f'{rate:.1f} tokens/s' if rate else f'failed (see {run_dir}.log)'}, "
                      f"VmHWM {measured.vm_hwm / 2**30:.2f} GiB", flush=True)
    peaks.append(matmul_peak(torch.device("cpu"), torch.float32, 2048)["flops_per_s"])
    peak = max(peaks)
    rows = summarize(runs, flops_per_token, peak)
    lines = format_rows(rows, peak)
    print("\n" + "\n".join(lines))
    Path(args.out).write_text(json.dumps({
        "threads": args.threads, "torch": torch.__version__, "trl": args.trl_version, "peaks_flops_per_s": peaks,
        "flops_per_token": flops_per_token, "rows": rows, "runs": runs,
        "load_average": os.getloadavg(),
    }, indent=2) + "\n")
    print(f"\n[peers] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

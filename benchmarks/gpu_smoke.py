"""Steps of benchmarks/gpu_smoke.sh: a short bf16 distillation on one GPU, checked.

    python benchmarks/gpu_smoke.py prepare  WORK          environment checks, teacher, tokens
    python benchmarks/gpu_smoke.py train    WORK NAME [override ...]   one in-process run
    python benchmarks/gpu_smoke.py overrides WORK         the recipe's overrides, one a line
    python benchmarks/gpu_smoke.py report   WORK OUT.json   tokens/s, MFU, memory; checks

The recipe: a GPT-2-124M-shaped teacher (GPT2Config defaults, dropout off, random weights,
the GPT-2 tokenizer from device_assets/) distilled into DistilGPT2's 6 layers (the
``distilgpt2`` recipe's loss and optimiser) at sequence 1024, batch 8, in bf16 autocast, on
the bundled Moby-Dick tokens, for ``STEPS`` steps. ``report`` takes tokens/s as the median of
the steady steps (the first ones hold CUDA start-up and, compiled, the compile time), MFU as
the analytic matmul FLOPs of a step (:mod:`lmdistill.measure.flops`: teacher forward + 3x student
forward) per second over the GPU's bf16 dense peak (989.4 TFLOP/s for H100 SXM and H200,
756.5 for H100 PCIe; also against a measured 8192^3 bf16 matmul), and checks that every
run finished with finite, decreasing losses and that the compiled and the torchrun (1-GPU
DDP) runs match the eager one. Exit status 1 when a check fails.

``SMOKE_DRY_RUN=1`` runs the same steps on the CPU at toy size (float32, a width-64 teacher,
sequence 64, 12 steps, no compiled run), to check the script itself where there is no GPU.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRY = os.environ.get("SMOKE_DRY_RUN") == "1"
STEPS = 12 if DRY else 40
SEQ, BATCH = (64, 2) if DRY else (1024, 8)
SPEC_PEAKS = {"H200": 989.4e12, "H100 PCIe": 756.5e12, "H100": 989.4e12}  # bf16 dense, from NVIDIA's data sheets


def overrides(work: Path) -> list[str]:
    return [
        f"model.teacher={work / 'teacher'}", "data.sources=[corpus:moby_dick]", f"data.prepared_dir={work / 'data'}",
        f"data.block_size={SEQ}", f"train.batch_size={BATCH}", "train.grad_accum=1", f"train.max_steps={STEPS}",
        "train.max_tokens=null", "train.max_minutes=null", "train.eval_every=0", "train.checkpoint_every=0",
        "train.eval_tokens=8192", f"train.device={'cpu' if DRY else 'cuda'}",
        f"train.precision={'fp32' if DRY else 'bf16'}", "train.tf32=true", *(["train.threads=2"] if DRY else []),
    ]


def prepare(work: Path) -> None:
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmdistill.data.prepare import prepare as prepare_data
    from lmdistill.models.load import load_tokenizer

    print(f"[smoke] torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    if DRY:
        print("[smoke] dry run on the CPU (SMOKE_DRY_RUN=1)")
    elif not torch.cuda.is_available():
        raise SystemExit("[smoke] FAIL: no CUDA device visible")
    else:
        print(f"[smoke] device {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} "
              f"GiB), bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}, {torch.cuda.device_count()} GPU(s)")
    try:
        import triton

        print(f"[smoke] triton {triton.__version__}")
    except ImportError:
        print("[smoke] triton missing: train.compile cannot run")
    tokenizer = load_tokenizer(str(ROOT / "device_assets" / "gpt2-tokenizer"))
    teacher = work / "teacher"
    if not (teacher / "config.json").is_file():
        torch.manual_seed(0)
        # 124M shape; dropout off so that the runs can be compared
        size = {"n_embd": 64, "n_head": 4, "n_positions": 256} if DRY else {}
        config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **size)
        GPT2LMHeadModel(config).save_pretrained(teacher)
        tokenizer.save_pretrained(teacher)
    started = time.perf_counter()
    data = prepare_data(tokenizer, ["corpus:moby_dick"], work / "data", tokenizer_name=str(teacher))
    print(f"[smoke] teacher {teacher}; tokens {data.splits} ({time.perf_counter() - started:.1f} s)")


def train(work: Path, name: str, extra: list[str]) -> None:
    import torch

    from lmdistill.recipe import load_config
    from lmdistill.train.run import run_training

    config = load_config("distilgpt2", overrides(work) + extra)
    started = time.perf_counter()
    run_training(config, work / name, progress=False)
    info = {"wall_s": round(time.perf_counter() - started, 1), "overrides": extra}
    if not DRY:
        info.update(peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    total_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2),
                    device=torch.cuda.get_device_name())
    (work / f"{name}.json").write_text(json.dumps(info, indent=2))
    print(f"[smoke] {name}: done in {info['wall_s']} s, peak memory {info.get('peak_memory_gib')} GiB")


def measured_peak() -> float:
    """Best FLOP/s of a square bf16 matmul (8192; float32 1024 in a dry run)."""
    import torch

    n, device, dtype = (1024, "cpu", torch.float32) if DRY else (8192, "cuda", torch.bfloat16)
    sync = (lambda: None) if DRY else torch.cuda.synchronize
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    best = math.inf
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def report(work: Path, out: Path) -> int:
    import torch
    from transformers import AutoConfig

    from lmdistill.train.rundir import read_metrics
    from lmdistill.measure.flops import step_flops

    name = "cpu (dry run)" if DRY else torch.cuda.get_device_name()
    spec = None if DRY else next((peak for key, peak in SPEC_PEAKS.items() if all(part in name for part in key.split())), None)
    measured = measured_peak()
    failures: list[str] = []
    results: dict = {"device": name, "torch": torch.__version__, "seq": SEQ, "batch": BATCH, "steps": STEPS,
                     "spec_peak_bf16_flops": spec, "measured_peak_bf16_flops": measured, "runs": {}}

    def check(ok: bool, what: str) -> None:
        print(f"[smoke] {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    losses = {}
    for run, skip in (("eager", 5), ("ddp", 5)) if DRY else (("eager", 5), ("compiled", 10), ("ddp", 5)):
        folder = work / run
        summary = folder / "summary.json"
        check(summary.is_file(), f"{run}: run finished")
        if not summary.is_file():
            continue
        rows = [r for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]
        losses[run] = [r["loss"] for r in rows]
        steady = [r["tokens_per_s"] for r in rows[skip:]]
        tokens_per_s = statistics.median(steady)
        flops = step_flops(AutoConfig.from_pretrained(work / "teacher"), AutoConfig.from_pretrained(folder / "student"),
                           SEQ, SEQ * BATCH)
        achieved = flops["per_token"] * tokens_per_s
        extra = json.loads((work / f"{run}.json").read_text()) if (work / f"{run}.json").is_file() else {}
        entry = {"tokens_per_s": round(tokens_per_s, 1), "achieved_tflops": round(achieved / 1e12, 1),
                 "mfu_spec": achieved / spec if spec else None, "mfu_measured": achieved / measured,
                 "first_step_s": rows[0]["elapsed_s"], "losses": losses[run], **extra,
                 "summary": json.loads(summary.read_text())}
        results["runs"][run] = entry
        mfu = f"MFU {entry['mfu_spec']:.1%} of {spec / 1e12:.1f} TFLOP/s" if spec else "MFU vs spec peak: unknown GPU"
        memory = (f", peak memory {extra['peak_memory_gib']} GiB of {extra['total_memory_gib']}"
                  if "peak_memory_gib" in extra else "")
        print(f"[smoke] {run:>8}: {tokens_per_s:,.0f} tokens/s (median of steps {skip + 1}-{STEPS}), "
              f"{achieved / 1e12:.1f} TFLOP/s, {mfu}, {entry['mfu_measured']:.1%} of the measured "
              f"{measured / 1e12:.1f}{memory}; first step {rows[0]['elapsed_s']:.1f} s")
        check(len(rows) == STEPS and all(math.isfinite(v) for v in losses[run]), f"{run}: {STEPS} steps, finite losses")
        check(statistics.mean(losses[run][-5:]) < statistics.mean(losses[run][:5]), f"{run}: loss decreases")
        check((0.0 if DRY else 0.01) < achieved / measured < 1.0, f"{run}: MFU against the measured peak in (1%, 100%)")
        if "peak_memory_gib" in extra:
            check(extra["peak_memory_gib"] < extra["total_memory_gib"], f"{run}: peak memory below the device's")
    if "ddp" in results["runs"]:
        check(results["runs"]["ddp"]["summary"].get("world_size") == 1, "ddp: ran as a 1-process torchrun job")
    for run in ("compiled", "ddp"):
        if run in losses and "eager" in losses:
            worst = max(abs(a - b) / abs(a) for a, b in zip(losses["eager"][:10], losses[run][:10]))
            results["runs"][run]["worst_relative_loss_difference_first_10"] = worst
            check(worst < 3e-2, f"{run}: first 10 losses within 3% of eager bf16 (worst {worst:.2e})")
    results["failures"] = failures
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[smoke] {'all checks passed' if not failures else f'{len(failures)} check(s) FAILED'}; results in {out}")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    step, work = argv[0], Path(argv[1])
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    if step == "prepare":
        prepare(work)
    elif step == "train":
        train(work, argv[2], argv[3:])
    elif step == "overrides":
        print("\n".join(overrides(work)))
    elif step == "report":
        return report(work, Path(argv[2]))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

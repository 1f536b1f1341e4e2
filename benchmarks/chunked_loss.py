"""Peak memory and time of the KL + CE logit losses: unchunked vs lmdistill.loss.fused.

Run from the repository root:

    PYTHONPATH=. python benchmarks/chunked_loss.py                      # GPT-2 shape, CPU
    PYTHONPATH=. python benchmarks/chunked_loss.py --batch 8 --seq 1024 --vocab 50257 \\
        --hidden 768 --chunk-tokens 512 1024 --repeats 3 --json out.json

What one "step" is. The part of a distillation step that differs between the two paths:
the student's lm_head and loss, forward and backward, plus the teacher's lm_head. The
transformer bodies are identical in both paths and left out. Inputs, created before
measuring: last hidden states of student and teacher (random ``batch x seq x hidden``; the
student's requires grad), lm_head weights (random ``vocab x hidden``; the student's requires
grad), labels (random ids). Losses use the DistilGPT2 recipe's weights (KL 5, CE 2, T = 2),
``reduction="sum"`` and ``(total / tokens).backward()``, as ``lmdistill.train.step.train_step``.

- ``unchunked``: ``F.linear`` gives the full student logits (with grad) and, under
  ``no_grad``, the full teacher logits; ``lmdistill.loss.terms.kl_divergence`` and
  ``causal_lm_loss`` on them; backward.
- ``chunked-N``: ``lmdistill.loss.fused.chunked_logit_losses`` with ``chunk_tokens=N``;
  backward.

Both leave the gradients of the student's hidden states and head weight allocated at the end,
as a real step does.

How memory is measured. Each (variant, repeat) runs in its own fresh Python process (this
script re-invoked with ``--variant``), so no variant inherits another's allocator state or
high-water mark. On CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated bytes
after the inputs exist (stats reset there). On CPU: the process's peak resident set size
minus its resident set size once the inputs exist. The peak is the kernel's high-water mark:
``VmHWM`` in ``/proc/self/status`` after resetting it with ``/proc/self/clear_refs`` (``5``)
once the inputs exist, so the measure covers only the step; where that reset is not allowed,
``ru_maxrss`` of ``getrusage`` (then the input creation's own transient peak could hide a
smaller step peak; the script says which method it used). Large tensors are mmap'd by the
allocator and returned to the OS when freed, so RSS tracks live tensors closely.

How time is measured. Each process runs ``--steps`` steps (default 2): the first is a warm-up
reported apart, the rest are timed with ``perf_counter`` (synchronising CUDA). Variants are
alternated (unchunked, chunked..., then the reverse order, ...) over ``--repeats`` rounds and
the table shows medians over repeats, so slow phases of a noisy shared machine hit both.

Each process also reports its loss values and gradient norms; the table checks that the
variants agree. Output: a table on stdout and (``--json``) every raw measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

KL_WEIGHT, CE_WEIGHT, TEMPERATURE = 5.0, 2.0, 2.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- child process


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_inputs(args, device: torch.device):
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return {
        # Student and teacher last hidden states (after the final norm: unit scale).
        "hs": rnd(args.batch, args.seq, args.hidden, scale=1.0).requires_grad_(),
        "ht": rnd(args.batch, args.seq, args.teacher_hidden, scale=1.0),
        # GPT-2-like head weights (std 0.02 embedding; logits of order 1).
        "w": rnd(args.vocab, args.hidden, scale=0.02 * 3).requires_grad_(),
        "wt": rnd(args.vocab, args.teacher_hidden, scale=0.02 * 3),
        "labels": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device),
    }


def step(variant: str, x: dict, tokens: int) -> dict:
    from lmdistill.loss.fused import chunked_logit_losses
    from lmdistill.loss.terms import causal_lm_loss, kl_divergence

    x["hs"].grad = x["w"].grad = None
    if variant == "unchunked":
        logits = F.linear(x["hs"], x["w"])
        with torch.no_grad():
            teacher_logits = F.linear(x["ht"], x["wt"])
        kl = kl_divergence(logits, teacher_logits, None, TEMPERATURE, "sum")
        ce = causal_lm_loss(logits, x["labels"], None, "sum")
        total = KL_WEIGHT * kl + CE_WEIGHT * ce
        del logits, teacher_logits
    else:
        chunk = int(variant.split("-", 1)[1])
        out = chunked_logit_losses(
            x["hs"], x["w"], x["ht"], x["wt"], x["labels"], kl_weight=KL_WEIGHT, ce_weight=CE_WEIGHT,
            temperature=TEMPERATURE, reduction="sum", chunk_tokens=chunk,
        )
        total, kl, ce = out.total, out.terms["kl"], out.terms["ce"]
    (total / tokens).backward()
    return {"kl": kl.item(), "ce": ce.item(), "total": total.item()}


def run_child(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = make_inputs(args, device)
    tokens = args.batch * args.seq
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        method = "torch.cuda.max_memory_allocated - memory_allocated after inputs"
    else:
        base = _rss_bytes()
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if _reset_hwm():
            method = "VmHWM (reset via /proc/self/clear_refs after inputs) - RSS after inputs"
        else:
            method = "ru_maxrss - RSS after inputs (high-water mark not resettable)"
    times, values = [], None
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        values = step(args.variant, x, tokens)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    elif method.startswith("VmHWM"):
        peak = _hwm_bytes() - base
    else:
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, maxrss_before) - base
    grad_norms = {k: x[k].grad.float().norm().item() for k in ("hs", "w")}
    return {
        "variant": args.variant, "peak_bytes": peak, "baseline_bytes": base, "memory_method": method,
        "warmup_s": times[0], "step_s": times[1:] or times, "values": values, "grad_norms": grad_norms,
    }


# --------------------------------------------------------------------------- parent


def spawn(args, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--device", args.device,
           "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden),
           "--dtype", args.dtype, "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--teacher-hidden", type=int, default=None, help="default: --hidden")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of hidden states and head weights")
    p.add_argument("--chunk-tokens", type=int, nargs="+", default=None,
                   help="chunk sizes to compare (default: lmdistill.loss.fused.DEFAULT_CHUNK_TOKENS)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="steps per process; the first is a warm-up")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", default=None, help="write all measurements here")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    if args.teacher_hidden is None:
        args.teacher_hidden = args.hidden
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.variant is not None:
        print(json.dumps(run_child(args)))
        return 0

    from lmdistill.loss.fused import DEFAULT_CHUNK_TOKENS

    chunks = args.chunk_tokens or [DEFAULT_CHUNK_TOKENS]
    variants = ["unchunked"] + [f"chunked-{c}" for c in chunks]
    gb = lambda n: n / 1e9  # noqa: E731
    logits_gb = gb(args.batch * args.seq * args.vocab * 4)
    print(f"step = lm_head + KL/CE loss + backward only (transformer bodies are identical in both paths "
          f"and left out); batch {args.batch} x seq {args.seq}, vocab {args.vocab}, hidden "
          f"{args.hidden}/{args.teacher_hidden} (student/teacher), {args.dtype}, device {args.device}, "
          f"{torch.get_num_threads()} threads; one fp32 batch x seq x vocab tensor = {logits_gb:.2f} GB")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            res = spawn(args, v)
            runs[v].append(res)
            print(f"  repeat {r + 1}/{args.repeats} {v:>14}: peak {gb(res['peak_bytes']):6.2f} GB, "
                  f"step {statistics.median(res['step_s']):7.2f} s (warm-up {res['warmup_s']:.2f} s)",
                  flush=True)

    summary = {}
    for v in variants:
        peaks = [res["peak_bytes"] for res in runs[v]]
        steps = [statistics.median(res["step_s"]) for res in runs[v]]
        summary[v] = {"peak_bytes": statistics.median(peaks), "step_s": statistics.median(steps),
                      "values": runs[v][0]["values"], "grad_norms": runs[v][0]["grad_norms"]}
    base = summary["unchunked"]
    print(f"\nmemory: {runs['unchunked'][0]['memory_method']}; medians of {args.repeats} processes each")
    print(f"{'variant':>16} {'peak GB':>8} {'step s':>8} {'peak/unch':>10} {'time/unch':>10} "
          f"{'rel.diff loss':>14} {'rel.diff |grad W|':>18}")
    for v in variants:
        s = summary[v]
        s["peak_ratio"] = s["peak_bytes"] / base["peak_bytes"]
        s["time_ratio"] = s["step_s"] / base["step_s"]
        s["loss_rel_diff"] = abs(s["values"]["total"] - base["values"]["total"]) / abs(base["values"]["total"])
        s["grad_w_rel_diff"] = abs(s["grad_norms"]["w"] - base["grad_norms"]["w"]) / base["grad_norms"]["w"]
        print(f"{v:>16} {gb(s['peak_bytes']):8.2f} {s['step_s']:8.2f} {s['peak_ratio']:10.3f} "
              f"{s['time_ratio']:10.3f} {s['loss_rel_diff']:14.2e} {s['grad_w_rel_diff']:18.2e}")

    if args.json:
        meta = {"batch": args.batch, "seq": args.seq, "vocab": args.vocab, "hidden": args.hidden,
                "teacher_hidden": args.teacher_hidden, "dtype": args.dtype, "device": args.device,
                "threads": torch.get_num_threads(), "repeats": args.repeats, "steps": args.steps,
                "torch": torch.__version__, "python": platform.python_version(),
                "machine": platform.machine(), "processor": platform.processor(),
                "step": "lm_head + KL/CE + backward only; transformer bodies excluded",
                "loss": {"kl": KL_WEIGHT, "ce": CE_WEIGHT, "temperature": TEMPERATURE, "reduction": "sum"}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

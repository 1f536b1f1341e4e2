"""Training steps with glibc's default allocator thresholds against lmdistill's (freed blocks
kept for reuse, ``lmdistill.models.malloc``), side by side on the same machine.

    PYTHONPATH=. python benchmarks/cpu_malloc.py [--rounds 2] [--steps 6] [--recipe smollm2-demo]

The setting is process-wide and cannot be undone, so each measurement is a separate
``benchmarks/train_throughput.py`` process (one recipe, blocks of 256, batch 4: the demo's
step) with ``LMDISTILL_CPU_MALLOC=system`` or ``reuse``; the two alternate within each round
(the order flips every round) so drift in the machine's speed falls on both. Prints each
process's median step time, tokens/s and peak resident memory (the child's ``ru_maxrss``),
and the ratio of the two settings' tokens/s and peak memory over all rounds. Run it with
nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lmdistill.models.device import cpu_computes_bf16
from lmdistill.models.malloc import ENV

THROUGHPUT = Path(__file__).with_name("train_throughput.py")
SETTINGS = ("system", "reuse")


def measure(setting: str, args: argparse.Namespace, out: Path) -> dict:
    """One train_throughput process under ``setting``: its case and its peak RSS in bytes."""
    command = [sys.executable, str(THROUGHPUT), "--recipe", args.recipe, "--seq", "256", "--batch", "4",
               "--steps", str(args.steps), "--warmup", "2", "--device", "cpu", "--out", str(out),
               "--set", f"train.precision={args.precision}"]
    env = {**os.environ, ENV: setting}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{setting}: train_throughput failed:\n{stderr[-2000:]}")
    case = json.loads(out.read_text())["cases"][0]
    return {"setting": setting, "median_step_s": case["median_step_s"], "tokens_per_s": case["tokens_per_s"],
            "peak_rss_bytes": usage.ru_maxrss * 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each one process per setting (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process (default: %(default)s)")
    parser.add_argument("--recipe", default="smollm2-demo", help="recipe to time (default: %(default)s)")
    parser.add_argument("--precision", default="bf16" if cpu_computes_bf16() else "fp32",
                        help="train.precision (default: bf16 where this CPU computes it natively, else fp32)")
    parser.add_argument("--out", default=None, help="also write the rows and ratios as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmdistill-malloc-") as work:
        for r in range(args.rounds):
            order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
            for setting in order:
                row = measure(setting, args, Path(work) / f"{setting}-{r}.json") | {"round": r + 1}
                print(f"[malloc] round {r + 1} {setting:6s}: median step {row['median_step_s']:.3f} s, "
                      f"{row['tokens_per_s']:.1f} tokens/s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
                rows.append(row)
    by = {s: [row for row in rows if row["setting"] == s] for s in SETTINGS}
    tps = {s: statistics.median(row["tokens_per_s"] for row in by[s]) for s in SETTINGS}
    rss = {s: max(row["peak_rss_bytes"] for row in by[s]) for s in SETTINGS}
    ratios = {"tokens_per_s": tps["reuse"] / tps["system"], "peak_rss": rss["reuse"] / rss["system"]}
    print(f"\n| setting ({args.recipe}, {args.precision}, 4 x 256) | tokens/s (median of rounds) | peak RSS |\n|---|---:|---:|")
    for s in SETTINGS:
        print(f"| {ENV}={s} | {tps[s]:.1f} | {rss[s] / 2**30:.2f} GiB |")
    print(f"\nreuse / system: {ratios['tokens_per_s']:.3f}x tokens/s, {ratios['peak_rss']:.3f}x peak RSS")
    if args.out:
        Path(args.out).write_text(json.dumps({"recipe": args.recipe, "precision": args.precision, "rows": rows,
                                              "ratios": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

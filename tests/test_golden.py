"""Golden losses: the demo recipe's logged values must not change unless a change means them to.

tests/golden/losses.json holds, for a tiny Llama-shaped and a tiny GPT-2-shaped teacher and each
loss path (fused logits in one chunk and in three, full logits, a teacher cache, an alignment
term, JSD and reverse KL), every value metrics.jsonl logs over 5 steps of the ``smollm2-demo``
recipe (loss, each term, grad_norm, lr; validation at steps 0 and 5), the student's layer map
and a SHA-256 of its final weights, with the commit they were recorded from. This module reruns
those runs (scripts/record_golden.py does the work) and compares:

- On the machine type they were recorded on (same torch, transformers, CPU capability, CPU
  model and train.threads, the file's ``environment``), the float32 operations are the same
  ones in the same order, so every value must be bit-identical, and the weights too.
- Elsewhere the kernels legitimately round differently; then each float must agree within
  REL_BOUND (measured and justified below), the cache path within CACHE_BOUND.

What "bit-identical" covers: metrics.jsonl logs each training value with 7 significant digits,
about float32's own precision (24 bits, ~7.2 digits), so equal logged values mean equal up to
a rounding of 5e-8 to 5e-7 relative. The validation loss and perplexity are logged in full
(float64 repr), and the weight digest is exact, so a change of even one bit in any weight
after 5 steps fails here.

Re-recording: only when a change is MEANT to change these numbers (a new loss default, a fixed
bug), never to make this test pass after a refactor. Commit the code change first (the script
refuses a tree whose lmdistill/ has uncommitted changes), then

    PYTHONPATH=$PWD .venv/bin/python scripts/record_golden.py

and commit tests/golden/losses.json on its own, saying in the message which numbers change and
why; the file records the commit it was measured from. ``scripts/record_golden.py --compare``
prints how far the current code is from the file, run by run, without writing anything.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script() -> ModuleType:
    """scripts/record_golden.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("record_golden", ROOT / "scripts" / "record_golden.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


golden_script = _load_script()
GOLDEN = json.loads(golden_script.GOLDEN.read_text())

# Off the recording machine type. Measured on the recording machine (AMD EPYC, AVX512, torch
# 2.13) by rerunning every run with `scripts/record_golden.py --compare` (it uses the same
# relative_difference), largest relative difference over all logged values of the 12 runs with
# a live teacher:
#   ATEN_CPU_CAPABILITY=avx2 (other ATen kernels)            8.6e-6  (llama val_ppl, step 0)
#   ATEN_CPU_CAPABILITY=default                              8.5e-6
#   MKL_CBWR=COMPATIBLE (other MKL matmul kernels)           1.6e-6  (gpt2 align_cos, step 1)
#   MKL_CBWR=COMPATIBLE and ATEN_CPU_CAPABILITY=default      9.1e-6
#   train.threads=2 instead of 1                             1.4e-6  (llama: bit-identical)
# val_ppl = exp(val_loss), so its relative difference is val_loss's absolute one; without it
# the largest under avx2 is 3.5e-6 (grad_norm, step 1). 1e-4 is 11x the largest of these, yet below what small real changes
# give: loss.kl 5 -> 5.001 (0.02%) 1.4e-4, loss.temperature 2 -> 2.001 2.3e-4, loss.ce 2 -> 2.001
# 4.5e-4 (checked below), train.lr +0.1% 1.0e-3, the labels shifted by one token 0.13-0.33; a
# dropped or new term is a missing or new field. Below it stay the differences between
# mathematically equal paths (fused vs full logits, one chunk vs three: ~1e-7), which only the
# bit-identical comparison tells apart.
REL_BOUND = 1e-4
# The cache path draws its tail samples from float32 probabilities: on other kernels some
# blocks draw other ids (under avx2, 26 of the 85 blocks), which moved kl by up to 3.2% (2.5-3.2%
# under the ATen settings, 0.4-3.1% under MKL_CBWR; threads=2: 4e-7). 0.1 still fails the loss
# of the tail (tail samples 0 instead of 4: kl off by 94-97%) or a wrong T^2 factor (4x).
CACHE_BOUND = 0.1

SAME_MACHINE = golden_script.environment(GOLDEN["environment"]["threads"]) == GOLDEN["environment"]


def bound(key: str) -> float:
    """The allowed relative difference for run ``key`` here: 0 (bit-identical) on the recording machine type."""
    if SAME_MACHINE:
        return 0.0
    return CACHE_BOUND if key.endswith("/teacher_cache") else REL_BOUND


@pytest.fixture(scope="module")
def workspace():
    with golden_script.workspace(golden_script.Setup(**GOLDEN["setup"])) as ws:
        yield ws


@pytest.fixture(scope="module")
def measured(workspace) -> dict[str, dict]:
    """Every run of the golden file, rerun here with its recorded overrides."""
    threads = GOLDEN["environment"]["threads"]
    return {key: golden_script.run(workspace, key.split("/")[0], recorded["overrides"], threads)
            for key, recorded in GOLDEN["runs"].items()}


def test_golden_file_covers_every_path_of_the_script():
    """The file holds each (teacher, path) of the script with the script's overrides and setup:
    else a path was added or changed without re-recording."""
    expected = {f"{t}/{p}": golden_script.overrides(p) for t in golden_script.TEACHERS for p in golden_script.PATHS}
    assert {key: run["overrides"] for key, run in GOLDEN["runs"].items()} == expected
    assert GOLDEN["setup"] == dataclasses.asdict(golden_script.Setup())
    assert GOLDEN["recipe"] == golden_script.RECIPE
    assert len(GOLDEN["recorded_from"]["commit"]) == 40


@pytest.mark.parametrize("key", list(GOLDEN["runs"]))
def test_losses_match_golden(measured, key):
    found = golden_script.differences(GOLDEN["runs"][key], measured[key], bound(key))
    how = ("bit-identical (same machine type as the recording)" if SAME_MACHINE
           else f"within a relative {bound(key):g} (recorded on {GOLDEN['environment']}, "
                f"now {golden_script.environment(GOLDEN['environment']['threads'])})")
    assert not found, (f"{key} differs from tests/golden/losses.json (recorded from "
                       f"{GOLDEN['recorded_from']['commit'][:12]}), compared {how}:\n  " + "\n  ".join(found))


def test_a_small_weight_change_fails_the_comparison(workspace):
    """loss.ce 2 -> 2.001 (0.05%) must be caught by the cross-machine bound too, not only by the
    bit-identical comparison: the bound is not so loose that it lets real changes through."""
    key = "gpt2/fused"
    recorded = GOLDEN["runs"][key]
    changed = golden_script.run(workspace, "gpt2", recorded["overrides"], GOLDEN["environment"]["threads"],
                                extra=["loss.ce=2.001"])
    rel, where = golden_script.largest_difference(recorded, changed)
    assert golden_script.differences(recorded, changed, REL_BOUND), f"largest difference {rel:.2e} at {where}"
    assert rel > 3 * REL_BOUND, f"the change is caught with too little margin: {rel:.2e} at {where}"

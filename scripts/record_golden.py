"""Record the golden loss values of the demo recipe on tiny teachers (tests/golden/losses.json).

The safety net of a behaviour-preserving refactor (issue 13): the bundled ``smollm2-demo``
recipe, pointed at a tiny Llama-shaped and a tiny GPT-2-shaped teacher, trains 5 steps on
each loss path (fused chunked logits in one chunk and in several, full logits, a teacher
cache, an alignment term, two non-KL divergences), and every value its ``metrics.jsonl`` logs
is stored with the commit it came from; ``tests/test_golden.py`` reruns the same runs and
compares (see its docstring for when and how to re-record).

Runs go through the public entry points only: :func:`lmdistill.recipe.load_config` (the recipe
plus ``section.field=value`` overrides), :func:`lmdistill.train.run.run_training`, and the
``lmdistill cache-teacher`` command. Everything is written under a temporary folder (the
``$LMDISTILL_CACHE`` too) that is removed afterwards.

    PYTHONPATH=$PWD .venv/bin/python scripts/record_golden.py            # (re-)record the golden file
    PYTHONPATH=$PWD .venv/bin/python scripts/record_golden.py --compare  # rerun it, print each run's largest difference

``--compare`` takes ``--threads N`` and ``--set OVERRIDE...`` and honours ``ATEN_CPU_CAPABILITY``
and ``MKL_CBWR`` in the environment: that is how the cross-machine bound of the test was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "losses.json"

RECIPE = "smollm2-demo"
THREADS = 1
TEACHERS = ("llama", "gpt2")

# What every run changes in the recipe: the tiny teacher (2 of its 4 layers kept, chosen by the
# recipe's strategy, on 256 calibration tokens to keep the run short) and text, a small batch,
# a budget of 5 steps only (with the recipe's max_minutes the schedule could follow the clock),
# validation at steps 0 and 5 only, one thread. The loss weights stay the recipe's.
COMMON_OVERRIDES = [
    "model.teacher={teacher}", "model.num_layers=2", "model.calibration_tokens=256", "data.sources={text}",
    "data.block_size=32", "train.batch_size=2", "train.max_steps=5", "train.max_minutes=null", "train.eval_every=0",
    "train.eval_tokens=512", "train.device=cpu", "train.threads={threads}",
]
# Per loss path, on top of COMMON_OVERRIDES. A step has 2 x 32 = 64 positions, so the default
# loss.chunk_tokens (256) is one chunk; 24 makes three, the last one short.
PATHS: dict[str, list[str]] = {
    "fused": [],
    "fused_chunks": ["loss.chunk_tokens=24"],
    "full_logits": ["loss.chunk_tokens=0"],
    "teacher_cache": ["model.teacher_cache={cache}", "loss.cos=0"],  # a cache holds no hidden states
    "align_cos": ["loss.align_cos=1"],
    "jsd": ["loss.divergence=jsd"],
    "reverse_kl": ["loss.divergence=reverse_kl"],
}
# metrics.jsonl fields that measure time, not the computation.
TIMINGS = ("tokens_per_s", "elapsed_s")


@dataclass(frozen=True)
class Setup:
    """The inputs besides the overrides; stored in the golden file, so a rerun rebuilds them exactly."""

    logit_scale: float = 30.0
    """Gain of the teachers' final norm (see :func:`sharpen`)."""
    text_characters: int = 30_000
    """Of Moby-Dick (tests.helpers.small_text_file): three ~10,000-character documents, one per split."""
    cache_top_k: int = 8
    """cache-teacher --top-k (few: the path is under test, not its accuracy)."""
    cache_tail_samples: int = 4
    """cache-teacher --tail-samples."""


@dataclass(frozen=True)
class Workspace:
    """The tiny teachers, the text and the cache folders of one set of runs, in a temporary folder."""

    root: Path
    setup: Setup
    teachers: dict[str, Path]
    text: Path

    def cache(self, teacher: str) -> Path:
        return self.root / f"cache-{teacher}"


def sharpen(model: torch.nn.Module, scale: float) -> None:
    """Multiply the final norm's gain by ``scale``: the random teacher then predicts a peaked
    distribution (logits of standard deviation ~3, as trained LMs have) instead of a near-uniform
    one (~0.1), whose KL to any student is so small (~1e-4 of the loss) that the loss paths would
    hardly differ. The student is cut from the teacher and keeps the same final norm."""
    norm = model.get_submodule("model.norm" if model.config.model_type == "llama" else "transformer.ln_f")
    with torch.no_grad():
        norm.weight.mul_(scale)


def tiny_teachers(folder: Path, setup: Setup) -> dict[str, Path]:
    """A 4-layer Llama-shaped and a 4-layer GPT-2-shaped teacher (seed 0) with the GPT-2 tokenizer.

    The Llama one gets the GPT-2 vocabulary (50,257) so that the real tokenizer fits it; the
    GPT-2 one has dropout 0, so that every run is deterministic.
    """
    from lmdistill.models.load import load_tokenizer
    from tests.helpers import save_with_tokenizer, tiny_gpt2, tiny_llama

    tokenizer = load_tokenizer("gpt2")
    models = {"llama": tiny_llama(num_layers=4, seed=0, vocab_size=len(tokenizer)),
              "gpt2": tiny_gpt2(n_layer=4, dropout=0.0, seed=0)}
    for model in models.values():
        sharpen(model, setup.logit_scale)
    return {name: save_with_tokenizer(model, tokenizer, folder / f"teacher-{name}") for name, model in models.items()}


@contextlib.contextmanager
def workspace(setup: Setup) -> Iterator[Workspace]:
    """A temporary folder holding the teachers, the text and ``$LMDISTILL_CACHE``; removed on exit,
    with the environment variable and torch's thread count (runs set train.threads) restored."""
    from tests.helpers import small_text_file

    threads = torch.get_num_threads()
    old_cache = os.environ.get("LMDISTILL_CACHE")
    with tempfile.TemporaryDirectory(prefix="lmdistill-golden-") as tmp:
        root = Path(tmp)
        os.environ["LMDISTILL_CACHE"] = str(root / "lmdistill-cache")
        try:
            yield Workspace(root, setup, tiny_teachers(root, setup), small_text_file(root, setup.text_characters))
        finally:
            if old_cache is None:
                os.environ.pop("LMDISTILL_CACHE", None)
            else:
                os.environ["LMDISTILL_CACHE"] = old_cache
            torch.set_num_threads(threads)


def cache_teacher_args(ws: Workspace, teacher: str) -> list[str]:
    """``lmdistill cache-teacher`` over the text the runs train on (prepared as distill prepares it)."""
    return ["cache-teacher", "--teacher", str(ws.teachers[teacher]), "--data", str(ws.text),
            "--top-k", str(ws.setup.cache_top_k), "--tail-samples", str(ws.setup.cache_tail_samples),
            "--temperatures", "2", "--block-size", "32", "--out", str(ws.cache(teacher)), "--device", "cpu"]


def build_cache(ws: Workspace, teacher: str) -> None:
    """The teacher's cache, built once per workspace."""
    from lmdistill.cli import main

    if ws.cache(teacher).is_dir():
        return
    code = main(cache_teacher_args(ws, teacher))
    if code != 0:
        raise RuntimeError(f"lmdistill cache-teacher exited with {code} (its error is printed above)")


def overrides(path: str) -> list[str]:
    """The path's overrides, with {teacher}, {text}, {cache} and {threads} still to fill in."""
    return [*COMMON_OVERRIDES, *PATHS[path]]


def fill(template: Sequence[str], ws: Workspace, teacher: str, threads: int) -> list[str]:
    values = {"teacher": ws.teachers[teacher], "text": ws.text, "cache": ws.cache(teacher), "threads": threads}
    return [item.format(**values) for item in template]


def weights_sha256(folder: Path) -> str:
    """SHA-256 of a saved model's tensors (names, dtypes, shapes and bytes, in name order): equal
    exactly when every weight is bit-identical, whatever metadata the file carries."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        for name in sorted(tensors):
            tensor = tensors[name].contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_run(run_dir: Path) -> dict[str, Any]:
    """What a finished run logged: each step's values (timings left out), the validations, and
    the student's layer map and weight digest."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    student_config = json.loads((run_dir / "student" / "config.json").read_text())
    return {
        "student_layers": student_config.get("lmdistill_layer_map"),
        "steps": [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows if "loss" in row],
        "val": [row for row in rows if "val_loss" in row],
        "student_sha256": weights_sha256(run_dir / "student"),
    }


def run(ws: Workspace, teacher: str, template: Sequence[str], threads: int = THREADS,
        extra: Sequence[str] = ()) -> dict[str, Any]:
    """Train the recipe with ``template`` (+ ``extra``) overrides on ``teacher``; :func:`read_run`'s record."""
    from lmdistill.recipe import load_config
    from lmdistill.train.run import run_training

    if any("{cache}" in item for item in template):
        build_cache(ws, teacher)
    (ws.root / "runs").mkdir(exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f"{teacher}-", dir=ws.root / "runs"))
    try:
        config = load_config(RECIPE, [*fill(template, ws, teacher, threads), *extra])
        summary = run_training(config, out, progress=False)
        if not summary.get("finished"):
            raise RuntimeError(f"the run with {template} on the {teacher} teacher did not finish: {summary}")
        return {"overrides": list(template), **read_run(out)}
    finally:
        shutil.rmtree(out, ignore_errors=True)  # checkpoints and students: a few MB per run


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    """The CPU's model name: MKL picks its matmul kernels by CPU, not only by instruction set."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(threads: int = THREADS) -> dict[str, Any]:
    """What decides the float32 operations of a run: in an equal environment they are the same,
    so every value is bit-identical. ``threads`` is the runs' train.threads."""
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model(), "threads": threads}


def source_commit() -> dict[str, str]:
    """The commit measured; refuses a tree whose lmdistill/ differs from it (the values would not be that commit's)."""
    dirty = git("status", "--porcelain", "--", "lmdistill")
    if dirty:
        raise SystemExit(f"lmdistill/ has uncommitted changes; commit or stash them before recording:\n{dirty}")
    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s")[:120],
            "date": git("log", "-1", "--format=%cI")}


def record(setup: Setup = Setup()) -> dict[str, Any]:
    """Every (teacher, path) run, as the golden file holds them."""
    commit = source_commit()
    with workspace(setup) as ws:
        runs = {f"{teacher}/{path}": run(ws, teacher, overrides(path)) for teacher in TEACHERS for path in PATHS}
    return {
        "about": "5 steps of the smollm2-demo recipe on tiny teachers per loss path, written by "
                 "scripts/record_golden.py; tests/test_golden.py reruns them. Placeholders in the overrides: "
                 "{teacher}, {text}, {cache} (temporary folders), {threads} (environment.threads)",
        "recorded_from": commit,
        "environment": environment(),
        "recipe": RECIPE,
        "setup": dataclasses.asdict(setup),
        "teachers": {"llama": "tests.helpers.tiny_llama(num_layers=4, seed=0, vocab_size=50257)",
                     "gpt2": "tests.helpers.tiny_gpt2(n_layer=4, dropout=0.0, seed=0)",
                     "both": "final norm gain x setup.logit_scale, saved with the GPT-2 tokenizer"},
        "cache_teacher": "lmdistill cache-teacher --top-k setup.cache_top_k --tail-samples setup.cache_tail_samples "
                         "--temperatures 2 --block-size 32, over the runs' text",
        "runs": runs,
    }


def to_json(value: Any, indent: str = "") -> str:
    """JSON with one line per metrics row (a dict or list of plain values), so that the diff of a
    re-recording shows which values changed."""
    inner = indent + " "
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {to_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(f"{inner}{to_json(v, inner)}" for v in value) + f"\n{indent}]"
    return json.dumps(value)


# ---------------------------------------------------------------------------------------
# Comparison (used by tests/test_golden.py)

# Values below this are compared relative to it instead: GPT-2's align_cos (about 0.01 from
# step 2) and above all its step-1 value, 1 - cos between a student layer and the teacher layer
# it is an exact copy of, which is float32 rounding noise of about 1e-8.
SMALL = 1e-2


def logged_values(run_record: dict[str, Any]) -> dict[str, Any]:
    """Every logged value of a run record by where it is, e.g. ``{"step 3 kl": 0.84, "val 5 val_ppl": ...}``."""
    return {f"{'val' if 'val_loss' in row else 'step'} {row['step']} {key}": value
            for row in run_record["steps"] + run_record["val"] for key, value in row.items()}


def relative_difference(a: float, b: float) -> float:
    """``|a - b|`` relative to the larger magnitude (at least :data:`SMALL`)."""
    return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b), SMALL)


def differences(golden: dict[str, Any], measured: dict[str, Any], rel: float) -> list[str]:
    """Where ``measured`` differs from ``golden``: floats beyond ``rel`` (:func:`relative_difference`),
    anything else (steps, token counts, the layer map, the set of logged fields) at all. With
    ``rel=0`` every value must be bit-identical, and the final student weights too."""
    found = []
    if golden["student_layers"] != measured["student_layers"]:
        found.append(f"student layers {measured['student_layers']} != golden {golden['student_layers']}")
    want, got = logged_values(golden), logged_values(measured)
    if want.keys() != got.keys():
        found.append(f"logged fields differ: missing {sorted(want.keys() - got.keys())}, "
                     f"new {sorted(got.keys() - want.keys())}")
    for where in sorted(want.keys() & got.keys(), key=list(want).index):
        a, b = want[where], got[where]
        if a == b or (isinstance(a, float) and relative_difference(a, b) <= rel):
            continue
        found.append(f"{where}: {b!r} != golden {a!r} (relative difference {relative_difference(a, b):.2e})")
    if rel == 0 and golden["student_sha256"] != measured["student_sha256"]:
        found.append("the final student weights are not bit-identical (their sha256 differs)")
    return found


def largest_difference(golden: dict[str, Any], measured: dict[str, Any]) -> tuple[float, str]:
    """The largest :func:`relative_difference` over a run's logged values, and where it is."""
    want, got = logged_values(golden), logged_values(measured)
    return max(((relative_difference(want[w], got[w]), w) for w in want.keys() & got.keys()), default=(0.0, "-"))


def compare(threads: int, extra: Sequence[str]) -> None:
    """Rerun the golden file's runs here and print how far each is from it."""
    golden = json.loads(GOLDEN.read_text())
    print(f"golden: {golden['environment']} from {golden['recorded_from']['commit'][:12]}")
    print(f"now:    {environment(threads)}; extra overrides {list(extra)}")
    worst = 0.0
    with workspace(Setup(**golden["setup"])) as ws:
        for key, recorded in golden["runs"].items():
            teacher = key.split("/")[0]
            measured = run(ws, teacher, recorded["overrides"], threads, extra)
            rel, where = largest_difference(recorded, measured)
            exact = "bit-identical" if not differences(recorded, measured, 0.0) else "differs"
            print(f"{key:22s} largest relative difference {rel:.3e} at {where} ({exact})", flush=True)
            worst = max(worst, rel)
    print(f"largest over all runs: {worst:.3e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", action="store_true",
                        help=f"rerun and print each run's largest relative difference from {GOLDEN.relative_to(REPO)}")
    parser.add_argument("--threads", type=int, default=THREADS, help="train.threads of the runs (with --compare)")
    parser.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE",
                        help="extra overrides for every run (with --compare), e.g. loss.ce=2.001")
    args = parser.parse_args(argv)
    if args.compare:
        compare(args.threads, args.set)
        return 0
    document = record()
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(to_json(document) + "\n")
    print(f"wrote {GOLDEN} from {document['recorded_from']['commit']} ({len(document['runs'])} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

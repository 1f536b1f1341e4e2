"""Bad input through the real command line: one clear line, exit 2, nothing changed.

Each :class:`Case` builds its inputs in a fresh folder (``setup``), runs
``lmdistill.cli.main(argv)`` in-process (exactly what the ``lmdistill`` entry point runs) with
an empty, non-terminal standard input, and asserts:

- no exception escapes ``main`` (argparse's ``SystemExit`` included) and it returns 2;
- standard error is exactly one non-empty line ``lmdistill CMD: error: ...`` that holds the
  case's expected text (the file or field at fault), and no output says ``Traceback``;
- every file and folder under the case folder is still there with the same bytes, and
  nothing new appeared there (no run folder, no half-written output). The case folder is
  also the working directory, so a stray relative write would be caught too.

Adding a case is one line in ``CASES``: ``{name}`` placeholders in the argv and in the
expected text stand for the case folder (``{tmp}``) and the shared fixtures of ``ws``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmdistill.cli import main

from .helpers import save_with_tokenizer, small_text_file, tiny_gpt2

Setup = Callable[[Path, dict[str, Path]], None]


@dataclass(frozen=True)
class Case:
    name: str
    argv: str  # split on spaces, then each word formatted with the paths
    expect: str  # text the error line must hold (formatted like argv)
    setup: Setup | None = None
    stdin: str = ""


# ---------------------------------------------------------------------------------------
# Setup helpers: small functions that build one input each in the case folder.


def write(name: str, content: str | bytes) -> Setup:
    def build(tmp: Path, ws: dict[str, Path]) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return build


def model_copy(name: str, drop: str | None = None, truncate: str | None = None,
               replace: tuple[str, str] | None = None) -> Setup:
    """The tiny teacher folder copied to ``name``, then broken: a file dropped, cut in half or overwritten."""
    def build(tmp: Path, ws: dict[str, Path]) -> None:
        folder = Path(shutil.copytree(ws["teacher"], tmp / name))
        if drop:
            (folder / drop).unlink()
        if truncate:
            data = (folder / truncate).read_bytes()
            (folder / truncate).write_bytes(data[: len(data) // 2])
        if replace:
            (folder / replace[0]).write_text(replace[1])
    return build


def run_folder(name: str, overrides: tuple[str, ...] = ()) -> Setup:
    """A finished run of the ws recipe (with ``overrides``), as far as its files go: config.yaml,
    metrics.jsonl, summary.json and the (unlocked) .lock file every run folder keeps."""
    def build(tmp: Path, ws: dict[str, Path]) -> None:
        from lmdistill.recipe import load_config

        folder = tmp / name
        folder.mkdir()
        (folder / "config.yaml").write_text(load_config(ws["recipe"], list(overrides)).to_yaml())
        (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 3.5}\n')
        (folder / "summary.json").write_text('{"finished": true, "step": 1}\n')
        (folder / ".lock").write_text("")
    return build


def resumable_run(name: str) -> Setup:
    """A run of the ws recipe stopped before it finished (no summary.json)."""
    def build(tmp: Path, ws: dict[str, Path]) -> None:
        run_folder(name)(tmp, ws)
        (tmp / name / "summary.json").unlink()
    return build


_HELD_LOCKS: list[int] = []


def live_run(name: str) -> Setup:
    """A run that another process is writing: its lock held (through another open file
    description, which flock treats as another owner) with that owner's pid in the file."""
    def build(tmp: Path, ws: dict[str, Path]) -> None:
        import fcntl
        import os

        resumable_run(name)(tmp, ws)
        fd = os.open(tmp / name / LOCK_FILE, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"pid 424242 on trainer-7\n")
        _HELD_LOCKS.append(fd)
    return build


@pytest.fixture(autouse=True)
def release_held_locks():
    yield
    import os

    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.pop())


def damaged_checkpoints(name: str) -> Setup:
    """A stopped run whose only checkpoint lost half of its trainer state after it was written."""
    def build(tmp: Path, ws: dict[str, Path]) -> None:
        import json

        resumable_run(name)(tmp, ws)
        checkpoint = tmp / name / "checkpoints" / "step_000001"
        (checkpoint / "student").mkdir(parents=True)
        (checkpoint / "student" / "config.json").write_text("{}")
        (checkpoint / "trainer_state.pt").write_bytes(b"\0" * 50)
        (checkpoint / "manifest.json").write_text(json.dumps({"files": {
            "trainer_state.pt": {"size": 100, "sha256": "0" * 64},
            "student/config.json": {"size": 2, "sha256": "0" * 64}}}))
        (checkpoint.parent / "latest").write_text("step_000001\n")
    return build


def damaged_cache(edit: str) -> Setup:
    """A copy of the ws teacher cache with block 2 damaged: its ids overwritten with 0xFF, or
    one bit of a stored logit flipped (still a finite value: only the checksum can tell)."""
    def build(tmp: Path, ws: dict[str, Path]) -> None:
        from .test_teacher_cache_integrity import damaged_copy

        def damage(blocks):
            if edit == "ids":
                blocks["records"]["indices"][2] = 0xFFFF
            else:
                blocks["records"]["values"][2, 5, 1] ^= 1
        damaged_copy(ws["teacher_cache"], tmp / "cache", damage)
    return build


def both(*setups: Setup) -> Setup:
    def build(tmp: Path, ws: dict[str, Path]) -> None:
        for setup in setups:
            setup(tmp, ws)
    return build


NOTES = write("notes.txt", "my notes\n")
MINE = write("mine/keep.txt", "not a run\n")  # a non-empty folder that is not a run
SPLITS = both(*(write(f"splits/{s}.txt", "Call me Ishmael.\n") for s in ("train", "validation", "test")))

DISTILL = "distill --config {recipe} --out {tmp}/run"
CACHED = f"{DISTILL} loss.cos=0 data.sources=[{{cache_src}}] data.prepared_dir={{cache_prepared}} --teacher-cache"
CACHE_TEACHER = "cache-teacher --teacher {teacher} --data {text} --out {tmp}/cache"

CASES = [
    # -- config: recipes and section.field=value overrides
    Case("config-unknown-field", f"{DISTILL} train.nope=1", "train.nope"),
    Case("config-unknown-section", f"{DISTILL} optim.lr=1e-3", "optim"),
    Case("config-bad-type", f"{DISTILL} train.max_steps=many", "train.max_steps"),
    Case("config-out-of-range", f"{DISTILL} train.lr=3", "train.lr"),
    Case("recipe-top-level-list", "distill --config {tmp}/list.yaml --out {tmp}/run", "{tmp}/list.yaml",
         write("list.yaml", "- model:\n    teacher: gpt2\n")),
    Case("recipe-invalid-yaml", "distill --config {tmp}/bad.yaml --out {tmp}/run", "{tmp}/bad.yaml",
         write("bad.yaml", "model:\n  teacher: [gpt2\ntrain:\n  lr: 1\n")),
    Case("recipe-not-utf8", "distill --config {tmp}/latin1.yaml --out {tmp}/run", "{tmp}/latin1.yaml",
         write("latin1.yaml", b"model:\n  teacher: caf\xe9\n")),
    Case("recipe-section-not-mapping", "distill --config {tmp}/flat.yaml --out {tmp}/run", "train",
         write("flat.yaml", "train: 5\n")),
    Case("recipe-missing", "distill --config {tmp}/nope.yaml --out {tmp}/run", "{tmp}/nope.yaml"),
    Case("recipe-is-a-folder", "distill --config {tmp}/mine --out {tmp}/run", "{tmp}/mine", MINE),
    Case("adam-eps-zero-in-float32", f"{DISTILL} train.adam_eps=1e-300", "train.adam_eps"),
    Case("lr-zero-in-float32", f"{DISTILL} train.lr=1e-50", "train.lr"),
    Case("beta2-one-in-float32", f"{DISTILL} train.betas=[0.9,0.999999999]", "train.betas"),
    Case("grad-norm-zero-in-float32", f"{DISTILL} train.max_grad_norm=1e-300", "train.max_grad_norm"),
    Case("kl-weight-inf-in-float32", f"{DISTILL} loss.kl=1e39", "loss.kl"),
    Case("ce-weight-zero-in-float32", f"{DISTILL} loss.ce=1e-60", "loss.ce"),
    Case("temperature-vanishes", f"{DISTILL} loss.temperature=1e-30", "loss.temperature"),
    Case("temperature-overflows", f"{DISTILL} loss.temperature=1e30", "loss.temperature"),
    Case("override-malformed-before-options", "distill trainmax_steps=3 --config {recipe} --out {tmp}/run",
         "trainmax_steps=3"),
    Case("override-malformed-after-options", f"{DISTILL} train.max_steps", "train.max_steps"),
    Case("override-between-options", "distill --config {recipe} train.lr=fast --out {tmp}/run train.max_steps=2",
         "train.lr"),
    Case("unknown-option", "distill --config {recipe} --outt {tmp}/run", "--outt"),
    # -- data sources
    Case("source-missing", "prepare --tokenizer {teacher} --source {tmp}/missing.txt --out {tmp}/data",
         "{tmp}/missing.txt"),
    Case("source-empty-text-file", "prepare --tokenizer {teacher} --source {tmp}/empty.txt --out {tmp}/data",
         "empty.txt", write("empty.txt", "")),
    Case("source-bad-jsonl-line", "prepare --tokenizer {teacher} --source {tmp}/docs.jsonl --out {tmp}/data",
         "docs.jsonl, line 2", write("docs.jsonl", '{"text": "Call me Ishmael."}\n{"text": "Some years\n')),
    Case("source-not-utf8", "prepare --tokenizer {teacher} --source {tmp}/latin1.txt --out {tmp}/data",
         "latin1.txt", write("latin1.txt", b"caf\xe9 au lait\n")),
    Case("source-unknown-corpus", "prepare --tokenizer {teacher} --source corpus:shakespeare --out {tmp}/data",
         "shakespeare"),
    Case("block-size-larger-than-data",
         f"{DISTILL} data.sources=[{{tmp}}/splits] data.prepared_dir={{root}}/prepared_short data.block_size=64",
         "data.block_size", SPLITS),
    # -- models
    Case("model-folder-missing", "generate {tmp}/nope --prompt Hi", "{tmp}/nope"),
    Case("model-folder-without-config", "generate {tmp}/mine --prompt Hi", "{tmp}/mine", MINE),
    Case("model-folder-without-weights", "eval {tmp}/noweights --task lastword:max_docs=2", "{tmp}/noweights",
         model_copy("noweights", drop="model.safetensors")),
    Case("model-truncated-safetensors", "generate {tmp}/cut --prompt Hi", "{tmp}/cut/model.safetensors",
         model_copy("cut", truncate="model.safetensors")),
    Case("model-config-not-json", "init-student --teacher {tmp}/badcfg --out {tmp}/student",
         "{tmp}/badcfg/config.json", model_copy("badcfg", replace=("config.json", '{"model_type": "gpt2",'))),
    Case("tokenizer-config-not-json", "prepare --tokenizer {tmp}/badcfg --source {text} --out {tmp}/data",
         "{tmp}/badcfg/config.json", model_copy("badcfg", replace=("config.json", "not json"))),
    Case("gguf-missing", "bench {tmp}/model.gguf", "{tmp}/model.gguf"),
    Case("gguf-not-gguf", "generate {tmp}/fake.gguf --prompt Hi", "{tmp}/fake.gguf",
         write("fake.gguf", "this is not a GGUF file\n")),
    Case("vocab-mismatch", f"{DISTILL} model.student={{small_vocab}}", "different vocabularies"),
    # -- run folders that exist without being runs
    Case("distill-out-is-a-file", "distill --config {recipe} --out {tmp}/notes.txt", "{tmp}/notes.txt", NOTES),
    Case("distill-out-not-empty", "distill --config {recipe} --out {tmp}/mine", "{tmp}/mine", MINE),
    Case("distill-out-holds-this-run", "distill --config {recipe} --out {tmp}/run1", "--resume {tmp}/run1",
         run_folder("run1")),
    Case("distill-out-holds-another-run", "distill --config {recipe} --out {tmp}/run1 train.max_steps=5",
         "a different run", run_folder("run1")),
    Case("resume-folder-without-run", "distill --resume {tmp}/mine", "{tmp}/mine", MINE),
    # -- run folders in use, checkpoints, teacher caches, faults during training
    Case("resume-live-run", "distill --resume {tmp}/run1", "pid 424242 on trainer-7", live_run("run1")),
    Case("distill-out-is-a-live-run", "distill --config {recipe} --out {tmp}/run1", "pid 424242", live_run("run1")),
    Case("resume-no-intact-checkpoint", "distill --resume {tmp}/run1", "no intact checkpoint",
         damaged_checkpoints("run1")),
    Case("teacher-cache-ids-out-of-vocabulary", f"{CACHED} {{tmp}}/cache", "block 2", damaged_cache("ids")),
    Case("teacher-cache-flipped-bit", f"{CACHED} {{tmp}}/cache", "fails its checksum", damaged_cache("bit")),
    Case("teacher-cache-missing", f"{CACHED} {{tmp}}/nocache", "{tmp}/nocache"),
    # finite in float32 with T^2, but the weighted KL's gradient overflows at step 1: stopped
    # before the optimiser step, and the run folder it had made removed
    Case("loss-weight-overflows-in-training", f"{DISTILL} loss.kl=5e37", "loss.kl=5e+37"),
    Case("resume-with-config", "distill --resume {tmp}/mine --config {recipe}", "--config", MINE),
    Case("demo-out-not-empty", "demo --out {tmp}/mine --minutes 1", "{tmp}/mine", MINE),
    Case("demo-resume-without-run", "demo --resume --out {tmp}/mine", "{tmp}/mine", MINE),
    Case("report-not-a-run", "report {tmp}/mine", "{tmp}/mine", MINE),
    Case("report-eval-not-json", "report {tmp}/mine --eval {tmp}/notes.txt", "{tmp}/notes.txt", both(MINE, NOTES)),
    # -- eval, bench, generate
    Case("eval-unknown-task", "eval {teacher} --task perplexity", "perplexity"),
    Case("eval-unknown-task-option", "eval {teacher} --task lastword:docs=2", "docs"),
    Case("eval-bad-task-option", "eval {teacher} --task lastword:max_docs=lots", "max_docs"),
    Case("eval-window-too-small", "eval {teacher} --data {text} --window 1", "window"),
    Case("eval-window-past-context", "eval {teacher} --data {text} --window 4096", "window"),
    Case("eval-json-under-a-file", "eval {teacher} --task lastword:max_docs=2 --json {tmp}/notes.txt/out.json",
         "{tmp}/notes.txt", NOTES),
    Case("eval-json-is-a-folder", "eval {teacher} --task lastword:max_docs=2 --json {tmp}/mine", "{tmp}/mine", MINE),
    Case("bench-json-under-a-file", "bench {teacher} --json {tmp}/notes.txt/bench.json", "{tmp}/notes.txt", NOTES),
    Case("bench-zero-repeats", "bench {teacher} --repeats 0", "--repeats"),
    Case("bench-negative-warmup", "bench {teacher} --warmup -1", "--warmup"),
    Case("bench-past-context", "bench {teacher} --prompt-tokens 100 --new-tokens 100", "context"),
    Case("bench-different-tokenizers", "bench {teacher} {other_tok}", "tokenizer"),
    Case("generate-empty-stdin", "generate {teacher}", "prompt"),
    Case("generate-bad-top-p", "generate {teacher} --prompt Hi --top-p 1.5", "--top-p"),
    Case("generate-zero-new-tokens", "generate {teacher} --prompt Hi --max-new-tokens 0", "--max-new-tokens"),
    Case("generate-past-context", "generate {teacher} --prompt Hi --max-new-tokens 500", "128 positions"),
    # -- init-student, cache-teacher, prepare
    Case("init-student-out-not-empty", "init-student --teacher {teacher} --out {tmp}/mine", "{tmp}/mine", MINE),
    Case("init-student-out-is-a-file", "init-student --teacher {teacher} --out {tmp}/notes.txt", "{tmp}/notes.txt",
         NOTES),
    Case("init-student-layer-out-of-range", "init-student --teacher {teacher} --layers 0,7 --out {tmp}/student",
         "out of range"),
    Case("init-student-calibration-missing",
         "init-student --teacher {teacher} --strategy importance --calibration {tmp}/missing.txt --out {tmp}/student",
         "{tmp}/missing.txt"),
    Case("init-student-calibration-too-short",
         "init-student --teacher {teacher} --strategy importance --calibration {tmp}/splits --out {tmp}/student",
         "calibration", SPLITS),
    Case("init-student-width-past-teacher",
         "init-student --teacher {teacher} --intermediate-size 500 --out {tmp}/student",
         "model.intermediate_size (--intermediate-size): 500 is more than the teacher's 128"),
    Case("init-student-gpt2-heads", "init-student --teacher {teacher} --num-attention-heads 1 --out {tmp}/student",
         "n_embd / n_head"),
    Case("init-student-heads-not-a-multiple",
         "init-student --teacher {teacher} --num-attention-heads 3 --num-key-value-heads 2 --out {tmp}/student",
         "model.num_attention_heads: 3 is not a multiple of model.num_key_value_heads=2"),
    Case("init-student-zero-neurons", "init-student --teacher {teacher} --intermediate-size 0 --out {tmp}/student",
         "--intermediate-size"),
    Case("init-student-params-out-of-reach", "init-student --teacher {teacher} --params 1K --out {tmp}/student",
         "model.params (--params): 1,000 parameters is out of reach"),
    Case("init-student-params-unreadable", "init-student --teacher {teacher} --params 81.4Q --out {tmp}/student",
         "--params"),
    Case("distill-width-past-teacher", f"{DISTILL} model.intermediate_size=500", "model.intermediate_size"),
    Case("distill-gpt2-heads", f"{DISTILL} model.num_key_value_heads=1", "n_embd / n_head"),
    Case("cache-teacher-top-k-zero", f"{CACHE_TEACHER} --top-k 0 --block-size 32", "--top-k"),
    Case("cache-teacher-block-past-context", f"{CACHE_TEACHER} --top-k 8 --block-size 4096", "--block-size"),
    Case("cache-teacher-zero-temperature", f"{CACHE_TEACHER} --top-k 8 --block-size 32 --temperatures 0",
         "--temperatures"),
    Case("cache-teacher-bad-rank", f"{CACHE_TEACHER} --top-k 8 --block-size 32 --rank 2 --world-size 2", "--rank"),
    Case("cache-teacher-missing-data",
         "cache-teacher --teacher {teacher} --data {tmp}/missing.txt --out {tmp}/cache --top-k 8 --block-size 32",
         "{tmp}/missing.txt"),
    Case("prepare-out-is-a-file", "prepare --tokenizer {teacher} --source {text} --out {tmp}/notes.txt",
         "{tmp}/notes.txt", NOTES),
    Case("prepare-unknown-tokenizer", "prepare --tokenizer {tmp}/nope --source {text} --out {tmp}/data", "{tmp}/nope"),
]


# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory, gpt2_tokenizer) -> dict[str, Path]:
    """Tiny models, a text file and a recipe shared by every case (read-only for them)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    other_tokenizer = copy.deepcopy(gpt2_tokenizer)
    other_tokenizer.add_tokens(["<lmdistill-extra>"])  # another vocabulary: another fingerprint
    text = small_text_file(root)
    paths = {
        "root": root,
        "cache": root / "lmdistill_cache",
        "text": text,
        "teacher": save_with_tokenizer(tiny_gpt2(n_layer=4, seed=0), gpt2_tokenizer, root / "teacher"),
        "small_vocab": save_with_tokenizer(tiny_gpt2(n_layer=2, seed=1, vocab_size=300), gpt2_tokenizer,
                                           root / "small_vocab"),
        "other_tok": save_with_tokenizer(tiny_gpt2(n_layer=2, seed=2, vocab_size=len(other_tokenizer)),
                                         other_tokenizer, root / "other_tok"),
        "recipe": root / "recipe.yaml",
    }
    paths["recipe"].write_text(
        f"model:\n  teacher: {paths['teacher']}\n  num_layers: 2\n"
        f"data:\n  sources: [{text}]\n  prepared_dir: {root / 'prepared'}\n  block_size: 32\n"
        "train:\n  max_steps: 1\n  eval_every: 0\n  checkpoint_every: 0\n  eval_tokens: 64\n"
    )
    # A teacher cache (top-8 logits, 4 tail samples, blocks of 32) over a small text of its own:
    # the builder runs the teacher's full-vocabulary softmax per block, so fewer blocks are faster.
    from .test_teacher_cache import split_folder

    paths["cache_src"] = split_folder(root / "cache_src", 5000, 2500)
    paths["cache_prepared"] = root / "cache_prepared"
    paths["teacher_cache"] = root / "teacher_cache"
    teacher = str(paths["teacher"])
    assert main(["prepare", "--tokenizer", teacher, "--source", str(paths["cache_src"]),
                 "--out", str(paths["cache_prepared"])]) == 0
    assert main(["cache-teacher", "--teacher", teacher, "--data", str(paths["cache_prepared"]), "--top-k", "8",
                 "--block-size", "32", "--tail-samples", "4", "--out", str(paths["teacher_cache"])]) == 0
    return paths


PROGRESS_BAR = re.compile(r"^\s*\d+%\|")  # tqdm's lines (training's progress bar) on stderr
LOCK_FILE = ".lock"  # a run folder's lock: each process that takes it writes its pid there


def snapshot(folder: Path) -> dict[str, str]:
    """Every file's sha256 and every folder, by path relative to ``folder`` (a run's lock file by
    its presence only: taking the lock to look at a run is not a change to the run)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir():
            state[rel] = "folder"
        else:
            state[rel] = "lock" if path.name == LOCK_FILE else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def test_cases_have_distinct_names_and_commands():
    assert len({case.name for case in CASES}) == len(CASES)
    commands = {case.argv.split()[0] for case in CASES}
    assert commands == {"prepare", "init-student", "cache-teacher", "distill", "eval", "generate", "bench", "report",
                        "demo"}


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in CASES])
def test_bad_input_gives_one_clear_line_and_changes_nothing(case, ws, tmp_path, capfd, monkeypatch):
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    monkeypatch.setenv("LMDISTILL_CACHE", str(ws["cache"]))  # derived caches go outside the case folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never wait for the hub
    monkeypatch.delenv("LMDISTILL_DEBUG", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(case.stdin))  # not a terminal
    monkeypatch.chdir(case_dir)
    if case.setup:
        case.setup(case_dir, ws)
    names = {key: str(value) for key, value in ws.items()} | {"tmp": str(case_dir)}
    argv = [word.format(**names) for word in case.argv.split()]
    expect = case.expect.format(**names)
    before = snapshot(case_dir)
    capfd.readouterr()

    try:
        rc = main(argv)
    except BaseException as exc:  # noqa: BLE001 - whatever escapes is the failure being tested
        pytest.fail(f"{type(exc).__name__} escaped main: {exc}")
    out, err = capfd.readouterr()

    assert "Traceback" not in out + err
    assert rc == 2, (rc, err)
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lmdistill {argv[0]}: error: "), lines[0]
    assert expect in lines[0], (expect, lines[0])
    assert snapshot(case_dir) == before

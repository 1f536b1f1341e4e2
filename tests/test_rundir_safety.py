"""What a run directory survives: concurrent starts, kill -9 mid-checkpoint, damaged checkpoints,
non-finite steps, disk errors, failed starts and divergence."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmdistill.atomic import build_dir_atomic, remove_leftovers
from lmdistill.train.rundir import RunDir, read_metrics
from lmdistill.cli import main
from lmdistill.recipe import load_config
from lmdistill.errors import NonFiniteError
from lmdistill.train.health import ValidationWatch
from lmdistill.train.rundir import RunDirError
from lmdistill.train.run import run_training

from .helpers import save_with_tokenizer, small_text_file, tiny_gpt2

STEPS = 12


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A 12-step recipe on a tiny GPT-2 teacher with dropout (so resuming needs the RNG state too),
    one thread (so every run of it computes the same floats in the same order)."""
    root = tmp_path_factory.mktemp("safety")
    teacher = save_with_tokenizer(tiny_gpt2(n_layer=4, dropout=0.1), gpt2_tokenizer, root / "teacher")
    text = small_text_file(root)
    path = root / "recipe.yaml"
    path.write_text(json.dumps({
        "model": {"teacher": str(teacher), "num_layers": 2},
        "data": {"sources": [str(text)], "prepared_dir": str(root / "data"), "block_size": 32},
        "train": {"batch_size": 2, "lr": 1e-3, "max_steps": STEPS, "eval_every": 0, "checkpoint_every": 3,
                  "eval_tokens": 128, "threads": 1},
    }))
    return path


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> dict[int, float]:
    """Losses of the recipe run without interruption."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_training(load_config(recipe), run, progress=False)
    return losses(run)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def assert_same_losses(run: Path, reference: dict[int, float]) -> None:
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Same code, machine, inputs, seed and RNG state on one thread, and a checkpoint that keeps
    # weights, optimizer state and RNG exactly: the runs compute the same floats, bit for bit.
    assert got == reference


def leftovers(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob("*") if ".tmp-" in p.name]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower()]


def cli(argv: list[str], env: dict[str, str] | None = None, wrapper: str = "") -> subprocess.Popen:
    """``lmdistill ARGV`` in a fresh process; ``wrapper`` runs first (fault injection)."""
    code = f"import sys\n{wrapper}\nfrom lmdistill.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


# ---------------------------------------------------------------------------------------
# One writer per folder


def test_two_runs_started_on_one_folder_one_is_refused_naming_the_other(recipe, reference, tmp_path):
    run = tmp_path / "run"
    first, second = (cli(["distill", "--config", str(recipe), "--out", str(run)]) for _ in range(2))
    outs = {proc.pid: proc.communicate(timeout=300)[0] for proc in (first, second)}
    codes = {proc.pid: proc.returncode for proc in (first, second)}
    assert sorted(codes.values()) == [0, 2], outs
    loser = next(pid for pid, code in codes.items() if code == 2)
    winner = next(pid for pid, code in codes.items() if code == 0)
    lines = error_lines(outs[loser])
    assert len(lines) == 1 and f"pid {winner}" in lines[0] and "in use" in lines[0], outs[loser]
    assert "Traceback" not in outs[loser]
    # The winner's run is whole and its own: each step logged once, its student written.
    assert json.loads((run / "summary.json").read_text())["finished"] is True
    assert_same_losses(run, reference)
    assert (run / "student" / "model.safetensors").is_file()


def test_resume_while_the_run_is_alive_is_refused(recipe, tmp_path, capfd):
    run = tmp_path / "run"
    # A budget it never reaches: the test stops it with Ctrl-C once the refusals are checked.
    proc = cli(["distill", "--config", str(recipe), "--out", str(run), "train.max_steps=100000"])
    try:
        wait_for(lambda: len(losses(run)) >= 1, proc)
        for argv in (["distill", "--resume", str(run)],
                     ["distill", "--config", str(recipe), "--out", str(run), "train.max_steps=100000"]):
            assert main(argv) == 2
            err = capfd.readouterr().err
            assert len(error_lines(err)) == 1 and f"pid {proc.pid}" in error_lines(err)[0], err
        assert proc.poll() is None, "the run ended before the refusals were checked"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    steps = sorted(losses(run))
    assert steps == list(range(1, len(steps) + 1))  # the refused processes wrote nothing
    assert RunDir(run).latest_checkpoint().name == f"step_{steps[-1]:06d}"


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    import time

    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"process ended early:\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("timed out")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------
# Checkpoints: killed writes, damaged files


# Kills the process (SIGKILL, nothing runs after it) while the second checkpoint is being
# built: its student and trainer state are written, its manifest is not, and it has not been
# renamed into place.
KILL_IN_SECOND_CHECKPOINT = textwrap.dedent("""
    import os, signal
    import lmdistill.train.rundir as checkpoint
    _write_manifest, _calls = checkpoint.write_manifest, []
    def write_manifest(folder):
        _calls.append(folder)
        if len(_calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        _write_manifest(folder)
    checkpoint.write_manifest = write_manifest
""")


def test_kill_during_a_checkpoint_write_then_resume_matches_uninterrupted_run(recipe, reference, tmp_path):
    run = tmp_path / "run"
    proc = cli(["distill", "--config", str(recipe), "--out", str(run)], wrapper=KILL_IN_SECOND_CHECKPOINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    assert leftovers(run) and all(p.startswith("checkpoints/.step_000006.tmp-") for p in leftovers(run))
    assert RunDir(run).latest_checkpoint().name == "step_000003"

    resumed = cli(["distill", "--resume", str(run)])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming" in out and "step 3" in out and "removed what an interrupted write left" in out
    assert_same_losses(run, reference)
    assert leftovers(run) == []


def damage_truncate_state(checkpoint: Path) -> None:
    path = checkpoint / "trainer_state.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_remove_weights(checkpoint: Path) -> None:
    (checkpoint / "student" / "model.safetensors").unlink()


def damage_config_json(checkpoint: Path) -> None:
    path = checkpoint / "student" / "config.json"
    path.write_text(path.read_text().replace("{", "[", 1))  # same size, no longer JSON


@pytest.fixture(scope="module")
def stopped_at_9(recipe, tmp_path_factory) -> Path:
    """The recipe stopped after step 9: checkpoints step_6 and step_9 kept."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    run_training(load_config(recipe), run, stop_at_step=9, progress=False)
    return run


@pytest.mark.parametrize("damage", [damage_truncate_state, damage_remove_weights, damage_config_json])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(stopped_at_9, reference, tmp_path, damage, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped_at_9, run)
    assert RunDir(run).latest_checkpoint().name == "step_000009"
    damage(run / "checkpoints" / "step_000009")
    summary = run_training(None, run, resume=True, progress=False)
    out = capsys.readouterr().out
    assert "checkpoint step_000009 is damaged" in out and "resuming" in out and "from step 6" in out, out
    assert summary["finished"] and summary["step"] == STEPS
    # Resumed from step 6, it reproduces the uninterrupted run (which a resume from step 6 does).
    assert_same_losses(run, reference)


def test_no_intact_checkpoint_is_refused(stopped_at_9, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_at_9, run)
    for checkpoint in (run / "checkpoints").glob("step_*"):
        damage_truncate_state(checkpoint)
    with pytest.raises(RunDirError, match="no intact checkpoint"):
        run_training(None, run, resume=True, progress=False)


# ---------------------------------------------------------------------------------------
# Non-finite values never reach a checkpoint


def nan_after_step(n: int, monkeypatch) -> None:
    """AdamW.step writes a NaN into one weight on its n-th call (a fault of the update itself)."""
    original, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == n:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("checkpoint_every", [1, 2])
def test_nan_from_the_optimizer_step_is_never_checkpointed(recipe, tmp_path, monkeypatch, checkpoint_every):
    config = load_config(recipe, [f"train.checkpoint_every={checkpoint_every}"])
    run = tmp_path / "run"
    nan_after_step(3, monkeypatch)
    # checkpoint_every=1: caught before step 3's checkpoint; 2: step 4's loss is NaN.
    with pytest.raises(NonFiniteError, match=r"train\.adam_eps.*step_000002 is intact.*--resume") as caught:
        run_training(config, run, progress=False)
    assert "non-finite" in str(caught.value)
    for checkpoint in (run / "checkpoints").glob("step_*"):
        weights = load_file(checkpoint / "student" / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint
    assert RunDir(run).latest_checkpoint().name == "step_000002"
    monkeypatch.undo()  # the fault is gone: the run resumes and finishes
    summary = run_training(None, run, resume=True, progress=False)
    assert summary["finished"] and summary["step"] == STEPS


def test_epsilon_that_is_zero_in_float32_is_named(recipe, tmp_path):
    config = load_config(recipe, ["train.checkpoint_every=1"])
    config.train.adam_eps = 1e-300  # past the config's own check (Python API): 0 in float32
    with pytest.raises(NonFiniteError, match=r"train\.adam_eps \(1e-300, 0 in float32\)"):
        run_training(config, tmp_path / "run", progress=False)
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


def test_non_finite_loss_names_the_term(recipe, tmp_path):
    config = load_config(recipe)
    config.loss.kl = 1e38  # finite in float32, but the weighted KL or its gradient overflows it
    with pytest.raises(NonFiniteError, match=r"step 1: .*loss weights \(loss\.kl=1e\+38"):
        run_training(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # failed before its first step: nothing left


# ---------------------------------------------------------------------------------------
# Disk errors and failed starts


def test_disk_full_while_checkpointing_is_one_line_and_resumable(recipe, reference, tmp_path, monkeypatch, capfd):
    import lmdistill.train.rundir as checkpoint

    run = tmp_path / "run"
    original, calls = checkpoint.torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    assert main(["distill", "--config", str(recipe), "--out", str(run)]) == 2
    err = capfd.readouterr().err
    lines = error_lines(err)  # the progress bar also writes to stderr
    assert len(lines) == 1 and "the disk is full" in lines[0] and "step_000003" in lines[0], err
    assert lines[0].startswith("lmdistill distill: error:") and "--resume" in lines[0] and "Traceback" not in err
    assert leftovers(run) == []  # the half-built checkpoint was removed
    monkeypatch.undo()
    assert main(["distill", "--resume", str(run)]) == 0
    assert_same_losses(run, reference)


def test_start_that_fails_before_its_first_step_leaves_nothing(recipe, tmp_path, monkeypatch):
    import lmdistill.train.loop as train

    def broken(*args, **kwargs):
        raise RuntimeError("fault in validation")

    monkeypatch.setattr(train, "validate", broken)
    nested = tmp_path / "a" / "b" / "run"
    with pytest.raises(RuntimeError):
        run_training(load_config(recipe), nested, progress=False)
    assert not (tmp_path / "a").exists()
    given = tmp_path / "empty"
    given.mkdir()
    with pytest.raises(RuntimeError):
        run_training(load_config(recipe), given, progress=False)
    assert given.is_dir() and list(given.iterdir()) == []


def test_leftovers_of_killed_writes_are_removed_and_a_moved_aside_folder_restored(tmp_path):
    build_dir_atomic(tmp_path / "student", lambda tmp: (tmp / "weights").write_text("old"))
    # A writer killed between moving the old folder aside and renaming the new one in:
    aside = tmp_path / ".student.tmp-old-abc"
    aside.mkdir()
    os.replace(tmp_path / "student", aside / "student")
    (tmp_path / ".student.tmp-xyz").mkdir()  # the half-built replacement
    (tmp_path / ".metrics.jsonl.tmp-123").write_text("torn")
    (tmp_path / ".lock").write_text("pid 1")
    (tmp_path / "notes.tmp").write_text("not ours")
    removed = remove_leftovers(tmp_path)
    assert sorted(removed) == [".metrics.jsonl.tmp-123", ".student.tmp-old-abc", ".student.tmp-xyz"]
    assert (tmp_path / "student" / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "notes.tmp", "student"]


# ---------------------------------------------------------------------------------------
# Divergence


def test_diverging_validation_is_warned_about(recipe, tmp_path, capsys):
    config = load_config(recipe, ["train.lr=0.9", "train.max_grad_norm=0", "train.warmup=0", "train.eval_every=3",
                                  "train.schedule=constant"])
    summary = run_training(config, tmp_path / "run", progress=False)
    ppl = [r["val_ppl"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_ppl" in r]
    assert max(ppl[1:]) > 10 * min(ppl), ppl  # this recipe does diverge
    out = capsys.readouterr().out
    assert "warning: validation perplexity" in out and "train.max_grad_norm, now 0" in out
    assert summary["warnings"] and "diverging" in summary["warnings"][0]


def test_validation_watch_reads_the_resumed_runs_history():
    config = load_config(None, ["train.max_steps=1"])
    rows = [{"step": 0, "val_ppl": 100.0}, {"step": 5, "val_ppl": 50.0}, {"step": 10, "val_ppl": 600.0}]
    watch = ValidationWatch(config, rows)
    assert len(watch.warnings) == 1 and "at step 10" in watch.warnings[0] and "(50 at step 5)" in watch.warnings[0]
    watch.see(15, 499.0)
    assert len(watch.warnings) == 1  # under 10x the best: noise, not divergence
    watch.see(20, float("nan"))
    assert len(watch.warnings) == 2


def test_refused_start_on_a_finished_run_leaves_it_whole(recipe, tmp_path):
    run = tmp_path / "run"
    run_training(load_config(recipe, ["train.max_steps=2"]), run, progress=False)
    before = sorted((str(p.relative_to(run)), p.stat().st_size) for p in run.rglob("*") if p.is_file())
    for config in (load_config(recipe, ["train.max_steps=2"]), load_config(recipe, ["train.max_steps=3"])):
        with pytest.raises(RunDirError, match="holds (this|a different) run"):
            run_training(config, run, progress=False)
    assert sorted((str(p.relative_to(run)), p.stat().st_size) for p in run.rglob("*") if p.is_file()) == before

"""A real `lmdistill distill` process stopped by Ctrl-C or killed outright resumes correctly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmdistill.train.rundir import RunDir, read_metrics
from lmdistill.recipe import load_config
from lmdistill.train.run import run_training

from .helpers import save_with_tokenizer, small_text_file, tiny_gpt2


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("interrupt")
    teacher = save_with_tokenizer(tiny_gpt2(n_layer=4, dropout=0.1), gpt2_tokenizer, root / "teacher")
    data = {
        "model": {"teacher": str(teacher), "num_layers": 2},
        "data": {"sources": [str(small_text_file(root))], "prepared_dir": str(root / "data"), "block_size": 64},
        "train": {"batch_size": 4, "lr": 1e-3, "max_steps": 24, "eval_every": 0, "checkpoint_every": 3,
                  "eval_tokens": 256, "threads": 1},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmdistill", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True)


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, steps: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
        if len(done) >= steps:
            return
        if proc.poll() is not None:
            pytest.fail(f"process ended early:\n{proc.stdout.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("training did not reach the expected step in time")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_kill_then_resume_matches_uninterrupted_run(recipe, tmp_path):
    reference = tmp_path / "reference"
    run_training(load_config(recipe), reference, progress=False)

    run = tmp_path / "killed"
    proc = start(["distill", "--config", str(recipe), "--out", str(run)])
    wait_for_steps(run, proc, 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    latest = RunDir(run).latest_checkpoint()
    assert latest is not None and int(latest.name.split("_")[1]) >= 6
    assert not (run / "student").exists()

    resumed = start(["distill", "--resume", str(run)])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming" in out
    expected, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, 25))
    # Bit for bit: the same code on the same machine with one thread (train.threads), so every
    # op rounds alike; the checkpoint restores weights, Adam's state and the RNG exactly.
    assert got == expected


def test_ctrl_c_checkpoints_at_a_step_boundary(recipe, tmp_path):
    run = tmp_path / "stopped"
    proc = start(["distill", "--config", str(recipe), "--out", str(run)])
    wait_for_steps(run, proc, 5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "--resume" in out
    last_step = max(losses(run))
    assert last_step < 24
    latest = RunDir(run).latest_checkpoint()
    assert latest is not None and latest.name == f"step_{last_step:06d}"

"""The run directory and its checkpoints, written so that a killed run loses nothing.

Layout of a run directory::

    RUN_DIR/
      config.yaml              the resolved recipe
      metrics.jsonl            one JSON object per training step or validation
      checkpoints/
        step_000050/           student/ (HF folder) + trainer_state.pt
        latest                 the name of the newest complete checkpoint
      student_init/            the student before training (HF folder), for comparison
      student/                 the final student (HF folder)
      summary.json             written last, when the run finishes

A checkpoint is built in a hidden temporary folder and renamed into place, and ``latest`` is
replaced atomically after that, so ``latest`` only ever names a complete checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .atomic import build_dir_atomic, write_text_atomic
from .student import save_model

KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def student_init(self) -> Path:
        return self.root / "student_init"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint ``latest`` names, or the newest complete one if that is gone."""
        pointer = self.checkpoints / "latest"
        if pointer.is_file():
            path = self.checkpoints / pointer.read_text().strip()
            if (path / "trainer_state.pt").is_file():
                return path
        found = complete_checkpoints(self)
        return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: RunDir, step: int, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
                    trainer_state: dict[str, Any], student_state: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoints/step_N`` atomically, point ``latest`` at it, drop old ones.

    ``student_state``: the student's full weights when ``student`` itself holds only a shard."""
    name = f"step_{step:06d}"

    def build(tmp: Path) -> None:
        save_model(student, tokenizer, tmp / "student", state_dict=student_state)
        torch.save({"rng": rng_state(), **trainer_state}, tmp / "trainer_state.pt")

    final = build_dir_atomic(run.checkpoints / name, build)
    write_text_atomic(run.checkpoints / "latest", name + "\n")
    for old in complete_checkpoints(run)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run: RunDir) -> list[Path]:
    """Finished checkpoint folders, oldest first (by step number, not by name)."""
    found = [p for p in run.checkpoints.glob("step_*") if (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_", 1)[1]))


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    # weights_only=False: the state holds numpy RNG tuples and plain dicts written by us.
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)


def append_metrics(run: RunDir, row: dict[str, Any]) -> None:
    with open(run.metrics, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(run: RunDir, step: int) -> None:
    """Drop metric rows after ``step``: a resumed run re-does those steps and logs them again."""
    rows = [r for r in read_metrics(run.metrics) if r.get("step", 0) <= step]
    write_text_atomic(run.metrics, "".join(json.dumps(r) + "\n" for r in rows))

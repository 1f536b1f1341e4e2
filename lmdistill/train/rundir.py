"""The run directory and its checkpoints, written so that a killed run loses nothing.

Layout of a run directory::

    RUN_DIR/
      .lock                    held (flock) by the process writing the run; see RunLock
      config.yaml              the resolved recipe
      metrics.jsonl            one JSON object per training step or validation
      checkpoints/
        step_000050/           student/ (HF folder) + trainer_state.pt + manifest.json
        latest                 the name of the newest complete checkpoint
      tensorboard/             event files with the same numbers (only with train.log_to: [..., tensorboard])
      student_init/            the student before training (HF folder and model card), for comparison
      student/                 the final student (HF folder and model card, README.md)
      summary.json             written last, when the run finishes

A checkpoint is built in a hidden temporary folder and renamed into place, and ``latest`` is
replaced atomically after that, so ``latest`` only ever names a complete checkpoint. Its
``manifest.json`` (written last) holds the size and SHA-256 of every other file, so that a
resume can tell a checkpoint damaged later (a truncated file, a lost file, a disk error)
from an intact one and fall back to the newest intact checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import dist
from ..atomic import build_dir_atomic, nearest_existing, remove_leftovers, write_text_atomic
from ..config import RunConfig
from ..errors import LmdistillError
from ..models.save import save_model

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

KEEP_CHECKPOINTS = 2
MANIFEST = "manifest.json"


class RunDirError(LmdistillError):
    """A run directory that cannot be used as asked; the message names the fix."""


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

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

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
        write_manifest(tmp)

    with writing(run.checkpoints / name, f"checkpoint {name}", run):
        final = build_dir_atomic(run.checkpoints / name, build)
        write_text_atomic(run.checkpoints / "latest", name + "\n")
    for old in complete_checkpoints(run)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run: RunDir) -> list[Path]:
    """Finished checkpoint folders, oldest first (by step number, not by name)."""
    found = [p for p in run.checkpoints.glob("step_*") if (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_", 1)[1]))


def write_manifest(folder: Path) -> None:
    """``manifest.json``: size and SHA-256 of every file below ``folder``."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a file missing, truncated or changed), or None.

    Checkpoints written before manifests existed are checked for their files only."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        needed = ["trainer_state.pt", "student/config.json"]
        missing = [n for n in needed if not (checkpoint / n).is_file()]
        return f"{checkpoint / missing[0]} is missing" if missing else None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest} is unreadable"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size:,} bytes, {expected['size']:,} were written"
        if file_digest(path) != expected["sha256"]:
            return f"{path} differs from what was written (SHA-256 mismatch)"
    return None


def resume_checkpoint(run: RunDir, log=print) -> Path | None:
    """The newest checkpoint that is intact, saying which damaged ones were passed over."""
    candidates = complete_checkpoints(run)
    pointed = run.latest_checkpoint()
    if pointed is not None and pointed in candidates:  # `latest` first, then by step, newest first
        candidates.remove(pointed)
        candidates.append(pointed)
    for checkpoint in reversed(candidates):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        log(f"[lmdistill] checkpoint {checkpoint.name} is damaged ({problem}); trying an older one")
    return None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    # weights_only=False: the state holds numpy RNG tuples and plain dicts written by us.
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)


def append_metrics(run: RunDir, row: dict[str, Any]) -> None:
    with writing(run.metrics, "metrics", run), open(run.metrics, "a") as fh:
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
    with writing(run.metrics, "metrics", run):
        write_text_atomic(run.metrics, "".join(json.dumps(r) + "\n" for r in rows))


@contextlib.contextmanager
def writing(path: Path, what: str, run: RunDir) -> Iterator[None]:
    """Turn an OS error while writing ``path`` (disk full, permissions, a file gone) into a
    :class:`RunDirError` that names the path and says how to go on."""
    try:
        yield
    except OSError as err:
        reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
        latest = run.latest_checkpoint()
        kept = f"the last checkpoint ({latest.name}) is intact" if latest is not None else "no checkpoint was written yet"
        raise RunDirError(f"cannot write the {what} under {path}: {reason}; {kept}. Free space (or fix the "
                          f"permissions) and continue with lmdistill distill --resume {run.root}") from err


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``.

    The kernel releases the lock when the process dies, so a run killed with SIGKILL never
    leaves a stale lock; the file itself stays (removing it would let two processes lock
    two different files of the same name). It holds the owner's process id and host, which
    a refused second process names.
    """

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            self.held = True
            return
        path = self.run.lock_file
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"{self.run.root} is in use by a running lmdistill process ({owner}); wait for it to finish or stop "
                f"it (Ctrl-C checkpoints it), or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd, self.held = fd, True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
        self._fd, self.held = None, False


def remove_run_leftovers(run: RunDir) -> list[str]:
    """Temporary files and folders of writes killed midway (run root and checkpoints); call
    only under the run's lock."""
    return remove_leftovers(run.root) + remove_leftovers(run.checkpoints)


SHARED_RUN_DIR = ("under torchrun every process reads RUN_DIR (only rank 0 writes it): on several nodes, put it on a "
                  "file system that all of them mount")


def check_run_dir(run: RunDir, config: RunConfig | None, resume: bool) -> None:
    """Refuse to mix two runs in one directory (checked before any model loads)."""
    if run.root.exists() and not run.root.is_dir():
        raise RunDirError(f"{run.root} is a file, not a run directory; choose another --out")
    if resume:
        if not run.config.is_file():
            hint = f" ({SHARED_RUN_DIR})" if dist.launched_by_torchrun() else ""
            raise RunDirError(f"{run.root} holds no run to resume (no config.yaml); start one with --out {run.root}{hint}")
        return
    assert config is not None
    if run.config.is_file():
        same = run.config.read_text() == config.to_yaml()
        what = "this run already" if same else "a different run"
        raise RunDirError(
            f"{run.root} holds {what}; continue it with `lmdistill distill --resume {run.root}` "
            f"or choose another --out"
        )
    if run.root.exists() and any(p != run.lock_file for p in run.root.iterdir()):
        raise RunDirError(f"{run.root} exists and is not empty; choose another --out")
    parent = nearest_existing(run.root)
    if not os.access(parent, os.W_OK):
        raise RunDirError(f"cannot write under {parent}; choose an --out you can write to")


def remove_failed_start(run: RunDir, made: Path | None) -> None:
    """Undo a new run that failed before its first step: the folders it created, or what it
    wrote into the (then empty) folder it was given."""
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for entry in run.root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def make_folder(path: Path) -> Path | None:
    """Create ``path`` and its missing parents; return the topmost folder created (None if none)."""
    existing = nearest_existing(path)
    top = None if existing == path else path.relative_to(existing).parts[0]
    path.mkdir(parents=True, exist_ok=True)
    return None if top is None else existing / top

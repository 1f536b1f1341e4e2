"""``run_training``: a run from its folder's point of view (lock, checks, a failed start undone)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import dist
from ..config import RunConfig
from ..recipe import load_config
from .loop import Progress, train
from .rundir import RunDir, RunLock, check_run_dir, make_folder, remove_failed_start, remove_run_leftovers
from .setup import Setup


def run_training(config: RunConfig | None, out_dir: Path, resume: bool = False, stop_at_step: int | None = None,
                 progress: bool = True, setup: Setup | None = None) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) the run in ``out_dir``; returns a summary.

    ``config`` is None when resuming (the run's own config.yaml is used). ``stop_at_step``
    ends the run early after that step with a checkpoint, as Ctrl-C would. ``setup`` passes
    already-loaded models (new runs in one process only).

    Launched by torchrun, every process calls this: it joins the process group, trains its
    share of each batch, and rank 0 alone prints, logs and writes the run directory (the
    others wait for it at barriers); every rank reads the checkpoint on resume.
    """
    run = RunDir(Path(out_dir))
    ranks = dist.from_environment()
    if resume and setup is not None:
        raise ValueError("a resumed run loads its student from the checkpoint; do not pass setup")
    lock = RunLock(run) if ranks.is_main else None  # rank 0 alone writes the run directory
    made, done = None, Progress()
    new_start = False  # True once this process holds the folder, checked new or empty, for a new run
    with dist.quiet_unless_main(ranks):
        try:
            if lock is not None and (run.config.is_file() or run.lock_file.is_file()):
                lock.acquire()  # a live run in the folder is named before anything else is said of it
            check_run_dir(run, config, resume)
            if lock is not None and not lock.held:
                made = make_folder(run.root)
                lock.acquire()
                check_run_dir(run, config, resume)  # again: a run may have started and ended there meanwhile
            new_start = lock is not None and lock.held and not resume
            summary = _resume_or_train(run, config, resume, stop_at_step, progress, setup, ranks, done)
        except BaseException:
            if new_start and done.step == 0:  # a start that failed leaves nothing behind
                remove_failed_start(run, made)
            raise
        finally:
            if lock is not None:
                lock.release()
    return summary


def _resume_or_train(run: RunDir, config: RunConfig | None, resume: bool, stop_at_step: int | None, progress: bool,
                     setup: Setup | None, ranks: dist.DistInfo, done: Progress) -> dict[str, Any]:
    if resume:
        config = load_config(run.config)
        if (run.root / "summary.json").is_file():
            print(f"[lmdistill] {run.root} already finished; nothing to resume")
            return json.loads((run.root / "summary.json").read_text())
        if ranks.is_main:
            removed = remove_run_leftovers(run)
            if removed:
                print(f"[lmdistill] removed what an interrupted write left: {', '.join(removed)}")
    assert config is not None
    ranks, created = dist.init(config.train.device)
    if setup is not None and ranks.enabled:
        raise ValueError("setup can only be passed in a single process; under torchrun each rank builds its own")
    summary = train(run, config, resume, stop_at_step, progress, setup, ranks, done)
    dist.shutdown(ranks, created)
    return summary

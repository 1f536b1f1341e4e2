"""Reading a run directory for the report: result files, metrics rows, the run's state."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..loss.divergences import LOGIT_TERMS, TERM_NAMES
from ..markdown import finite
from ..train.rundir import RunDir

IN_PROGRESS_SECONDS = 300  # metrics written more recently than this: the run is probably still going
THROUGHPUT_WINDOW = 50  # steps over which the report's tokens/s is measured
LOSS_TERMS = TERM_NAMES  # every name a loss term is logged under (the logit term's: its divergence's)


def term_weight(term: str, loss_config: dict[str, Any]) -> Any:
    """The recipe's weight of a logged term (the logit term's, whatever its divergence, is loss.kl)."""
    return loss_config.get("kl" if term in LOGIT_TERMS else term)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def split_rows(rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows (with ``loss``) and validation rows (with ``val_ppl``), each sorted by step,
    one per step (the last one logged wins, as after a resume that re-did steps)."""
    train: dict[int, dict[str, Any]] = {}
    val: dict[int, dict[str, Any]] = {}
    for row in rows:
        if not isinstance(row, dict) or not finite(row.get("step")):
            continue
        if "loss" in row:
            train[int(row["step"])] = row
        elif "val_ppl" in row:
            val[int(row["step"])] = row
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def run_status(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """What state the run is in: ``finished``, ``in progress`` or ``interrupted``.

    A run is finished when ``summary.json`` says so. Otherwise it is "in progress" when
    ``metrics.jsonl`` was written in the last ``IN_PROGRESS_SECONDS`` (a guess: nothing
    records whether the training process is alive) and "interrupted" when not.
    """
    run = RunDir(Path(run_dir))
    summary = read_json(run.root / "summary.json")
    if summary is not None and summary.get("finished", True):
        return {"state": "finished", "summary": summary}
    now = time.time() if now is None else now
    age = now - run.metrics.stat().st_mtime if run.metrics.is_file() else None
    state = "in progress" if age is not None and age < IN_PROGRESS_SECONDS else "interrupted"
    return {"state": state, "summary": summary, "metrics_age_s": age, "checkpoint": run.latest_checkpoint()}


def throughput(train: list[dict[str, Any]], window: int = THROUGHPUT_WINDOW) -> tuple[float, int] | None:
    """Tokens per second over the last ``window`` steps: tokens / time (not a mean of rates)."""
    tokens = seconds = 0.0
    counted = 0
    for i in range(len(train) - 1, -1, -1):
        if counted >= window:
            break
        row = train[i]
        prev = train[i - 1].get("tokens_seen", 0) if i > 0 else 0
        step_tokens = row.get("tokens_seen", 0) - prev if finite(row.get("tokens_seen")) and finite(prev) else None
        rate = row.get("tokens_per_s")
        if not finite(step_tokens) or step_tokens <= 0 or not finite(rate) or rate <= 0:
            continue
        tokens += step_tokens
        seconds += step_tokens / rate
        counted += 1
    return (tokens / seconds, counted) if seconds > 0 else None

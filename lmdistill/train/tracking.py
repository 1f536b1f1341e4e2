"""Where a run's metrics go: ``metrics.jsonl`` always, TensorBoard too with ``train.log_to``.

``metrics.jsonl`` is what resume, the report and the benchmarks read, so it is always written;
TensorBoard (``RUN/tensorboard/``) gets the same numbers as scalars (``train/<name>`` for a
step's row, ``val/<name>`` for a validation row, at the row's step) and the run config as text.
A resumed run drops the events after its checkpoint's step (``purge_step``), as it drops those
rows of ``metrics.jsonl``, so that the steps trained again are not shown twice.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import ConfigError, RunConfig
from .rundir import RunDir, append_metrics

TENSORBOARD_DIR = "tensorboard"
# Row keys that locate a row rather than measure something.
POSITION_KEYS = ("step",)


def check_tracking(config: RunConfig) -> None:
    """Refuse ``train.log_to`` targets whose package is missing, before any model loads."""
    if "tensorboard" in config.train.log_to:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as err:
            raise ConfigError("config value train.log_to: tensorboard needs the tensorboard package; install it "
                              "with pip install tensorboard (or pip install 'lmdistill[tensorboard]'), or leave "
                              "tensorboard out of train.log_to") from err


class Tracker:
    """The run's metric sinks (rank 0 only); ``resume_step``: the step a resumed run continues from."""

    def __init__(self, run: RunDir, config: RunConfig, resume_step: int | None = None) -> None:
        self.run = run
        self.writer = None
        if "tensorboard" in config.train.log_to:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(log_dir=str(run.root / TENSORBOARD_DIR), purge_step=purge, flush_secs=30)
            if resume_step is None:
                self.writer.add_text("config", "```yaml\n" + config.to_yaml() + "```", global_step=0)

    def log(self, row: dict[str, Any]) -> None:
        """One row of metrics: appended to metrics.jsonl, and written as TensorBoard scalars."""
        append_metrics(self.run, row)
        if self.writer is None:
            return
        group = "val" if any(key.startswith("val_") for key in row) else "train"
        for key, value in row.items():
            if key in POSITION_KEYS or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self.writer.add_scalar(f"{group}/{key.removeprefix('val_')}", value, global_step=row["step"])
        if group == "val":
            self.writer.flush()  # validation rows are rare; a killed run keeps them

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

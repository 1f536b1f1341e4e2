"""train.log_to: TensorBoard gets the numbers of metrics.jsonl, the config, and a resumed run's
steps once."""

from __future__ import annotations

import math

import pytest

from lmdistill.config import ConfigError
from lmdistill.recipe import load_config
from lmdistill.train.rundir import read_metrics
from lmdistill.train.run import run_training
from lmdistill.train.tracking import TENSORBOARD_DIR, check_tracking

from .helpers import tiny_run_overrides

accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(folder):
    events = accumulator.EventAccumulator(str(folder), size_guidance={accumulator.SCALARS: 0, accumulator.TENSORS: 0})
    events.Reload()
    return events


def scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def setting(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("tracking")
    _, _, base = tiny_run_overrides(root, gpt2_tokenizer, teacher_layers=2)
    return root, [*base, "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2",
                  "train.log_to=[jsonl,tensorboard]"]


def test_tensorboard_holds_the_metrics_rows_and_the_config(setting):
    root, overrides = setting
    run = root / "run"
    run_training(load_config(None, overrides), run, progress=False)
    rows = read_metrics(run / "metrics.jsonl")
    events = read_events(run / TENSORBOARD_DIR)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_ppl" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and [r["step"] for r in val_rows] == [0, 2, 4]
    for key in ("loss", "kl", "ce", "cos", "lr", "grad_norm", "tokens_per_s"):
        logged = scalars(events, f"train/{key}")
        assert [s for s, _ in logged] == [r["step"] for r in train_rows]
        # TensorBoard stores float32: equal to the row's value to float32's precision.
        assert all(math.isclose(v, r[key], rel_tol=1e-6, abs_tol=1e-12) for (_, v), r in zip(logged, train_rows))
    ppl = scalars(events, "val/ppl")
    assert [s for s, _ in ppl] == [0, 2, 4]
    assert all(math.isclose(v, r["val_ppl"], rel_tol=1e-6) for (_, v), r in zip(ppl, val_rows))
    (config_text,) = events.Tensors("config/text_summary")
    assert b"max_steps: 4" in config_text.tensor_proto.string_val[0]


def test_a_resumed_run_shows_each_step_once(setting):
    root, overrides = setting
    run = root / "resumed"
    assert run_training(load_config(None, overrides), run, stop_at_step=3, progress=False)["finished"] is False
    # Steps 1-3 are logged, the checkpoint is at step 2 (checkpoint_every) and 3 (the stop): drop the last
    # one so that the resumed run trains step 3 again.
    import shutil
    shutil.rmtree(run / "checkpoints" / "step_000003")
    assert run_training(None, run, resume=True, progress=False)["finished"] is True
    events = read_events(run / TENSORBOARD_DIR)
    steps = [s for s, _ in scalars(events, "train/loss")]
    assert steps == [1, 2, 3, 4]
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert all(math.isclose(v, r["loss"], rel_tol=1e-6) for (_, v), r in zip(scalars(events, "train/loss"), rows))


def test_tensorboard_without_its_package_is_refused_before_training(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    config = load_config(None, ["train.log_to=[jsonl,tensorboard]", "train.max_steps=1"])
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        check_tracking(config)
    check_tracking(load_config(None, ["train.log_to=[jsonl]", "train.max_steps=1"]))  # jsonl alone needs nothing

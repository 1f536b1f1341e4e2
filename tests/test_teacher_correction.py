"""Teacher correction (model.teacher_correction_tokens): the teacher fine-tuned on the training
split first, cached, then cutting the student and giving the soft targets; on tiny GPT-2s with
the real GPT-2 tokenizer and real text."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lmdistill.train.correct as correct
from lmdistill.config import ConfigError
from lmdistill.recipe import load_config
from lmdistill.data.prepare import prepare
from lmdistill.models.load import load_model
from lmdistill.report.write import write_report
from lmdistill.models.fingerprint import tokenizer_fingerprint
from lmdistill.teacher_cache.build import build_teacher_cache
from lmdistill.teacher_cache.format import TeacherCacheError
from lmdistill.train.plan import plan_run
from lmdistill.train.rundir import read_metrics
from lmdistill.train.run import run_training

from .helpers import save_with_tokenizer, small_text_file, tiny_gpt2

STEPS = 24  # correction steps of 4 x 32 tokens


@pytest.fixture(scope="module")
def ws(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("correct")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMDISTILL_CACHE", str(root / "cache"))  # the corrected teachers go here
        teacher = save_with_tokenizer(tiny_gpt2(n_layer=4, seed=0), gpt2_tokenizer, root / "teacher")
        yield {"root": root, "text": small_text_file(root), "teacher": teacher, "data": root / "data",
               "tokenizer": gpt2_tokenizer}


def make_config(ws, *extra: str):
    return load_config(None, [
        f"model.teacher={ws['teacher']}", "model.layers=[0,3]", f"model.teacher_correction_tokens={STEPS * 4 * 32}",
        "model.teacher_correction_lr=1e-2",
        f"data.sources=[{ws['text']}]", f"data.prepared_dir={ws['data']}", "data.block_size=32",
        "train.batch_size=4", "train.lr=1e-3", "train.max_steps=4", "train.eval_every=0", "train.checkpoint_every=0",
        "train.eval_tokens=256", "train.threads=1", *extra])


def corrected(ws, config):
    data = prepare(ws["tokenizer"], config.data.sources, ws["data"])
    return correct.corrected_teacher(load_model(ws["teacher"]), config, ws["tokenizer"], data), data


def val_loss(model, data, config) -> float:
    settings = correct.CorrectionSettings.from_config(config)
    return correct.validation_loss(model, data.tokens("validation"), settings, config.train.eval_tokens,
                                   torch.device("cpu"))[0]


@pytest.fixture(scope="module")
def first_correction(ws, one_thread):
    config = make_config(ws)
    model, data = corrected(ws, config)
    return config, model, data


def test_correction_lowers_the_teachers_validation_loss(ws, first_correction):
    config, model, data = first_correction
    original = load_model(ws["teacher"])
    before, after = val_loss(original, data, config), val_loss(model, data, config)
    # A random tiny GPT-2 (loss ~ln 50257) trained 24 steps on the same text: far more than noise.
    assert after < before - 0.5, (before, after)
    record = getattr(model.config, correct.RECORD_KEY)
    assert record["steps"] == STEPS and record["tokens"] == STEPS * 4 * 32
    assert record["val_ppl_before"] == pytest.approx(torch.tensor(before).exp().item(), rel=1e-5)
    assert record["val_ppl_after"] == pytest.approx(torch.tensor(after).exp().item(), rel=1e-5)
    folder = Path(record["path"])
    assert folder.parent == ws["root"] / "cache" / "corrected_teachers"
    assert json.loads((folder / "config.json").read_text())[correct.RECORD_KEY] == record
    assert (folder / "tokenizer.json").is_file()  # a normal HF folder, usable as model.teacher


def test_second_call_reuses_the_cached_teacher(ws, first_correction, monkeypatch, capsys):
    config, model, _ = first_correction
    monkeypatch.setattr(correct, "correct_teacher", lambda *a, **k: pytest.fail("trained again"))
    again, _ = corrected(ws, config)
    assert "reusing the corrected teacher" in capsys.readouterr().out
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_key_follows_teacher_data_and_settings():
    settings = correct.CorrectionSettings(tokens=1024, lr=1e-4, block_size=32, batch_size=4, seed=0)
    base = correct.corrected_folder("t", "d", settings)
    others = [correct.corrected_folder("t2", "d", settings), correct.corrected_folder("t", "d2", settings),
              *(correct.corrected_folder("t", "d", replace(settings, **change))
                for change in ({"tokens": 2048}, {"lr": 2e-4}, {"block_size": 64}, {"batch_size": 8}, {"seed": 1}))]
    assert base == correct.corrected_folder("t", "d", settings)
    assert len({base, *others}) == len(others) + 1


def test_distill_cuts_the_student_from_the_corrected_teacher_and_resumes_with_it(ws, first_correction, tmp_path,
                                                                                  monkeypatch):
    config, fixed, _ = first_correction
    full = run_training(config, tmp_path / "full", progress=False)
    assert full["finished"]
    init = load_model(tmp_path / "full" / "student_init").state_dict()
    teacher, original = fixed.state_dict(), load_model(ws["teacher"]).state_dict()
    # Student layers 0 and 1 are teacher layers 0 and 3 (model.layers=[0,3]); the rest is shared.
    for name, value in init.items():
        source = name.replace("h.1.", "h.3.")
        assert torch.equal(value, teacher[source]), name
    assert not torch.equal(init["transformer.wte.weight"], original["transformer.wte.weight"])
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    trained = load_model(tmp_path / "full" / "student").state_dict()
    assert not torch.equal(trained["transformer.h.0.mlp.c_fc.weight"], init["transformer.h.0.mlp.c_fc.weight"])

    # Interrupted after 2 steps, then resumed: the cached corrected teacher again (never
    # retrained), so the same losses as the uninterrupted run (same process, same ops).
    part = tmp_path / "part"
    run_training(config, part, stop_at_step=2, progress=False)
    monkeypatch.setattr(correct, "correct_teacher", lambda *a, **k: pytest.fail("trained again"))
    resumed = run_training(None, part, resume=True, progress=False)
    assert resumed["finished"] and resumed["step"] == 4
    assert {r["step"]: r["loss"] for r in read_metrics(part / "metrics.jsonl") if "loss" in r} == losses

    report = write_report(tmp_path / "full").read_text()
    record = getattr(fixed.config, correct.RECORD_KEY)
    assert "## Teacher correction" in report
    assert f"| original | {record['val_ppl_before']:,.2f} |" in report
    assert f"| corrected | {record['val_ppl_after']:,.2f} |" in report


def test_a_cache_of_the_uncorrected_teacher_is_refused_for_the_corrected_one(ws, first_correction):
    _, fixed, _ = first_correction
    # A few blocks of data are enough: planning checks the cache's header, not its data.
    splits = ws["root"] / "splits"
    splits.mkdir()
    text = ws["text"].read_text()
    for i, split in enumerate(("train", "validation", "test")):
        (splits / f"{split}.txt").write_text(text[i * 2000:(i + 1) * 2000])
    data = prepare(ws["tokenizer"], [str(splits)], ws["root"] / "splits_data")
    cache = ws["root"] / "uncorrected_cache"
    build_teacher_cache(load_model(ws["teacher"]), data, cache, top_k=4, temperatures=[2.0], block_size=32,
                        tokenizer_fingerprint=tokenizer_fingerprint(ws["tokenizer"]), progress=False)
    folder = getattr(fixed.config, correct.RECORD_KEY)["path"]
    # The corrected teacher's config.json records the correction, so even its config differs.
    with pytest.raises(TeacherCacheError, match=r"built from another teacher \(config fingerprint"):
        plan_run(make_config(ws, f"model.teacher={folder}", f"model.teacher_cache={cache}",
                             "model.teacher_correction_tokens=0", "loss.cos=0"))


@pytest.mark.parametrize("override, field", [
    ("model.teacher_correction_tokens=-1", "model.teacher_correction_tokens"),
    ("model.teacher_correction_tokens=1.5", "model.teacher_correction_tokens"),
    ("model.teacher_correction_lr=0", "model.teacher_correction_lr"),
    ("model.teacher_correction_lr=1e-50", "model.teacher_correction_lr"),
    ("model.teacher_cache=/some/cache", "model.teacher_correction_tokens"),
])
def test_bad_values_are_one_line_config_errors(override, field):
    base = ["model.teacher_correction_tokens=1000", "loss.cos=0", "train.max_steps=1"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, override])
    message = str(err.value)
    assert f"config value {field}:" in message and "\n" not in message


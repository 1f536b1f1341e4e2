"""The demo pipeline end to end on a tiny GPT-2-shaped teacher (the real one is run by `make demo`)."""

from __future__ import annotations

import json

from lmdistill.demo import run_demo

from .helpers import save_with_tokenizer, small_text_file, tiny_gpt2


def test_demo_pipeline_on_a_tiny_teacher(tmp_path, gpt2_tokenizer, capsys):
    teacher = save_with_tokenizer(tiny_gpt2(n_layer=4, seed=0), gpt2_tokenizer, tmp_path / "teacher")
    text = small_text_file(tmp_path)
    out = tmp_path / "demo"
    results = run_demo(out, eval_tokens=300, overrides=[
        f"model.teacher={teacher}", "model.num_layers=2", f"data.sources=[{text}]",
        f"data.prepared_dir={tmp_path / 'data'}", "data.block_size=32", "train.max_minutes=null",
        "train.max_steps=12", "train.lr=3e-3", "train.eval_every=0", "train.checkpoint_every=0",
        "train.eval_tokens=256", "train.threads=1", "train.warmup=0.2",
    ])
    printed = capsys.readouterr().out
    models = results["models"]
    assert list(models) == ["teacher", "student (initialised)", "student (distilled)"]
    assert models["student (distilled)"]["parameters"]["total"] < models["teacher"]["parameters"]["total"]
    for row in models.values():
        assert set(row["perplexity"]) == {"corpus:austen", "corpus:moby_dick", "corpus:sotu"}
        # 300 tokens in windows of the tiny model's 128-token context: 300 - ceil(300/128) scored.
        assert all(n == 297 for n in row["tokens_scored"].values())
        assert row["generation"]["new_tokens"] == 64 and row["generation"]["tokens_per_second"] > 0
    # Distillation moves the student: its perplexities differ from the initialised copy's.
    assert models["student (distilled)"]["perplexity"] != models["student (initialised)"]["perplexity"]
    report = (out / "report.md").read_text()
    assert "| teacher |" in report and "windows of 128 tokens" in report and "12 steps" in report
    assert json.loads((out / "results.json").read_text())["train"]["step"] == 12
    assert "| student (distilled) |" in printed
    assert len(results["samples"]["teacher"]) == 3

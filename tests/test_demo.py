"""The demo pipeline end to end on a tiny GPT-2-shaped teacher (the real one is run by `make demo`)."""

from __future__ import annotations

import json

import yaml

from lmdistill import demo
from lmdistill.demo import NEW_TOKENS, choose_precision, precision_name, run_demo
from lmdistill.models.device import cpu_computes_bf16
from lmdistill.recipe import load_config
from lmdistill.measure import speed

from .helpers import save_with_tokenizer, small_text_file, tiny_gpt2

LABELS = ["teacher", "student (initialised)", "student (distilled)"]


def test_demo_pipeline_on_a_tiny_teacher(tmp_path, gpt2_tokenizer, capsys, monkeypatch):
    timed = []  # every run of the one timing loop: (layers, new tokens)
    original = speed.time_generation

    def recording(model, prompt_ids, new_tokens, clock):
        timed.append((model.config.n_layer, new_tokens))
        return original(model, prompt_ids, new_tokens, clock)

    monkeypatch.setattr(speed, "time_generation", recording)
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
    assert (results["kind"], results["version"]) == ("demo", 2)
    assert list(results["models"]) == LABELS and results["models"]["teacher"] == str(teacher)
    assert [t["label"] for t in results["eval"]["tasks"]] == ["ppl austen", "ppl moby_dick", "ppl sotu"]
    rows = {row["model"]: row["tasks"] for row in results["eval"]["models"]}
    assert list(rows) == LABELS
    for tasks in rows.values():
        # 300 tokens in windows of the tiny model's 128-token context: 300 - ceil(300/128) scored.
        assert all(task["tokens_scored"] == 297 for task in tasks.values())
    # Distillation moves the student: its perplexities differ from the initialised copy's.
    assert rows["student (distilled)"] != rows["student (initialised)"]

    # Speed: the one timing loop, on all three models interleaved after one warm-up each.
    assert timed == [(4, NEW_TOKENS), (2, NEW_TOKENS), (2, NEW_TOKENS)] * (speed.WARMUP + speed.REPEATS)
    bench = {m["model"]: m for m in results["bench"]["models"]}
    assert list(bench) == LABELS and f"{NEW_TOKENS} single-token forwards" in results["bench"]["protocol"]
    assert bench["student (distilled)"]["parameters"]["total"] < bench["teacher"]["parameters"]["total"]
    assert all(m["generation"]["tokens_per_second"] > 0 for m in bench.values())
    assert bench["teacher"]["speedup"]["generation"] == 1.0

    report = (out / "report.md").read_text()
    assert "| teacher |" in report and "windows of 128 tokens" in report and "12 steps" in report
    assert results["bench"]["protocol"] in report and "## Sample continuations" in report
    assert json.loads((out / "results.json").read_text()) == results
    assert "| student (distilled) |" in printed and results["bench"]["protocol"] in printed
    assert len(results["samples"]["teacher"]) == 3
    # Under bf16 autocast where this CPU computes bf16 natively, float32 elsewhere; said in the log and the report.
    native = cpu_computes_bf16()
    assert results["precision"] == ("bf16 autocast (this CPU computes bf16 natively), float32 master weights"
                                    if native else "float32")
    assert f"threads, {results['precision']}" in printed and f"; {results['precision']})." in printed

    # The student's model card holds the demo's measured perplexities, ratios and speed-up.
    card = (out / "student" / "README.md").read_text()
    meta = yaml.safe_load(card[4:].split("\n---\n", 1)[0])
    assert meta["library_name"] == "transformers" and "distillation" in meta["tags"]
    scored = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]}
    distilled, teacher_row = rows["student (distilled)"], rows["teacher"]
    assert scored == {label: round(distilled[label]["perplexity"], 4) for label in distilled}
    for label in distilled:
        ratio = distilled[label]["perplexity"] / teacher_row[label]["perplexity"]
        assert f"{label.removeprefix('ppl ')} {ratio:.2f}x" in card
    speedup = bench["student (distilled)"]["speedup"]["generation"]
    assert f"({speedup:.2f}x)" in card and "12 steps" in card and "```bash\nlmdistill demo\n```" in card


def test_demo_trains_under_bf16_only_on_a_cpu_that_computes_it(monkeypatch):
    for native, explicit, want in [(True, [], "bf16"), (False, [], "auto"), (True, ["train.precision=fp32"], "fp32")]:
        monkeypatch.setattr(demo, "cpu_computes_bf16", lambda: native)
        config = load_config("smollm2-demo", ["train.device=cpu", *explicit])
        choose_precision(config)
        assert config.train.precision == want
    assert precision_name(config) == "float32"

"""benchmarks/quality_budget.py end to end on a tiny teacher: curve points, resume segments, table, plot."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from lmdistill.evaluate.perplexity import PerplexityProtocol, perplexity
from lmdistill.data.corpora import corpus_documents
from lmdistill.data.prepare import tokenize_documents
from lmdistill.models.load import load_tokenizer

from .helpers import load_benchmark, save_with_tokenizer, small_text_file, tiny_gpt2

def test_grid_on_a_tiny_teacher(tmp_path, gpt2_tokenizer, one_thread):
    qb = load_benchmark("quality_budget")
    teacher = save_with_tokenizer(tiny_gpt2(n_layer=4), gpt2_tokenizer, tmp_path / "teacher")
    text = small_text_file(tmp_path)
    base = [f"model.teacher={teacher}", "model.num_layers=2", f"data.sources=[{text}]",
            f"data.prepared_dir={tmp_path / 'data'}", "data.block_size=32", "train.batch_size=2",
            "model.calibration_tokens=64"]
    qb.WINDOW = 64
    out = tmp_path / "grid"
    results = qb.run_grid(out, ["importance-kd", "importance-ce"], tokens=300, points=3, eval_tokens=256,
                          base_overrides=base, corpora=["austen"])
    kd = results["variants"]["importance-kd"]
    assert [p["step"] for p in kd["curve"]] == [0, 2, 4]  # 300 tokens at 64 per step: 4 whole steps
    assert [p["tokens_seen"] for p in kd["curve"]] == [0, 128, 256]
    assert kd["layer_choice_cuts"] and set(kd["layer_choice_cuts"]) == {"every-other", "uniform", "importance"}
    # The last point is the finished student, scored under the stated protocol.
    tokens = tokenize_documents(load_tokenizer(teacher), [d.text for d in corpus_documents("austen", "test")])
    protocol = PerplexityProtocol(window=64, max_tokens=256, batch_size=4)
    student = AutoModelForCausalLM.from_pretrained(out / "importance-kd" / "student")
    assert kd["curve"][-1]["perplexity"]["austen"] == pytest.approx(perplexity(student, tokens, protocol).perplexity, rel=1e-6)
    # Both variants start from the same student; CE-only trains without the teacher's terms.
    ce = results["variants"]["importance-ce"]
    assert ce["curve"][0]["perplexity"] == kd["curve"][0]["perplexity"]
    assert ce["curve"][-1]["perplexity"] != kd["curve"][-1]["perplexity"]
    rows = [json.loads(line) for line in (out / "importance-ce" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" not in r for r in rows) and any("ce" in r for r in rows)
    table = (out / "quality_budget.md").read_text()
    assert "| importance-kd |" in table and "| teacher |" in table and "--variants importance-ce" in table
    assert (out / "quality_budget.png").stat().st_size > 1000
    again = qb.run_grid(out, ["importance-kd"], tokens=300, points=3, eval_tokens=256, base_overrides=base,
                        corpora=["austen"])
    assert again["variants"]["importance-kd"] == kd  # finished variants are not run again

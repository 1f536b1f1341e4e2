"""benchmarks/quality_budget.py end to end on a tiny teacher: token and minute budgets, curve
points, resume segments, variants from the registry and the command line, a failing variant,
leave-one-corpus-out, table, JSON and plot."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoModelForCausalLM

from lmdistill.data.corpora import corpus_documents
from lmdistill.data.prepare import tokenize_documents
from lmdistill.evaluate.perplexity import PerplexityProtocol, perplexity
from lmdistill.models.arch import count_parameters
from lmdistill.models.load import load_tokenizer

from .helpers import load_benchmark, save_with_tokenizer, small_text_file, tiny_gpt2


@pytest.fixture(scope="module")
def qb():
    module = load_benchmark("quality_budget")
    module.WINDOW = 64
    return module


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, gpt2_tokenizer):
    return save_with_tokenizer(tiny_gpt2(n_layer=4), gpt2_tokenizer, tmp_path_factory.mktemp("qb") / "teacher")


@pytest.fixture
def base(tmp_path, teacher):
    return [f"model.teacher={teacher}", "model.num_layers=2", f"data.sources=[{small_text_file(tmp_path)}]",
            f"data.prepared_dir={tmp_path / 'data'}", "data.block_size=32", "train.batch_size=2",
            "model.calibration_tokens=64"]


def test_perplexity_of(model_dir, corpus: str) -> float:
    """The student's test perplexity on ``corpus`` under the script's protocol, computed here."""
    tokens = tokenize_documents(load_tokenizer(model_dir), [d.text for d in corpus_documents(corpus, "test")])
    protocol = PerplexityProtocol(window=64, max_tokens=256, batch_size=4)
    return perplexity(AutoModelForCausalLM.from_pretrained(model_dir), tokens, protocol).perplexity


test_perplexity_of.__test__ = False  # a helper, not a test


def test_token_budget_grid(qb, base, tmp_path, teacher, one_thread):
    out = tmp_path / "grid"
    variants = qb.choose_variants(["importance-kd", "importance-ce"], [])
    results = qb.run_grid(out, variants, qb.RunBudget(tokens=300), points=3, eval_tokens=256,
                          base_overrides=base, corpora=["austen"])
    kd = results["variants"]["importance-kd"]
    assert [p["step"] for p in kd["curve"]] == [0, 2, 4]  # 300 tokens at 64 per step: 4 whole steps
    assert [p["tokens_seen"] for p in kd["curve"]] == [0, 128, 256]
    assert kd["steps"] == 4 and kd["tokens_per_s"] == pytest.approx(256 / kd["train_seconds"], rel=0.01)
    assert kd["layer_choice_cuts"] and set(kd["layer_choice_cuts"]) == {"every-other", "uniform", "importance"}
    # The last point is the finished student, scored under the stated protocol; parameters are its own.
    student_dir = out / "importance-kd" / "student"
    assert kd["curve"][-1]["perplexity"]["austen"] == pytest.approx(test_perplexity_of(student_dir, "austen"), rel=1e-6)
    assert kd["parameters"] == count_parameters(AutoModelForCausalLM.from_pretrained(student_dir))
    assert results["teacher"]["parameters"] == count_parameters(AutoModelForCausalLM.from_pretrained(teacher))
    assert kd["parameters"] < results["teacher"]["parameters"]
    # Both variants start from the same student; CE-only trains without the teacher's terms.
    ce = results["variants"]["importance-ce"]
    assert ce["curve"][0]["perplexity"] == kd["curve"][0]["perplexity"]
    assert ce["curve"][-1]["perplexity"] != kd["curve"][-1]["perplexity"]
    rows = [json.loads(line) for line in (out / "importance-ce" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" not in r for r in rows) and any("ce" in r for r in rows)
    assert json.loads((out / "results.json").read_text()) == results
    table = (out / "quality_budget.md").read_text()
    assert f"| importance-kd | {variants['importance-kd'][0]} | {kd['parameters']:,} | 256 | 4 |" in table
    assert "| teacher |" in table and "Protocol: in-domain" in table
    assert "lmdistill distill --config smollm2-demo --out runs/importance-ce" in table
    assert (out / "quality_budget.png").stat().st_size > 1000
    again = qb.run_grid(out, qb.choose_variants(["importance-kd"], []), qb.RunBudget(tokens=300), points=3,
                        eval_tokens=256, base_overrides=base, corpora=["austen"])
    assert again["variants"]["importance-kd"] == kd  # finished variants are not run again


def test_minutes_budget_ad_hoc_and_failing_variants(qb, base, tmp_path, one_thread, capsys):
    out = tmp_path / "minutes"
    variants = qb.choose_variants([], ["fast=train.lr=2e-3,model.strategy=first",
                                       "broken=loss.divergence=no_such_divergence"])
    results = qb.run_grid(out, variants, qb.RunBudget(minutes=0.02), eval_tokens=256, base_overrides=base,
                          corpora=["austen"], curve_every=8, with_plot=False)
    fast = results["variants"]["fast"]
    config = yaml.safe_load((out / "fast" / "config.yaml").read_text())
    assert config["train"]["max_minutes"] == 0.02 and config["train"]["max_tokens"] is None
    assert config["train"]["lr"] == 2e-3 and config["model"]["strategy"] == "first"
    # The run trained until its 1.2 s of step time were spent, scored every 8 steps and at the end.
    assert fast["train_seconds"] >= 1.2 and fast["steps"] >= 2
    steps = [p["step"] for p in fast["curve"]]
    assert steps == [*range(0, fast["steps"], 8), fast["steps"]] or steps == list(range(0, fast["steps"] + 1, 8))
    assert fast["tokens_seen"] == 64 * fast["steps"]
    assert fast["layers"] == [0, 1]  # strategy=first took effect
    # The failing variant is reported with its error, kept out of the table's rows, and retried on a rerun.
    broken = results["variants"]["broken"]
    assert "ConfigError" in broken["error"] and "loss.divergence" in broken["error"]
    printed = capsys.readouterr()
    assert "[broken] failed, skipped: ConfigError" in printed.out
    assert "Traceback" not in printed.err  # a bad setting is one line; only bugs print their traceback
    table = (out / "quality_budget.md").read_text()
    assert "| fast | ad hoc: train.lr=2e-3 model.strategy=first |" in table
    assert "| broken |" not in table and f"- broken: {broken['error']}" in table
    assert "Budget: 0.02 training minutes" in table and not (out / "quality_budget.png").exists()
    again = qb.run_grid(out, variants, qb.RunBudget(minutes=0.02), eval_tokens=256, base_overrides=base,
                        corpora=["austen"], curve_every=8, with_plot=False)
    printed = capsys.readouterr().out
    assert "[fast] already measured; skipped" in printed and "[broken] failed, skipped" in printed
    assert again["variants"]["fast"] == fast


def test_leave_one_corpus_out(qb, base, tmp_path, one_thread):
    out = tmp_path / "loco"
    results = qb.run_grid(out, qb.choose_variants(["importance-kd"], []), qb.RunBudget(tokens=128), points=2,
                          eval_tokens=256, base_overrides=base, corpora=["moby_dick", "austen"], holdouts=["austen"],
                          with_plot=False)
    assert results["protocol"]["name"] == "loco"
    (row,) = results["variants"].values()
    assert row["name"] == "importance-kd--holdout-austen" and row["holdout"] == "austen"
    # Trained on the other corpus only (the loco source overrides the base's text file), its own prepared data.
    config = yaml.safe_load((out / row["name"] / "config.yaml").read_text())
    assert config["data"]["sources"] == row["train_sources"] == ["corpus:moby_dick"]
    assert config["data"]["prepared_dir"] == f"{tmp_path / 'data'}/without-austen"
    student_dir = out / row["name"] / "student"
    held_out = test_perplexity_of(student_dir, "austen")
    assert row["curve"][-1]["perplexity"]["austen"] == pytest.approx(held_out, rel=1e-6)
    teacher = results["teacher"]["perplexity"]
    summary = qb.summarise(row, teacher)
    assert summary["held_out"] == pytest.approx(held_out / teacher["austen"], rel=1e-6)
    assert summary["in_domain_geomean"] == pytest.approx(row["curve"][-1]["perplexity"]["moby_dick"]
                                                          / teacher["moby_dick"], rel=1e-12)
    table = (out / "quality_budget.md").read_text()
    assert "Protocol: leave one corpus out" in table
    held_out_cells = f"| austen | {row['curve'][-1]['perplexity']['austen']:,.1f} | {summary['held_out']:.2f} |"
    assert held_out_cells + " moby_dick " in table
    assert "- importance-kd: " in table


def test_variant_arguments(qb):
    assert qb.parse_variant("a=data.sources=[corpus:austen,corpus:sotu],train.lr=1e-3") == (
        "a", ["data.sources=[corpus:austen,corpus:sotu]", "train.lr=1e-3"])
    for bad in ("noequals", "a=", "loss.kl=0"):
        with pytest.raises(SystemExit, match="must look like NAME="):
            qb.parse_variant(bad)
    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        qb.choose_variants(["nope"], [])
    with pytest.raises(SystemExit, match="already chosen"):
        qb.choose_variants(["t1"], ["t1=loss.temperature=1.0"])
    jobs = qb.make_jobs(qb.choose_variants(["t1"], []), ["austen", "sotu"], ["austen", "moby_dick", "sotu"], [])
    assert [(j.key, j.holdout, j.overrides[-1]) for j in jobs] == [
        ("t1--holdout-austen", "austen", "data.sources=[corpus:moby_dick,corpus:sotu]"),
        ("t1--holdout-sotu", "sotu", "data.sources=[corpus:austen,corpus:moby_dick]")]
    # A variant's own text beside the corpora (teacher-written, say) stays in its training set.
    variants = qb.choose_variants([], ["gen=data.sources=[corpus:all,/x/gen],train.lr=1e-3"])
    (job,) = qb.make_jobs(variants, ["sotu"], ["austen", "moby_dick", "sotu"], [])
    assert job.overrides[-1] == "data.sources=[corpus:austen,corpus:moby_dick,/x/gen]"


def test_shape_variants_keep_the_demo_students_parameters(qb):
    """The width and mixed variants of the registry are at about the depth-only student's size
    (SmolLM2-135M's dimensions, written out: no download; weights on the meta device)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def parameters(overrides: list[str]) -> int:
        fields = dict(o.removeprefix("model.").split("=") for o in overrides if o.startswith("model."))
        config = LlamaConfig(hidden_size=576, intermediate_size=int(fields.get("intermediate_size", 1536)),
                             num_hidden_layers=int(fields.get("num_layers", 15)),
                             num_attention_heads=int(fields.get("num_attention_heads", 9)),
                             num_key_value_heads=int(fields.get("num_key_value_heads", 3)), head_dim=64,
                             vocab_size=49152, tie_word_embeddings=True)
        with torch.device("meta"):
            return count_parameters(LlamaForCausalLM(config))

    depth = parameters(qb.VARIANTS["importance-kd"][1])
    assert depth == 81_413_568  # the demo student's 81.4M
    for name in ("width-mlp", "width-heads-mlp", "mixed-20", "mixed-24"):
        assert abs(parameters(qb.VARIANTS[name][1]) / depth - 1) < 0.002, name

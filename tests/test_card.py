"""Model cards: every student folder lmdistill writes carries a README.md the hub can read,
whose numbers are the run's and the evaluation's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lmdistill.cli import main
from lmdistill.recipe import load_config
from lmdistill.card import CARD_FILE, FACTS_FILE, CardFacts, card_name, front_matter, render_card
from lmdistill.train.run import run_training

from .helpers import tiny_run_overrides

REQUIRED = {"library_name": "transformers", "pipeline_tag": "text-generation"}


def split_card(text: str) -> tuple[dict, str]:
    """(front matter, body) of a card; the front matter must open the file, fenced by --- lines."""
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def check_hub_metadata(meta: dict) -> None:
    for key, value in REQUIRED.items():
        assert meta[key] == value
    assert {"distillation", "lmdistill"} <= set(meta["tags"])


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("card")
    teacher, text, base = tiny_run_overrides(root, gpt2_tokenizer)
    config = load_config(None, [*base, "train.max_steps=3"])
    summary = run_training(config, root / "run", progress=False)
    return {"root": root, "teacher": teacher, "text": text, "summary": summary, "run": root / "run"}


def test_a_distilled_students_card_holds_the_runs_numbers(distilled):
    student, summary = distilled["run"] / "student", distilled["summary"]
    meta, body = split_card((student / CARD_FILE).read_text())
    check_hub_metadata(meta)
    assert "base_model" not in meta  # a local teacher folder has no hub id
    assert "model-index" not in meta  # not scored yet
    facts = json.loads((student / FACTS_FILE).read_text())
    assert facts["training"]["tokens_seen"] == summary["tokens_seen"] == 3 * 2 * 32
    assert facts["training"]["steps"] == summary["step"] == 3
    assert facts["training"]["validation_perplexity"] == summary["val_ppl"]
    assert facts["layers"] == [0, 2] and facts["teacher_layers"] == 4 and facts["shape"]["layers"] == 2
    assert facts["student_parameters"] == summary["student_parameters"]
    assert facts["config"]["train"]["max_steps"] == 3
    assert f"{summary['tokens_seen']:,} tokens" in body and "2 decoder layers against the teacher's 4" in body
    assert body.startswith(f"\n# {distilled['run'].name}\n")  # a run's student is named after its run
    # The initialised student is cut, not distilled, and says so.
    _, init_body = split_card((distilled["run"] / "student_init" / CARD_FILE).read_text())
    assert "not yet distilled" in init_body
    assert json.loads((distilled["run"] / "student_init" / FACTS_FILE).read_text())["training"] is None


def test_eval_card_writes_the_scores_beside_the_teachers(distilled, capsys):
    student, teacher, text = distilled["run"] / "student", distilled["teacher"], distilled["text"]
    out = distilled["root"] / "eval.json"
    assert main(["eval", str(student), str(teacher), "--data", str(text), "--max-tokens", "256", "--window", "32",
                 "--json", str(out), "--card"]) == 0
    results = json.loads(out.read_text())
    rows = {row["model"]: row for row in results["models"]}
    label = results["tasks"][0]["label"]
    s_ppl = rows[str(student)]["tasks"][label]["perplexity"]
    t_ppl = rows[str(teacher)]["tasks"][label]["perplexity"]
    card = (student / CARD_FILE).read_text()
    meta, body = split_card(card)
    check_hub_metadata(meta)
    (entry,) = meta["model-index"]
    (result,) = entry["results"]
    assert result["metrics"][0]["type"] == "perplexity"
    assert math.isclose(result["metrics"][0]["value"], s_ppl, rel_tol=1e-6)
    assert result["dataset"]["split"] == "test"
    assert f"{s_ppl / t_ppl:.2f}x" in body
    assert "beside its teacher" in capsys.readouterr().out
    # The hub's own parser reads the metadata and the evaluation results.
    hub = pytest.importorskip("huggingface_hub")
    parsed = hub.ModelCard(card)
    assert math.isclose(parsed.data.eval_results[0].metric_value, s_ppl, rel_tol=1e-6)
    assert parsed.data.library_name == "transformers"


def test_eval_card_refuses_models_without_a_card(distilled, capsys):
    assert main(["eval", str(distilled["teacher"]), "--data", str(distilled["text"]), "--max-tokens", "64",
                 "--card"]) == 2
    err = capsys.readouterr().err
    assert FACTS_FILE in err and "ppl" not in capsys.readouterr().out  # refused before any scoring


def facts(**changes) -> CardFacts:
    base = dict(teacher="smollm2-135m", base_model="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0",
                teacher_parameters=134_515_008, teacher_layers=30, student_parameters=81_413_568,
                shape={"layers": 15, "hidden_size": 576}, layers=list(range(15)), initialisation="teacher layers",
                command="lmdistill demo")
    return CardFacts(**{**base, **changes})


def test_front_matter_names_the_hub_teacher_and_hub_datasets_only():
    card = facts(training={"sources": ["corpus:all", "hf:wikitext:wikitext-103-raw-v1", "/data/mine.txt"],
                           "tokens_seen": 1000, "data": "x"})
    meta = front_matter(card, "demo")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["wikitext"]
    meta, body = split_card(render_card(card, "demo"))
    assert "distilled with lmdistill" in body and "1,000 tokens of x" in body


def test_card_name_of_a_runs_students(tmp_path):
    assert card_name(tmp_path / "demo-1" / "student") == "demo-1"
    assert card_name(tmp_path / "demo-1" / "student_init") == "demo-1-init"
    assert card_name(tmp_path / "my-student") == "my-student"


def test_initialisation_says_where_the_weights_came_from():
    from types import SimpleNamespace

    from lmdistill.card import describe_initialisation

    cut = SimpleNamespace(lmdistill_teacher_layers=30, lmdistill_layer_map=[0, 1, 29],
                          lmdistill_layer_choice={"strategy": "importance", "calibration_tokens": 2048})
    assert describe_initialisation(cut) == "teacher layers [0, 1, 29], chosen by importance on 2,048 calibration tokens"
    assert describe_initialisation(cut, "students/s").startswith("`students/s`, cut by lmdistill: teacher layers [0, 1, 29]")
    assert describe_initialisation(SimpleNamespace(), "gpt2") == "the pretrained model `gpt2`"
    fresh = SimpleNamespace(lmdistill_teacher_layers=12, lmdistill_layer_map=None)
    assert describe_initialisation(fresh) == "random weights in the cut architecture"

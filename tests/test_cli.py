"""The ``lmdistill`` command, in-process: exit codes, messages, and the files each subcommand writes.

Error paths must exit 2 with one line ``lmdistill CMD: error: ...`` naming the fix, and no
traceback. Success paths run on tiny GPT-2-shaped models with the real GPT-2 tokenizer.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.train.rundir import read_metrics
from lmdistill.cli import main
from lmdistill.recipe import load_config
from lmdistill.models.arch import count_parameters

from .helpers import save_with_tokenizer, small_text_file, tiny_gpt2

REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc: int, err: str, command: str, *needles: str) -> str:
    """Exit 2, exactly one stderr line ``lmdistill COMMAND: error: ...`` holding every needle."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"lmdistill {command}: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture(scope="module")
def ws(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "text": small_text_file(root),
        "teacher": save_with_tokenizer(tiny_gpt2(n_layer=4, seed=0), gpt2_tokenizer, root / "teacher"),
        "student": save_with_tokenizer(tiny_gpt2(n_layer=2, seed=1), gpt2_tokenizer, root / "student"),
        "small_vocab": save_with_tokenizer(tiny_gpt2(n_layer=2, seed=2, vocab_size=300), gpt2_tokenizer,
                                           root / "small_vocab"),
    }


def write_recipe(ws, path: Path) -> Path:
    path.write_text(
        "model:\n"
        f"  teacher: {ws['teacher']}\n"
        "  num_layers: 2\n"
        "data:\n"
        f"  sources: [{ws['text']}]\n"
        f"  prepared_dir: {ws['root'] / 'prepared_for_distill'}\n"
        "  block_size: 32\n"
        "train:\n"
        "  max_steps: 2\n"
        "  eval_every: 0\n"
        "  checkpoint_every: 0\n"
        "  eval_tokens: 128\n"
    )
    return path


@pytest.fixture(scope="module")
def finished_run(ws):
    """One tiny distillation run through the CLI (2 steps), shared read-only by several tests."""
    recipe = write_recipe(ws, ws["root"] / "tiny.yaml")
    run_dir = ws["root"] / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["distill", "--config", str(recipe), "--out", str(run_dir)])
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "dir": run_dir, "recipe": recipe}


def training_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


# ---------------------------------------------------------------------------------------
# init-student


@pytest.mark.parametrize("teacher", [
    "no-such-model-lmdistill-test",
    "/nonexistent/lmdistill/test/model",
    "/nonexistent/lmdistill/model.gguf",
])
def test_init_student_unknown_teacher(capsys, tmp_path, teacher):
    rc, out, err = run_cli(capsys, "init-student", "--teacher", teacher, "--out", tmp_path / "s")
    line = assert_clean_error(rc, err, "init-student", teacher)
    assert "smollm2-135m" in line or "does not exist" in line
    assert not (tmp_path / "s").exists()


def test_init_student_layer_out_of_range(capsys, ws, tmp_path):
    rc, out, err = run_cli(capsys, "init-student", "--teacher", ws["teacher"], "--layers", "0,99", "--out", tmp_path / "s")
    assert_clean_error(rc, err, "init-student", "99", "out of range", "4 layers", "0..3")
    assert not (tmp_path / "s").exists()


def test_init_student_too_many_layers(capsys, ws, tmp_path):
    rc, out, err = run_cli(capsys, "init-student", "--teacher", ws["teacher"], "--num-layers", "9", "--out", tmp_path / "s")
    assert_clean_error(rc, err, "init-student", "between 1 and 4")


def test_init_student_bad_layers_syntax(capsys, ws, tmp_path):
    rc, out, err = run_cli(capsys, "init-student", "--teacher", ws["teacher"], "--layers", "0,x", "--out", tmp_path / "s")
    assert_clean_error(rc, err, "init-student", "argument --layers", "comma-separated", "'0,x'")


@pytest.mark.parametrize("flag, value, needles", [
    ("--num-layers", "0", ["0 must be at least 1"]),
    ("--calibration-tokens", "4", ["4 must be at least 8"]),
    ("--calibration-tokens", "many", ["cannot read 'many' as int", "whole number"]),
    ("--strategy", "random", ["'random' is not one of auto, every-other, uniform, first, importance, search"]),
    ("--search-objective", "loss", ["'loss' is not one of kl, ce"]),
    ("--layers", "", ["at least one teacher layer"]),
])
def test_init_student_options_are_checked_as_the_model_section(capsys, tmp_path, flag, value, needles):
    rc, out, err = run_cli(capsys, "init-student", "--teacher", "t", flag, value, "--out", tmp_path / "s")
    field = "model." + flag.removeprefix("--").replace("-", "_")
    assert_clean_error(rc, err, "init-student", f"argument {flag}: config value {field}:", *needles)
    assert not (tmp_path / "s").exists()


def test_init_student_defaults_are_the_model_sections():
    from dataclasses import asdict

    from lmdistill.cli import build_parser, parse_arguments
    from lmdistill.config import ModelConfig

    args = vars(parse_arguments(build_parser(), ["init-student", "--teacher", "t", "--out", "s"]))
    defaults = asdict(ModelConfig(teacher="t"))
    shared = set(defaults) & set(args)
    # Every model field an init-student run uses is an option (a pretrained student, the teacher
    # cache and the teacher correction, which needs the training data, are distill's).
    assert shared == set(defaults) - {"student", "teacher_cache", "teacher_correction_tokens", "teacher_correction_lr"}
    assert {name: args[name] for name in shared} == {name: defaults[name] for name in shared}


def test_init_student_writes_hf_folder(capsys, ws, tmp_path):
    out_dir = tmp_path / "student"
    rc, out, err = run_cli(capsys, "init-student", "--teacher", ws["teacher"], "--layers", "0,3", "--out", out_dir)
    assert rc == 0, err
    student = AutoModelForCausalLM.from_pretrained(out_dir)
    teacher = AutoModelForCausalLM.from_pretrained(ws["teacher"])
    assert student.config.n_layer == 2 and len(student.transformer.h) == 2
    assert student.config.lmdistill_layer_map == [0, 3]
    t_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        source = name.replace("transformer.h.1.", "transformer.h.3.")
        assert torch.equal(value, t_state[source]), name
    assert AutoTokenizer.from_pretrained(out_dir)("Hello world")["input_ids"] == [15496, 995]
    # Both parameter counts, as the numbers the library computes.
    t_params, s_params = count_parameters(teacher), count_parameters(student)
    assert f"teacher: 4 layers, {t_params / 1e6:.1f}M parameters" in out
    assert f"student: 2 layers, {s_params / 1e6:.1f}M parameters" in out
    assert "[0, 3]" in out


def test_init_student_default_is_half_depth_every_other(capsys, ws, tmp_path):
    rc, out, err = run_cli(capsys, "init-student", "--teacher", ws["teacher"], "--out", tmp_path / "s")
    assert rc == 0, err
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.lmdistill_layer_map == [0, 2]


# ---------------------------------------------------------------------------------------
# prepare


def test_prepare_missing_source(capsys, ws, tmp_path):
    missing = tmp_path / "missing.txt"
    rc, out, err = run_cli(capsys, "prepare", "--tokenizer", ws["teacher"], "--source", missing, "--out", tmp_path / "d")
    assert_clean_error(rc, err, "prepare", str(missing))
    assert not (tmp_path / "d").exists()


def test_prepare_unknown_corpus(capsys, ws, tmp_path):
    rc, out, err = run_cli(capsys, "prepare", "--tokenizer", ws["teacher"], "--source", "corpus:nope", "--out", tmp_path / "d")
    assert_clean_error(rc, err, "prepare", "nope", "austen", "moby_dick", "sotu")


def test_prepare_writes_then_reuses(capsys, ws, tmp_path):
    out_dir = tmp_path / "prepared"
    argv = ["prepare", "--tokenizer", ws["teacher"], "--source", ws["text"], "--out", out_dir]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    for split in ("train", "validation", "test"):
        assert (out_dir / f"{split}.bin").is_file()
    meta = json.loads((out_dir / "meta.json").read_text())
    for split, info in meta["splits"].items():
        assert info["tokens"] > 0
        assert f"{split:>10}: {info['tokens']:,} tokens" in out
    assert f"wrote {out_dir}" in out and "reused" not in out
    mtime = (out_dir / "train.bin").stat().st_mtime_ns

    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert f"reused {out_dir}" in out
    assert (out_dir / "train.bin").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------
# distill: errors before any work


def test_distill_missing_recipe(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "distill", "--config", tmp_path / "nope.yaml", "--out", tmp_path / "run")
    assert_clean_error(rc, err, "distill", "nope.yaml", "distilgpt2", "smollm2-demo")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, field", [
    ("train.lr=abc", "train.lr"),
    ("train.nope=1", "train.nope"),
    ("train.lr=-1", "train.lr"),
    ("loss.temperature=0", "loss.temperature"),
    ("model.strategy=random", "model.strategy"),
])
def test_distill_bad_override(capsys, tmp_path, override, field):
    rc, out, err = run_cli(capsys, "distill", "--config", "distilgpt2", "--out", tmp_path / "run", override)
    assert_clean_error(rc, err, "distill", field)
    assert not (tmp_path / "run").exists()


def test_distill_needs_out(capsys):
    rc, out, err = run_cli(capsys, "distill", "--config", "distilgpt2")
    assert_clean_error(rc, err, "distill", "--out")


def test_distill_resume_refuses_config(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "distill", "--resume", tmp_path, "--config", "distilgpt2")
    assert_clean_error(rc, err, "distill", "--resume", "--config")


def test_distill_resume_without_run(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = run_cli(capsys, "distill", "--resume", empty)
    assert_clean_error(rc, err, "distill", "no run to resume", str(empty))
    assert list(empty.iterdir()) == []
    rc, out, err = run_cli(capsys, "distill", "--resume", tmp_path / "never_made")
    assert_clean_error(rc, err, "distill", "no run to resume")


def test_distill_vocabulary_mismatch(capsys, ws, tmp_path):
    recipe = write_recipe(ws, tmp_path / "recipe.yaml")
    run_dir = tmp_path / "run"
    rc, out, err = run_cli(capsys, "distill", "--config", recipe, "--out", run_dir, f"model.student={ws['small_vocab']}")
    assert_clean_error(rc, err, "distill", "different vocabularies", "50257", "300")
    assert not run_dir.exists()
    assert "prepare" not in out  # failed before tokenising anything


# ---------------------------------------------------------------------------------------
# distill: a tiny run, then the run directory's rules


def test_distill_tiny_run(finished_run):
    assert finished_run["rc"] == 0, finished_run["err"]
    run_dir = finished_run["dir"]
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    for name in ("student", "student_init"):
        assert (run_dir / name / "config.json").is_file(), name
    config = load_config(run_dir / "config.yaml")
    assert config == load_config(finished_run["recipe"])
    assert [r["step"] for r in training_rows(run_dir)] == [1, 2]
    assert all(r["tokens_seen"] == r["step"] * 4 * 32 for r in training_rows(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True and summary["step"] == 2 and summary["tokens_seen"] == 256
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert student.config.n_layer == 2
    assert summary["student_parameters"] == count_parameters(student)
    assert "done: 2 steps" in finished_run["out"]


@pytest.mark.parametrize("extra", [[], ["train.max_steps=3"]])
def test_distill_refuses_existing_run(capsys, finished_run, extra):
    run_dir = finished_run["dir"]
    before = (run_dir / "metrics.jsonl").read_text()
    rc, out, err = run_cli(capsys, "distill", "--config", finished_run["recipe"], "--out", run_dir, *extra)
    line = assert_clean_error(rc, err, "distill", "--resume", str(run_dir))
    assert ("a different run" in line) == bool(extra)
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_distill_resume_finished_run_does_no_more_steps(capsys, finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run["dir"], run_dir)
    before = training_rows(run_dir)
    rc, out, err = run_cli(capsys, "distill", "--resume", run_dir)
    assert rc == 0, err
    assert training_rows(run_dir) == before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True and summary["step"] == 2


def test_distill_resume_finished_run_leaves_metrics_alone(capsys, finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run["dir"], run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    rc, out, err = run_cli(capsys, "distill", "--resume", run_dir)
    assert rc == 0, err
    assert (run_dir / "metrics.jsonl").read_text() == before


# ---------------------------------------------------------------------------------------
# eval and generate


def test_eval_table_and_json(capsys, ws, tmp_path):
    report = tmp_path / "eval.json"
    rc, out, err = run_cli(capsys, "eval", ws["teacher"], ws["student"], "--data", ws["text"], "--split", "test",
                           "--window", "32", "--max-tokens", "512", "--json", report)
    assert rc == 0, err
    results = json.loads(report.read_text())
    assert [row["model"] for row in results["models"]] == [str(ws["teacher"]), str(ws["student"])]
    (task,) = results["tasks"]
    assert task["name"] == "ppl" and task["options"]["source"] == str(ws["text"]) and task["options"]["split"] == "test"
    assert "windows of 32 tokens" in task["protocol"] and "test split" in task["protocol"]
    assert task["protocol"] in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == 2
    for row_line, row in zip(rows, results["models"]):
        ppl = row["tasks"][task["label"]]
        assert row_line.startswith(f"| {row['model']} |")
        assert f"{ppl['perplexity']:,.2f}" in row_line
        assert ppl["perplexity"] > 1 and 0 < ppl["tokens_scored"] <= 512
    # Same protocol for both models: the same number of tokens scored.
    scored = {row["tasks"][task["label"]]["tokens_scored"] for row in results["models"]}
    assert len(scored) == 1
    assert "different tokenizers" not in out


def test_eval_bad_source(capsys, ws):
    rc, out, err = run_cli(capsys, "eval", ws["teacher"], "--data", "corpus:nope")
    assert_clean_error(rc, err, "eval", "nope")


def test_generate(capsys, ws):
    rc, out, err = run_cli(capsys, "generate", ws["teacher"], "--prompt", "Hello", "--max-new-tokens", "5")
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Hello") and len(lines[0]) > len("Hello")
    # Greedy by default: the same continuation again.
    rc, again, err = run_cli(capsys, "generate", ws["teacher"], "--prompt", "Hello", "--max-new-tokens", "5")
    assert again == out


def test_generate_compare(capsys, ws):
    rc, out, err = run_cli(capsys, "generate", ws["teacher"], "--compare", ws["student"], "--prompt", "Hello",
                           "--max-new-tokens", "6")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"--- {ws['teacher']}" and lines[2] == f"--- {ws['student']}"
    assert lines[1].startswith("Hello") and lines[3].startswith("Hello")
    # Each model's continuation is its own greedy output.
    for line, model in ((lines[1], ws["teacher"]), (lines[3], ws["student"])):
        _, alone, _ = run_cli(capsys, "generate", model, "--prompt", "Hello", "--max-new-tokens", "6")
        assert alone.splitlines() == [line]
    speed = lines[4]
    assert speed.startswith("--- speed") and "(1.00x)" in speed and "6 tokens in" in speed


def test_generate_missing_model(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "generate", tmp_path / "nope" / "model", "--prompt", "Hi")
    assert_clean_error(rc, err, "generate", "does not exist")


# ---------------------------------------------------------------------------------------
# The installed entry point


def test_module_help_subprocess():
    result = subprocess.run([sys.executable, "-m", "lmdistill", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("prepare", "init-student", "distill", "eval", "generate", "demo"):
        assert command in result.stdout
    result = subprocess.run([sys.executable, "-m", "lmdistill"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("lmdistill: error: the following arguments are required: COMMAND; "
                                     "see lmdistill --help")


def test_report_command(capsys, finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run["dir"], run_dir)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"protocol": "test protocol", "models": [
        {"model": "a", "parameters": {"total": 1000, "non_embedding": 10}, "generation": {"tokens_per_second": 5.0},
         "speedup": {"generation": 1.0}}]}))
    rc, out, err = run_cli(capsys, "report", run_dir, "--bench", bench)
    assert rc == 0, err
    report = (run_dir / "report.md").read_text()
    assert out.strip() == f"wrote {run_dir / 'report.md'}"
    assert "finished" in report and "test protocol" in report and "plots/loss.png" in report
    assert (run_dir / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out, err = run_cli(capsys, "report", run_dir, "--bench", tmp_path / "missing.json")
    assert_clean_error(rc, err, "report", "missing.json")


def test_bench_command(capsys, ws, tmp_path):
    out_json = tmp_path / "bench.json"
    rc, out, err = run_cli(capsys, "bench", ws["teacher"], ws["student"], "--prompt-tokens", "8", "--new-tokens", "4",
                           "--repeats", "1", "--batch-size", "1", "--seq-len", "16", "--json", out_json)
    assert rc == 0, err
    results = json.loads(out_json.read_text())
    assert [m["model"] for m in results["models"]] == [str(ws["teacher"]), str(ws["student"])]
    assert results["models"][0]["speedup"]["generation"] == 1.0
    assert results["protocol"] in out
    rc, out, err = run_cli(capsys, "bench", ws["teacher"], "--repeats", "0")
    assert_clean_error(rc, err, "bench", "repeats")


def test_init_student_importance_strategy(capsys, ws, tmp_path):
    from lmdistill.data.prepare import tokenize_documents
    from lmdistill.data.sources import parse_source
    from lmdistill.models.load import load_model, load_tokenizer
    from lmdistill.student.importance import block_influence, most_influential

    out = tmp_path / "student"
    rc, stdout, err = run_cli(capsys, "init-student", "--teacher", ws["teacher"], "--num-layers", "2", "--strategy",
                              "importance", "--calibration", ws["text"], "--calibration-tokens", "256", "--out", out)
    assert rc == 0, err
    assert "block influence per teacher layer" in stdout
    teacher, tokenizer = load_model(ws["teacher"]), load_tokenizer(ws["teacher"])
    tokens = tokenize_documents(tokenizer, list(parse_source(str(ws["text"])).documents("train")))
    expected = most_influential(block_influence(teacher, tokens, block_size=256, max_tokens=256), 2)
    assert AutoModelForCausalLM.from_pretrained(out).config.lmdistill_layer_map == expected
    choice = AutoModelForCausalLM.from_pretrained(out).config.lmdistill_layer_choice
    assert choice["strategy"] == "importance" and choice["layers"] == expected
    assert set(choice["cuts"]) == {"every-other", "uniform", "importance"}


def test_init_student_search_strategy_prints_and_saves_every_step(capsys, ws, tmp_path):
    from lmdistill.train.plan import prepare_sources
    from lmdistill.models.load import load_model, load_tokenizer
    from lmdistill.student.search import greedy_search, make_calibration

    out = tmp_path / "student"
    rc, stdout, err = run_cli(capsys, "init-student", "--teacher", ws["teacher"], "--num-layers", "2", "--strategy",
                              "search", "--calibration", ws["text"], "--calibration-tokens", "128", "--out", out)
    assert rc == 0, err
    teacher = load_model(ws["teacher"])
    tokens = prepare_sources(load_tokenizer(ws["teacher"]), [str(ws["text"])], str(ws["teacher"])).tokens("train")
    expected = greedy_search(teacher, make_calibration(teacher, tokens, block_size=128, max_tokens=128), keep=2)
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert config.lmdistill_layer_map == expected.layers
    saved = config.lmdistill_layer_choice["search"]
    num_teacher = teacher.config.num_hidden_layers if hasattr(teacher.config, "num_hidden_layers") else teacher.config.n_layer
    assert [s["removed"] for s in saved["steps"]] == [s.removed for s in expected.steps]
    assert len(saved["steps"]) == num_teacher - 2
    for step in expected.steps:  # every step printed with its score
        assert f"removed layer {step.removed:>3}: {len(step.score.layers)} left" in stdout
    assert "| every-other |" in stdout and "| uniform |" in stdout and "| search |" in stdout


# ---------------------------------------------------------------------------------------
# Argument parsing and the error policy of main


def test_overrides_anywhere_on_the_command_line(ws, tmp_path):
    from lmdistill.cli import build_parser, parse_arguments

    recipe = write_recipe(ws, tmp_path / "recipe.yaml")
    argv = ["distill", "train.max_steps=3", "--config", str(recipe), "loss.kl=1.5", "--out", str(tmp_path / "run"),
            "train.max_steps=4", "data.block_size=16"]
    args = parse_arguments(build_parser(), argv)
    assert args.config == str(recipe) and args.out == str(tmp_path / "run")
    assert args.overrides == ["train.max_steps=3", "loss.kl=1.5", "train.max_steps=4", "data.block_size=16"]
    config = load_config(args.config, args.overrides)
    assert (config.train.max_steps, config.loss.kl, config.data.block_size) == (4, 1.5, 16)  # the last one wins


def test_subcommand_help_returns_zero(capsys):
    rc = main(["distill", "--help"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("usage: lmdistill distill") and "section.field=value" in out


def test_debug_shows_the_traceback(monkeypatch, tmp_path):
    from lmdistill.config import ConfigError

    monkeypatch.setenv("LMDISTILL_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.lr"):
        main(["distill", "--config", "distilgpt2", "--out", str(tmp_path / "run"), "train.lr=abc"])


@pytest.mark.parametrize("bug", [RuntimeError("a bug"), ValueError("a bug"), OSError("no path named")])
def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path, bug):
    import lmdistill.cli.parser as cli  # where each sub-parser binds its command function

    def broken(args):
        raise bug

    monkeypatch.setattr(cli, "cmd_report", broken)
    with pytest.raises(type(bug), match="a bug|no path named"):
        main(["report", str(tmp_path)])


def test_os_error_on_a_path_is_one_line(capsys, monkeypatch, tmp_path):
    import lmdistill.cli.parser as cli  # where each sub-parser binds its command function

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.json"))

    monkeypatch.setattr(cli, "cmd_report", denied)
    rc, out, err = run_cli(capsys, "report", tmp_path)
    assert_clean_error(rc, err, "report", f"{tmp_path / 'locked.json'}: Permission denied")


def test_json_results_land_in_a_new_folder(capsys, ws, tmp_path):
    report = tmp_path / "new" / "deeper" / "eval.json"
    rc, out, err = run_cli(capsys, "eval", ws["student"], "--task", "lastword:max_docs=2", "--json", report)
    assert rc == 0, err
    assert json.loads(report.read_text())["models"][0]["model"] == str(ws["student"])

"""The report: Markdown and PNG plots from finished, running, interrupted and torn run directories."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from lmdistill.cli import main
from lmdistill.recipe import load_config
from lmdistill.evaluate.results import format_eval
from lmdistill.measure.bench import format_bench
from lmdistill.report.plots import DPI, FIGSIZE, plot_metrics
from lmdistill.report.results import format_demo, upgrade_demo
from lmdistill.report.run import term_weight
from lmdistill.report.write import write_report
from lmdistill.train.run import run_training

from .helpers import save_with_tokenizer, small_text_file, tiny_gpt2

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ["loss.png", "lr.png", "val_ppl.png", "grad_norm.png"]
CONFIG_YAML = """model:
  teacher: gpt2
  num_layers: 6
loss:
  kl: 5.0
  ce: 2.0
  cos: 1.0
  mse: 0.0
  temperature: 2.0
train:
  lr: 0.00025
  max_grad_norm: 5.0
"""

# A demo results.json as lmdistill wrote it before version 2 (read through upgrade_demo).
DEMO_RESULTS = {
    "protocol": "token-level perplexity (natural log), windows of 512 tokens, stride 512; test split of each bundled corpus",
    "models": {
        "teacher": {"parameters": {"total": 134_515_008}, "perplexity": {"corpus:austen": 35.2, "corpus:sotu": 27.6},
                    "generation": {"tokens_per_second": 23.5, "new_tokens": 64, "prompt_tokens": 8, "repeats": 3,
                                   "device": "cpu", "threads": 2}},
        "student (initialised)": {"parameters": {"total": 81_413_568},
                                  "perplexity": {"corpus:austen": 559268.8, "corpus:sotu": 766957.1},
                                  "generation": {"tokens_per_second": 40.7}},
        "student (distilled)": {"parameters": {"total": 81_413_568},
                                "perplexity": {"corpus:austen": 108.7, "corpus:sotu": 135.4},
                                "generation": {"tokens_per_second": 40.1}},
    },
    "samples": {"prompts": ["Call me Ishmael."], "teacher": [" I was young."], "student (distilled)": [" I am not."]},
}

EVAL_JSON = {
    "tasks": [
        {"label": "wikitext", "name": "wikitext", "options": {}, "protocol": "word perplexity, rolling windows of 1024",
         "metrics": ["word_perplexity", "bits_per_byte"]},
        {"label": "lambada", "name": "lambada", "options": {}, "protocol": "last-word accuracy, greedy",
         "metrics": ["acc", "perplexity"]},
    ],
    "device": "cpu",
    "models": [
        {"model": "gpt2", "tokenizer": "abc", "tasks": {"wikitext": {"word_perplexity": 37.37, "bits_per_byte": 0.9684},
                                                      "lambada": {"acc": 0.3256, "perplexity": 40.06}}},
        {"model": "runs/x/student", "tokenizer": "abc",
         "tasks": {"wikitext": {"word_perplexity": 54.3, "bits_per_byte": 1.0432}, "lambada": {"acc": 0.2419}}},
    ],
}

BENCH_JSON = {
    "protocol": "batch 1, 64 new tokens, on cuda",
    "device": "cuda",
    "models": [
        {"model": "gpt2", "parameters": {"total": 124_439_808, "non_embedding": 85_056_000},
         "size_on_disk_bytes": 497_774_208, "peak_memory_bytes": 600_000_000,
         "generation": {"tokens_per_second": 120.5, "ms_per_token": 8.3, "spread": 0.04},
         "prefill": {"tokens_per_second": 15000.0, "spread": 0.12}, "forward": {"tokens_per_second": 4200.0},
         "speedup": {"generation": 1.0, "prefill": 1.0, "forward": 1.0}},
        # A row missing most keys: the table still renders, with "-" where values are missing.
        {"model": "runs/x/student", "parameters": {"total": 81_912_576},
         "generation": {"tokens_per_second": 230.1}, "speedup": {"generation": 1.91}},
    ],
}


# ---------------------------------------------------------------------------------------
# Run directories built by hand


def training_rows(steps: int = 20, tokens_per_step: int = 4096) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        kl, ce, cos = 12.0 * math.exp(-step / 5) + 1.5, 9.0 * math.exp(-step / 6) + 4.0, 0.8 * math.exp(-step / 8) + 0.3
        rows.append({"step": step, "tokens_seen": step * tokens_per_step, "lr": 2.5e-4 * min(1.0, step / 2),
                     "loss": 5 * kl + 2 * ce + cos, "kl": kl, "ce": ce, "cos": cos,
                     "grad_norm": 500.0 * math.exp(-step / 3) + 4.0, "tokens_per_s": 2000.0 + step, "elapsed_s": step * 2.05})
    return rows


def validation_rows(steps=(0, 10, 20), tokens_per_step: int = 4096) -> list[dict]:
    ppl = {0: 1_050_127.9, 10: 410.2, 20: 145.0}
    return [{"step": s, "tokens_seen": s * tokens_per_step, "val_loss": math.log(ppl[s]), "val_ppl": ppl[s],
             "val_tokens": 4080} for s in steps]


def make_run(root: Path, finished: bool = True, steps: int = 20, torn: bool = False) -> Path:
    """A run directory as train.py writes it: validation at 0, 10 and 20, training rows between."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(CONFIG_YAML)
    train = training_rows(steps)
    val = [r for r in validation_rows() if r["step"] <= steps]
    rows = sorted(train + val, key=lambda r: (r["step"], "loss" in r))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if torn:
        text += '{"step": %d, "tokens_seen": 9999, "lr": 0.0002, "loss": 17.9' % (steps + 1)
    (root / "metrics.jsonl").write_text(text)
    if finished:
        (root / "summary.json").write_text(json.dumps({
            "run_dir": str(root), "step": steps, "tokens_seen": steps * 4096, "finished": True,
            "train_seconds": round(steps * 2.05, 1), "val_ppl": 145.0, "student_parameters": 81_413_568}))
    return root


def check_plots(run_dir: Path, names=PLOTS) -> None:
    import matplotlib.image

    report = (run_dir / "report.md").read_text()
    for name in names:
        path = run_dir / "plots" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        image = matplotlib.image.imread(path)
        assert image.shape[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI)), (name, image.shape)
        assert image[..., :3].std() > 0.05, f"{name} looks blank"
        assert f"](plots/{name})" in report, name


def section(report: str, title: str) -> str:
    match = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", report, flags=re.M | re.S)
    assert match, f"no section {title}"
    return match.group(1)


def test_finished_run(tmp_path):
    run = make_run(tmp_path / "run")
    path = write_report(run)
    assert path == run / "report.md"
    report = path.read_text()
    assert report.startswith(f"# lmdistill run: `{run}`")
    assert "**Status: finished**" in report and "--resume" not in report
    training = section(report, "Training")
    assert "steps: 20; tokens seen: 81,920; training time: 41.0 s" in training
    assert "1,050,127.90 at step 0 → 145.00 at step 20" in training
    assert "above the clipping threshold (5) on 18 of 20 steps" in training
    rate = re.search(r"throughput: ([\d,]+) tokens/s over the last 20 steps", training)
    assert rate and 2000 <= int(rate.group(1).replace(",", "")) <= 2020
    config = section(report, "Configuration")
    assert "```yaml\n" + CONFIG_YAML in config
    check_plots(run)
    assert "## Evaluation" not in report and "## Size and speed" not in report


def test_interrupted_run_with_torn_last_line(tmp_path):
    run = make_run(tmp_path / "run", finished=False, steps=13, torn=True)
    old = time.time() - 3600
    os.utime(run / "metrics.jsonl", (old, old))
    report = write_report(run).read_text()
    assert "**Status: interrupted**" in report
    assert f"lmdistill distill --resume {run}" in report
    assert "last logged step 13, 53,248 tokens seen" in report
    assert "starts over from step 0 (no checkpoint yet)" in report
    assert "1 unreadable line in metrics.jsonl skipped" in report
    assert "410.20 at step 10" in report
    check_plots(run)


def test_run_with_only_the_first_validation(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG_YAML)
    (run / "metrics.jsonl").write_text(json.dumps(validation_rows((0,))[0]) + "\n")
    report = write_report(run).read_text()
    assert "**Status: in progress**" in report and "no training steps logged yet" in report
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["val_ppl.png"]
    check_plots(run, ["val_ppl.png"])
    assert "plots/loss.png" not in report


def test_not_a_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.yaml or metrics.jsonl"):
        write_report(tmp_path)


def test_plot_metrics_returns_the_files_written(tmp_path):
    rows = training_rows() + validation_rows()
    written = plot_metrics(rows, tmp_path / "plots")
    assert [p.name for p in written] == PLOTS
    assert plot_metrics([], tmp_path / "empty") == []


def test_eval_and_bench_tables_from_files_and_arguments(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "results.json").write_text(json.dumps(DEMO_RESULTS))
    (run / "eval.json").write_text(json.dumps(EVAL_JSON))
    (run / "bench.json").write_text(json.dumps(BENCH_JSON))
    report = write_report(run).read_text()
    assert report.count("## Evaluation") == 2 and report.count("## Size and speed") == 2
    # An old demo result: one row per model, perplexity per corpus with its protocol, speed
    # relative to the teacher with the old protocol, the gains and the samples.
    assert "### summary\n\n| model | ppl austen perplexity | ppl sotu perplexity |" in report
    assert "| student (distilled) | 108.70 | 135.40 |" in report
    assert ("### ppl austen\nProtocol: token-level perplexity (natural log), windows of 512 tokens, stride 512; test "
            "split of each bundled corpus.") in report
    assert "through model.generate with the prefill of a 8-token prompt included, median of 3" in report
    assert "| student (distilled) | 81.4M / - | 40.1 (1.71x) |" in report
    assert "austen 5,145x" in report and "**Prompt:** Call me Ishmael." in report
    # An evaluation result: one table per task, each with its protocol.
    assert "### wikitext\nProtocol: word perplexity, rolling windows of 1024.\n" in report
    assert "| gpt2 | 37.37 | 0.9684 |" in report
    assert "| runs/x/student | 0.2419 | - |" in report
    # A bench result: missing keys show as "-"; columns with no values at all are left out.
    assert "Protocol: batch 1, 64 new tokens, on cuda." in report
    assert "| gpt2 | 124.4M / 85.1M | 497.8 | 600.0 | 120.5 (1.00x) | 8.30 | 15,000.0 | 4,200.0 (1.00x) |" in report
    assert "| runs/x/student | 81.9M / - | - | - | 230.1 (1.91x) | - | - | - |" in report
    assert "Largest run-to-run spread: 12% (cuda)." in report

    # Arguments replace eval.json / bench.json; a demo result as argument replaces results.json too.
    report = write_report(run, eval_results=DEMO_RESULTS, bench_results={"models": []}).read_text()
    assert report.count("## Evaluation") == 1 and "### wikitext" not in report
    assert "(benchmark results hold no models)" in report


def test_a_result_given_to_the_other_option_is_refused(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    results = tmp_path / "eval.json"
    results.write_text(json.dumps({**EVAL_JSON, "kind": "eval", "version": 2}))
    assert main(["report", str(run), "--bench", str(results)]) == 2
    err = capsys.readouterr().err
    assert err == f"lmdistill report: error: --bench {results} holds the results of lmdistill eval; pass it with --eval\n"
    assert not (run / "report.md").exists()
    assert main(["report", str(run), "--eval", str(results)]) == 0


def test_an_old_demo_result_is_read_in_the_new_shape():
    new = upgrade_demo(DEMO_RESULTS)
    assert (new["kind"], new["version"]) == ("demo", 2) and upgrade_demo(new) is new
    assert [t["label"] for t in new["eval"]["tasks"]] == ["ppl austen", "ppl sotu"]
    rows = {r["model"]: r["tasks"] for r in new["eval"]["models"]}
    assert rows["teacher"]["ppl sotu"]["perplexity"] == 27.6
    bench = {m["model"]: m for m in new["bench"]["models"]}
    assert bench["student (initialised)"]["speedup"]["generation"] == 40.7 / 23.5  # the same float64 division
    assert bench["teacher"]["parameters"] == {"total": 134_515_008}


def test_format_functions_tolerate_missing_keys():
    lines = "\n".join(format_eval({"models": [{"model": "m", "tasks": {"ppl": {"perplexity": 12.5}}}]}))
    assert "### ppl" in lines and "| m | 12.50 |" in lines
    assert format_eval({}) == ["(evaluation results hold no models)"]
    lines = "\n".join(format_bench({"models": [{"model": "m"}, {"generation": {"tokens_per_second": 5}}]}))
    assert "| m | - |" in lines and "| ? | 5.0 |" in lines
    demo = "\n".join(format_demo({"models": {"teacher": {}, "student": {"perplexity": {"x": 3.0}}}}))
    assert "| teacher | - |" in demo and "| student | 3.00 |" in demo


# ---------------------------------------------------------------------------------------
# A real tiny run: interrupted at step 3, then resumed to the end


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("report")
    text = small_text_file(root)
    teacher = save_with_tokenizer(tiny_gpt2(n_layer=4, seed=0), gpt2_tokenizer, root / "teacher")
    config = load_config(None, [
        f"model.teacher={teacher}", "model.num_layers=2",
        f"data.sources=[{text}]", f"data.prepared_dir={root / 'data'}", "data.block_size=32",
        "train.lr=1e-3", "train.warmup=0.2", "train.checkpoint_every=0", "train.eval_tokens=256",
        "train.threads=1", "train.batch_size=2", "train.max_steps=6", "train.eval_every=2",
    ])
    run = root / "run"
    first = run_training(config, run, stop_at_step=3, progress=False)
    assert first["finished"] is False
    interrupted = root / "interrupted"
    shutil.copytree(run, interrupted)
    second = run_training(None, run, resume=True, progress=False)
    assert second["finished"] is True
    return {"finished": run, "interrupted": interrupted}


def test_real_interrupted_run(real_runs):
    run = real_runs["interrupted"]
    assert not (run / "student").exists() and not (run / "summary.json").exists()
    report = write_report(run).read_text()
    assert re.search(r"\*\*Status: (in progress|interrupted)\*\*", report)
    assert f"lmdistill distill --resume {run}" in report
    assert "continues from checkpoint `step_000003`" in report
    assert "last logged step 3, 192 tokens seen" in report
    assert "→" in section(report, "Training")  # validation at step 0 and step 2
    check_plots(run)


def test_real_interrupted_run_with_torn_line(real_runs, tmp_path):
    run = tmp_path / "torn"
    shutil.copytree(real_runs["interrupted"], run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "tokens_seen": 256, "lr": 0.0009, "lo')
    report = write_report(run).read_text()
    assert "last logged step 3, 192 tokens seen" in report
    assert "1 unreadable line in metrics.jsonl skipped" in report
    check_plots(run)


def test_real_finished_run(real_runs):
    run = real_runs["finished"]
    report = write_report(run).read_text()
    assert "**Status: finished** - 6 steps, 384 tokens" in report and "--resume" not in report
    assert "at step 6 (384 tokens)" in report
    assert "model:\n  teacher:" in section(report, "Configuration")
    check_plots(run)


def test_a_logit_term_named_after_its_divergence_is_reported_and_weighted_by_loss_kl(tmp_path):
    run = make_run(tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "kl" in row:
            row["jsd"] = row.pop("kl")  # what a loss.divergence=jsd run logs
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(run).read_text()
    last = rows[-2] if "val_ppl" in rows[-1] else rows[-1]
    assert f"(jsd {last['jsd']:.4g}, ce " in report
    assert term_weight("jsd", {"kl": 5.0, "ce": 2.0}) == 5.0 and term_weight("ce", {"kl": 5.0, "ce": 2.0}) == 2.0

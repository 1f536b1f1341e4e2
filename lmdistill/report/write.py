"""The run report: ``RUN_DIR/report.md`` with PNG plots, from whatever a run directory holds.

``write_report(run_dir)`` reads ``config.yaml``, ``metrics.jsonl`` (a torn last line is
skipped), ``summary.json`` when the run finished, and the result files next to them
(``eval.json`` from ``lmdistill eval --json``, ``bench.json`` from ``lmdistill bench --json``,
``results.json`` from the demo; :mod:`.results`), and writes ``RUN_DIR/report.md`` and
``RUN_DIR/plots/*.png`` (:mod:`.plots`). It works on a finished run, one still training and
an interrupted one, and tolerates result files with missing keys (a missing value shows as "-").
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import LmdistillError
from ..markdown import finite, get, join, number, table
from ..train.correct import RECORD_KEY
from ..train.rundir import RunDir, read_metrics
from .plots import PLOT_FILES, PLOT_TITLES, plot_metrics
from .run import LOSS_TERMS, read_json, read_yaml, run_status, split_rows, throughput
from .results import result_sections

__all__ = ["ReportError", "write_report"]


def _duration(seconds: Any) -> str:
    if not finite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds:,.0f} s ({seconds / 60:.1f} min)"
    return f"{seconds:,.0f} s ({seconds / 3600:.1f} h)"


def _status_lines(run_dir: Path, status: dict[str, Any], train: list[dict[str, Any]], val: list[dict[str, Any]]) -> list[str]:
    last = train[-1] if train else (val[-1] if val else {})
    step, tokens = last.get("step", 0), last.get("tokens_seen", 0)
    elapsed = last.get("elapsed_s")
    if status["state"] == "finished":
        s = status["summary"]
        return [f"**Status: finished** - {s.get('step', step):,} steps, {s.get('tokens_seen', tokens):,} tokens, "
                f"{_duration(s.get('train_seconds', elapsed))} of training. "
                f"The distilled student is in `{run_dir / 'student'}` (a Hugging Face folder)."]
    age = status.get("metrics_age_s")
    written = f"metrics.jsonl last written {_duration(age)} ago" if age is not None else "no metrics.jsonl"
    lines = [f"**Status: {status['state']}** ({written}; no summary.json yet) - last logged step {step:,}, "
             f"{tokens:,} tokens seen, {_duration(elapsed)} of training."]
    checkpoint = status.get("checkpoint")
    resume = f"`lmdistill distill --resume {shlex.quote(str(run_dir))}`"
    if checkpoint is not None:
        where = f"continues from checkpoint `{checkpoint.name}`"
        try:
            saved = int(checkpoint.name.split("_", 1)[1])
            if saved < step:
                where += f" (steps {saved + 1}-{step} are trained again)"
        except (IndexError, ValueError):
            pass
    else:
        where = "starts over from step 0 (no checkpoint yet)"
    stopped = "If the training process has stopped, resume" if status["state"] == "in progress" else "Resume"
    lines += ["", f"{stopped} with {resume}: it {where}. (A demo run: `lmdistill demo --resume --out "
                  f"{shlex.quote(str(run_dir))}`, which then also runs the evaluation.)"]
    return lines


def _summary_lines(train: list[dict[str, Any]], val: list[dict[str, Any]], status: dict[str, Any],
                   config: dict[str, Any] | None = None) -> list[str]:
    if not train and not val:
        return ["No metrics logged yet."]
    lines = []
    summary = status.get("summary") or {}
    if train:
        last = train[-1]
        seconds = summary.get("train_seconds", last.get("elapsed_s"))
        lines.append(f"- steps: {last['step']:,}; tokens seen: {last.get('tokens_seen', 0):,}; "
                     f"training time: {_duration(seconds)}")
        rate = throughput(train)
        if rate:
            lines.append(f"- throughput: {rate[0]:,.0f} tokens/s over the last {rate[1]} steps")
        terms = ", ".join(f"{t} {last[t]:.4g}" for t in LOSS_TERMS if finite(last.get(t)))
        lines.append(f"- last step: loss {number(last.get('loss'), '.4g')}" + (f" ({terms})" if terms else "")
                     + f", lr {number(last.get('lr'), '.3g')}, grad norm {number(last.get('grad_norm'), '.3g')}")
        clip = get(config, "train", "max_grad_norm")
        norms = [r["grad_norm"] for r in train if finite(r.get("grad_norm"))]
        if finite(clip) and clip > 0 and norms:
            clipped = sum(n > clip for n in norms)
            lines.append(f"- gradient norm above the clipping threshold ({clip:g}) on {clipped:,} of {len(norms):,} steps")
    else:
        lines.append("- no training steps logged yet")
    if val:
        first, last = val[0], val[-1]
        text = f"- validation perplexity: {number(first['val_ppl'], ',.2f')} at step {first['step']:,}"
        if last is not first:
            text += f" → {number(last['val_ppl'], ',.2f')} at step {last['step']:,} ({last.get('tokens_seen', 0):,} tokens)"
        tokens = last.get("val_tokens")
        if finite(tokens):
            text += f"; {tokens:,} validation tokens scored each time"
        lines.append(text)
    return lines


class ReportError(LmdistillError, FileNotFoundError):
    """A folder that holds no run to report on. Also a FileNotFoundError, which it was before the
    tool had its own error classes, so callers catching that keep working."""


def _training_section(run: RunDir, config: dict[str, Any]) -> list[str]:
    """Status, training summary and plots (written into RUN_DIR/plots)."""
    rows = read_metrics(run.metrics)
    lines_in_file = sum(1 for line in run.metrics.read_text().splitlines() if line.strip()) if run.metrics.is_file() else 0
    skipped = lines_in_file - len(rows)
    train, val = split_rows(rows)
    status = run_status(run.root)
    written = {p.name for p in plot_metrics(rows, run.root / "plots", run_name=run.root.name, config=config)}

    out = _status_lines(run.root, status, train, val)
    out += ["", "## Training", ""]
    out += _summary_lines(train, val, status, config)
    if skipped:
        out.append(f"- {skipped} unreadable line{'s' if skipped > 1 else ''} in metrics.jsonl skipped "
                   f"(a run killed mid-write leaves a torn last line)")
    if written:
        out.append("")
        for key, name in PLOT_FILES.items():
            if name in written:
                out += [f"![{PLOT_TITLES[key]}](plots/{name})", ""]
        out.pop()
    return out


def _correction_section(run: RunDir) -> list[str]:
    """The original and the corrected teacher side by side, when the student was cut from a
    corrected teacher (its config.json keeps the correction's record)."""
    record = next((r for folder in (run.student_init, run.student)
                   if isinstance(r := get(read_json(folder / "config.json"), RECORD_KEY), dict)), None)
    if record is None:
        return []
    return ["", "## Teacher correction", "",
            f"Before distilling, the teacher `{record.get('teacher', '?')}` was fine-tuned on "
            f"{number(record.get('tokens'), ',.0f')} training tokens ({number(record.get('steps'), ',.0f')} steps, "
            f"peak learning rate {number(record.get('lr'), 'g')}); the student was cut from the corrected teacher, "
            f"which also gave the soft targets. Corrected teacher: `{record.get('path', '?')}`.", "",
            *table(["teacher", f"validation perplexity ({number(record.get('val_tokens'), ',.0f')} tokens)"],
                   [["original", number(record.get("val_ppl_before"))],
                    ["corrected", number(record.get("val_ppl_after"))]])]


def write_report(run_dir: Path, eval_results: dict | None = None, bench_results: dict | None = None) -> Path:
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png from whatever the run directory holds.

    Works on a finished run, one still going, and an interrupted one (no student/, no
    summary.json, torn last metrics line). ``eval_results`` (an evaluation result, or a demo
    result) replaces RUN_DIR/eval.json; ``bench_results`` replaces RUN_DIR/bench.json. The
    demo's RUN_DIR/results.json is included when present, unless ``eval_results`` is itself a
    demo result. Returns the path of report.md.
    """
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise ReportError(f"{run.root} is not a folder; pass a run directory written by lmdistill distill")
    if not run.config.is_file() and not run.metrics.is_file():
        raise ReportError(f"{run.root} holds no config.yaml or metrics.jsonl; pass a run directory "
                          f"written by lmdistill distill")
    config_text = run.config.read_text() if run.config.is_file() else None
    config = read_yaml(run.config) if config_text else {}

    out = [f"# lmdistill run: `{run.root}`", ""]
    out += _training_section(run, config)
    out += _correction_section(run)
    out += result_sections(run.root, eval_results, bench_results)
    out += ["", "## Configuration", ""]
    if config_text is not None:
        out += ["`config.yaml`, as resolved for this run:", "", "```yaml", config_text.rstrip("\n"), "```"]
    else:
        out.append("No config.yaml in the run directory.")
    write_text_atomic(run.report, join(out))
    return run.report

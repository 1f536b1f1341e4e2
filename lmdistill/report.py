"""A Markdown report with PNG plots from whatever a run directory holds.

``write_report(run_dir)`` reads ``config.yaml``, ``metrics.jsonl`` (a torn last line is
skipped), ``summary.json`` when the run finished, and the evaluation and benchmark results
next to them (``eval.json`` from ``lmdistill eval --json``, ``bench.json`` from ``lmdistill
bench --json``, ``results.json`` from the demo), and writes ``RUN_DIR/report.md`` and
``RUN_DIR/plots/*.png``. It works on a finished run, one still training and an interrupted
one, and tolerates result files with missing keys (a missing value shows as "-").

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display
needed), 7 x 4 inches at 120 dpi, so each PNG is 840 x 480 pixels.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .atomic import FILE_MODE, write_text_atomic
from .train.rundir import RunDir, read_metrics
from .errors import LmdistillError

__all__ = ["write_report", "plot_metrics", "format_eval", "format_bench", "run_status"]

FIGSIZE = (7.0, 4.0)
DPI = 120
THROUGHPUT_WINDOW = 50  # steps over which the report's tokens/s is measured
IN_PROGRESS_SECONDS = 300  # metrics written more recently than this: the run is probably still going
LOSS_TERMS = ("kl", "ce", "cos", "mse")
PLOT_FILES = {"loss": "loss.png", "lr": "lr.png", "val_ppl": "val_ppl.png", "grad_norm": "grad_norm.png"}
PLOT_TITLES = {"loss": "Loss terms", "lr": "Learning rate", "val_ppl": "Validation perplexity",
               "grad_norm": "Gradient norm"}


# ---------------------------------------------------------------------------------------
# Reading the run directory


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def split_rows(rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows (with ``loss``) and validation rows (with ``val_ppl``), each sorted by step,
    one per step (the last one logged wins, as after a resume that re-did steps)."""
    train: dict[int, dict[str, Any]] = {}
    val: dict[int, dict[str, Any]] = {}
    for row in rows:
        if not isinstance(row, dict) or not _finite(row.get("step")):
            continue
        if "loss" in row:
            train[int(row["step"])] = row
        elif "val_ppl" in row:
            val[int(row["step"])] = row
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def run_status(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """What state the run is in: ``finished``, ``in progress`` or ``interrupted``.

    A run is finished when ``summary.json`` says so. Otherwise it is "in progress" when
    ``metrics.jsonl`` was written in the last ``IN_PROGRESS_SECONDS`` (a guess: nothing
    records whether the training process is alive) and "interrupted" when not.
    """
    run = RunDir(Path(run_dir))
    summary = _read_json(run.root / "summary.json")
    if summary is not None and summary.get("finished", True):
        return {"state": "finished", "summary": summary}
    now = time.time() if now is None else now
    age = now - run.metrics.stat().st_mtime if run.metrics.is_file() else None
    state = "in progress" if age is not None and age < IN_PROGRESS_SECONDS else "interrupted"
    return {"state": state, "summary": summary, "metrics_age_s": age, "checkpoint": run.latest_checkpoint()}


# ---------------------------------------------------------------------------------------
# Plots


def _thousands(value: float, _pos: Any = None) -> str:
    return f"{value:,.0f}"


def _scaled_axis(ax, label: str, largest: float) -> None:
    """Thousands separators; counts past ten million in millions (billions past ten billion),
    so that seven tick labels fit side by side."""
    from matplotlib.ticker import FuncFormatter

    scale, unit = next(((s, u) for s, u in ((1e9, "billions"), (1e6, "millions")) if largest >= 10 * s), (1, ""))

    def fmt(value: float, _pos: Any = None) -> str:
        value /= scale
        return f"{value:,.0f}" if abs(value - round(value)) < 1e-9 else f"{value:,.2f}".rstrip("0").rstrip(".")

    ax.xaxis.set_major_formatter(FuncFormatter(fmt))
    ax.set_xlabel(f"{label} ({unit})" if unit else label)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start), for long noisy curves."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in rows if _finite(r.get(x)) and _finite(r.get(y))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _wide_range(values: list[float], ratio: float = 100.0) -> bool:
    """All positive and spanning more than ``ratio``: worth a log-scale axis."""
    positive = [v for v in values if v > 0]
    return bool(positive) and len(positive) == len(values) and max(positive) / min(positive) > ratio


def _new_figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=7, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    return fig, ax


def _save(fig, path: Path) -> Path:
    """Tight layout at a fixed pixel size, written atomically (a reader never sees half a PNG)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _smoothing_window(n: int) -> int:
    """Points averaged per plotted value: 1 (raw) up to 200 points, then about n / 50."""
    return 1 if n <= 200 else max(2, n // 50)


def _plot_lines(ax, xs: list[float], ys: list[float], label: str, color: str | None = None) -> None:
    """A line; with many points, the raw values faint and a moving average on top."""
    window = _smoothing_window(len(xs))
    if window > 1:
        line, = ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _smooth(ys, window), color=line.get_color(), linewidth=1.6, label=label)
    else:
        marker = "o" if len(xs) <= 30 else None
        ax.plot(xs, ys, color=color, marker=marker, markersize=3, linewidth=1.4, label=label)


def _step_label(n: int) -> str:
    window = _smoothing_window(n)
    return "optimizer step" + (f"  (lines: mean of {window} steps; faint: each step)" if window > 1 else "")


def plot_metrics(rows: list[dict[str, Any]], out_dir: Path, run_name: str | None = None,
                 config: dict[str, Any] | None = None) -> list[Path]:
    """Draw the training curves of metrics rows into ``out_dir``; returns the PNGs written.

    ``loss.png``: total loss and each logged term over steps; ``lr.png``: learning rate;
    ``val_ppl.png``: validation perplexity over tokens seen; ``grad_norm.png``: gradient
    norm before clipping. A plot with no data is not drawn. ``config`` (the parsed
    config.yaml) adds loss weights to the legend and the clipping threshold to the grad-norm
    plot; ``run_name`` goes into the titles.
    """
    out_dir = Path(out_dir)
    train, val = split_rows(rows)
    loss_cfg = (config or {}).get("loss") or {}
    train_cfg = (config or {}).get("train") or {}
    suffix = f" - {run_name}" if run_name else ""
    written: list[Path] = []

    steps, total = _series(train, "step", "loss")
    if steps:
        fig, ax = _new_figure(f"{PLOT_TITLES['loss']}{suffix}", _step_label(len(steps)), "loss per token")
        _plot_lines(ax, steps, total, "total", color="black")
        plotted = list(total)
        for term in LOSS_TERMS:
            xs, ys = _series(train, "step", term)
            if xs:
                weight = loss_cfg.get(term)
                _plot_lines(ax, xs, ys, term + (f" \u00d7{weight:g}" if _finite(weight) else ""))
                plotted += ys
        if _wide_range(plotted):
            ax.set_yscale("log")
        # Outside the axes: the curves span the whole height, so any spot inside covers one.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="term \u00d7 weight",
                  title_fontsize="small", borderaxespad=0)
        written.append(_save(fig, out_dir / PLOT_FILES["loss"]))

    steps, lr = _series(train, "step", "lr")
    if steps:
        from matplotlib.ticker import ScalarFormatter

        fig, ax = _new_figure(f"{PLOT_TITLES['lr']}{suffix}", "optimizer step", "learning rate")
        ax.plot(steps, lr, color="tab:green", linewidth=1.4, marker="o" if len(steps) <= 30 else None, markersize=3)
        formatter = ScalarFormatter(useMathText=True)
        formatter.set_powerlimits((-2, 3))
        ax.yaxis.set_major_formatter(formatter)
        ax.set_ylim(bottom=0)
        written.append(_save(fig, out_dir / PLOT_FILES["lr"]))

    tokens, ppl = _series(val, "tokens_seen", "val_ppl")
    if tokens:
        fig, ax = _new_figure(f"{PLOT_TITLES['val_ppl']}{suffix}", "tokens seen", "validation perplexity (log scale)")
        # Measurements at the markers; the thin line between them is only a guide for the eye.
        ax.plot(tokens, ppl, marker="o", markersize=5, linewidth=1, linestyle="--", color="tab:purple")
        _scaled_axis(ax, "tokens seen", max(tokens))
        if all(v > 0 for v in ppl):
            ax.set_yscale("log")
        for i in sorted({0, len(ppl) - 1}):  # first above-right, last below-left: clear of a falling curve
            first = i == 0
            ax.annotate(f"{ppl[i]:,.1f}", (tokens[i], ppl[i]), textcoords="offset points",
                        xytext=(6, 6) if first else (-6, -6), ha="left" if first else "right",
                        va="bottom" if first else "top", fontsize="small")
        ax.margins(x=0.05, y=0.12)
        written.append(_save(fig, out_dir / PLOT_FILES["val_ppl"]))

    steps, norm = _series(train, "step", "grad_norm")
    if steps:
        fig, ax = _new_figure(f"{PLOT_TITLES['grad_norm']}{suffix}", _step_label(len(steps)),
                              "gradient norm (before clipping)")
        _plot_lines(ax, steps, norm, "grad norm", color="tab:red")
        clip = train_cfg.get("max_grad_norm")
        if _finite(clip) and clip > 0:
            ax.axhline(clip, color="gray", linestyle="--", linewidth=1, label=f"clip at {clip:g}")
        if _wide_range(norm + ([clip] if _finite(clip) and clip > 0 else [])):
            ax.set_yscale("log")
        ax.legend(loc="best", fontsize="small")
        written.append(_save(fig, out_dir / PLOT_FILES["grad_norm"]))
    return written


# ---------------------------------------------------------------------------------------
# Formatting helpers


def _get(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...`` or None when any level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: Any, fmt: str = ",.2f", suffix: str = "") -> str:
    return f"{value:{fmt}}{suffix}" if _finite(value) else "-"


def _params(value: Any) -> str:
    return f"{value / 1e6:,.1f}M" if _finite(value) else "-"


def _bytes(value: Any) -> str:
    if not _finite(value):
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} B"


def _duration(seconds: Any) -> str:
    if not _finite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds:,.0f} s ({seconds / 60:.1f} min)"
    return f"{seconds:,.0f} s ({seconds / 3600:.1f} h)"


def _metric(metric: str, value: Any) -> str:
    if metric.startswith("acc") or metric.endswith("_acc") or metric == "bits_per_byte":
        return _num(value, ".4f")
    return _num(value, ",.2f")


def _protocol(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in value.items())
    return str(value).rstrip(".")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(_cell(h) for h in header) + " |",
            "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)]


def _column_table(items: list[Any], columns: list[tuple[str, Callable[[Any], Any], Callable[[Any], str]]]) -> list[str]:
    """Rows from ``items``; a column whose getter finds nothing for any item is left out."""
    kept = [(h, get, fmt) for h, get, fmt in columns if any(get(it) is not None for it in items)]
    rows = [[fmt(get(it)) if get(it) is not None else "-" for _, get, fmt in kept] for it in items]
    return _table([h for h, _, _ in kept], ["l"] + ["r"] * (len(kept) - 1), rows)


def _short_source(source: str) -> str:
    return source.split(":", 1)[1] if source.startswith("corpus:") else source


# ---------------------------------------------------------------------------------------
# Evaluation and benchmark sections


def format_eval(results: dict[str, Any]) -> list[str]:
    """Markdown lines for either evaluation shape: the demo's ``results.json`` (``models`` is
    a dict of label -> parameters/perplexity/generation) or ``lmdistill eval --json``
    (``tasks`` and a list of ``models`` rows)."""
    models = results.get("models")
    if isinstance(models, dict):
        return _format_demo_eval(results)
    if isinstance(models, list):
        return _format_eval_json(results)
    return ["(evaluation results in an unknown format: no `models`)"]


def _format_demo_eval(results: dict[str, Any]) -> list[str]:
    models: dict[str, Any] = {k: v for k, v in results["models"].items() if isinstance(v, dict)}
    sources: list[str] = []
    for row in models.values():
        for source in (row.get("perplexity") or {}):
            if source not in sources:
                sources.append(source)
    base_label = "teacher" if "teacher" in models else next(iter(models), None)
    base_speed = _get(models.get(base_label), "generation", "tokens_per_second")

    def speed(row: dict[str, Any]) -> Any:
        value = _get(row, "generation", "tokens_per_second")
        if value is None:
            return None
        if _finite(base_speed) and base_speed > 0 and _finite(value):
            return f"{value:,.1f} ({value / base_speed:.2f}x)"
        return _num(value, ",.1f")

    lines = []
    protocol = _protocol(results.get("protocol"))
    if protocol:
        lines += [f"Perplexity protocol: {protocol}.", ""]
    gen = next((r["generation"] for r in models.values() if isinstance(r.get("generation"), dict)), None)
    if gen:
        parts = [f"{gen['new_tokens']} new tokens" if "new_tokens" in gen else None,
                 f"prompt of {gen['prompt_tokens']} tokens" if "prompt_tokens" in gen else None,
                 f"median of {gen['repeats']}" if "repeats" in gen else None,
                 f"on {gen['device']}" if "device" in gen else None,
                 f"{gen['threads']} threads" if gen.get("device") == "cpu" and "threads" in gen else None]
        lines += ["Generation: batch 1, greedy, KV cache, " + ", ".join(p for p in parts if p)
                  + f"; speed relative to {base_label}.", ""]
    items = list(models.items())
    columns = [("model", lambda it: it[0], str),
               ("parameters", lambda it: _get(it[1], "parameters", "total"), _params)]
    columns += [(f"ppl {_short_source(s)}", (lambda it, s=s: _get(it[1], "perplexity", s)), lambda v: _num(v, ",.1f"))
                for s in sources]
    columns.append(("generation tokens/s", lambda it: speed(it[1]), str))
    lines += _column_table(items, columns)
    init, final = models.get("student (initialised)"), models.get("student (distilled)")
    gains = []
    for s in sources:
        a, b = _get(init, "perplexity", s), _get(final, "perplexity", s)
        if _finite(a) and _finite(b) and b > 0:
            gains.append(f"{_short_source(s)} {a / b:,.{0 if a / b >= 100 else 1}f}x")
    if gains:
        lines += ["", "Distillation lowered the student's perplexity by: " + ", ".join(gains) + "."]
    samples = results.get("samples")
    if isinstance(samples, dict) and isinstance(samples.get("prompts"), list):
        labels = [k for k, v in samples.items() if k != "prompts" and isinstance(v, list)]
        lines += ["", "### Sample continuations", ""]
        for i, prompt in enumerate(samples["prompts"]):
            lines += [f"**Prompt:** {prompt}", ""]
            for label in labels:
                if i < len(samples[label]):
                    lines.append(f"- *{label}:* {str(samples[label][i]).strip()}".replace("\n", " "))
            lines.append("")
        lines.pop()
    return lines


def _format_eval_json(results: dict[str, Any]) -> list[str]:
    tasks = [t for t in results.get("tasks") or [] if isinstance(t, dict) and "label" in t]
    rows = [r for r in results["models"] if isinstance(r, dict)]
    if not tasks:  # no task list: take the labels and metrics from the rows
        seen: dict[str, list[str]] = {}
        for row in rows:
            for label, values in (row.get("tasks") or {}).items():
                metrics = seen.setdefault(label, [])
                metrics += [m for m in (values or {}) if m not in metrics and _finite(values[m])]
        tasks = [{"label": label, "metrics": metrics} for label, metrics in seen.items()]
    tokenizers = {r.get("tokenizer") for r in rows if r.get("tokenizer")}
    lines: list[str] = []
    if len(tokenizers) > 1:
        lines += ["Note: these models use different tokenizers, so token-level perplexities are not comparable "
                  "(word- and byte-normalised metrics and accuracies are).", ""]
    for task in tasks:
        label = task["label"]
        metrics = [m for m in (task.get("metrics") or []) if isinstance(m, str)]
        if not metrics:
            metrics = sorted({m for r in rows for m, v in (_get(r, "tasks", label) or {}).items() if _finite(v)})
        lines.append(f"### {label}")
        protocol = _protocol(task.get("protocol"))
        if protocol:
            lines.append(f"Protocol: {protocol}.")
        lines.append("")
        table_rows = [[str(r.get("model", "?"))] + [_metric(m, _get(r, "tasks", label, m)) for m in metrics] for r in rows]
        lines += _table(["model", *metrics], ["l"] + ["r"] * len(metrics), table_rows)
        lines.append("")
    return lines


def _rate(section: dict[str, Any] | None) -> Any:
    """The headline number of a bench section: tokens/s if given, else milliseconds."""
    if not isinstance(section, dict):
        return None
    if _finite(section.get("tokens_per_second")):
        return f"{section['tokens_per_second']:,.1f} tok/s"
    for key in ("ms_per_token", "ms", "milliseconds", "ms_per_call"):
        if _finite(section.get(key)):
            return f"{section[key]:,.2f} ms"
    if _finite(section.get("seconds")):
        return f"{section['seconds'] * 1e3:,.2f} ms"
    return None


def format_bench(results: dict[str, Any]) -> list[str]:
    """Markdown lines for ``lmdistill bench --json``: size, memory and speed per model."""
    models = results.get("models")
    if isinstance(models, dict):
        models = [{"model": k, **v} for k, v in models.items() if isinstance(v, dict)]
    items = [m for m in models or [] if isinstance(m, dict)]
    if not items:
        return ["(benchmark results hold no models)"]
    lines = []
    protocol = _protocol(results.get("protocol"))
    if protocol:
        lines += [f"Protocol: {protocol}.", ""]

    def speedup(item: dict[str, Any]) -> Any:
        s = item.get("speedup")
        if not isinstance(s, dict):
            return None
        parts = [f"{k} {s[k]:.2f}x" for k in ("generation", "prefill", "forward") if _finite(s.get(k))]
        return ", ".join(parts) or None

    columns = [
        ("model", lambda m: m.get("model", "?"), str),
        ("parameters", lambda m: _get(m, "parameters", "total"), _params),
        ("non-embedding", lambda m: _get(m, "parameters", "non_embedding"), _params),
        ("size on disk", lambda m: m.get("size_on_disk_bytes"), _bytes),
        ("peak memory", lambda m: m.get("peak_memory_bytes"), _bytes),
        ("generation tok/s", lambda m: _get(m, "generation", "tokens_per_second"), lambda v: _num(v, ",.1f")),
        ("ms/token", lambda m: _get(m, "generation", "ms_per_token"), lambda v: _num(v, ",.2f")),
        ("prefill", lambda m: _rate(m.get("prefill")), str),
        ("forward", lambda m: _rate(m.get("forward")), str),
        ("speedup", speedup, str),
    ]
    return lines + _column_table(items, columns)


# ---------------------------------------------------------------------------------------
# The report


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


def _throughput(train: list[dict[str, Any]], window: int = THROUGHPUT_WINDOW) -> tuple[float, int] | None:
    """Tokens per second over the last ``window`` steps: tokens / time (not a mean of rates)."""
    tokens = seconds = 0.0
    counted = 0
    for i in range(len(train) - 1, -1, -1):
        if counted >= window:
            break
        row = train[i]
        prev = train[i - 1].get("tokens_seen", 0) if i > 0 else 0
        step_tokens = row.get("tokens_seen", 0) - prev if _finite(row.get("tokens_seen")) and _finite(prev) else None
        rate = row.get("tokens_per_s")
        if not _finite(step_tokens) or step_tokens <= 0 or not _finite(rate) or rate <= 0:
            continue
        tokens += step_tokens
        seconds += step_tokens / rate
        counted += 1
    return (tokens / seconds, counted) if seconds > 0 else None


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
        rate = _throughput(train)
        if rate:
            lines.append(f"- throughput: {rate[0]:,.0f} tokens/s over the last {rate[1]} steps")
        terms = ", ".join(f"{t} {last[t]:.4g}" for t in LOSS_TERMS if _finite(last.get(t)))
        lines.append(f"- last step: loss {_num(last.get('loss'), '.4g')}" + (f" ({terms})" if terms else "")
                     + f", lr {_num(last.get('lr'), '.3g')}, grad norm {_num(last.get('grad_norm'), '.3g')}")
        clip = _get(config, "train", "max_grad_norm")
        norms = [r["grad_norm"] for r in train if _finite(r.get("grad_norm"))]
        if _finite(clip) and clip > 0 and norms:
            clipped = sum(n > clip for n in norms)
            lines.append(f"- gradient norm above the clipping threshold ({clip:g}) on {clipped:,} of {len(norms):,} steps")
    else:
        lines.append("- no training steps logged yet")
    if val:
        first, last = val[0], val[-1]
        text = f"- validation perplexity: {_num(first['val_ppl'], ',.2f')} at step {first['step']:,}"
        if last is not first:
            text += f" → {_num(last['val_ppl'], ',.2f')} at step {last['step']:,} ({last.get('tokens_seen', 0):,} tokens)"
        tokens = last.get("val_tokens")
        if _finite(tokens):
            text += f"; {tokens:,} validation tokens scored each time"
        lines.append(text)
    return lines


def _join(lines: list[str]) -> str:
    """Lines as Markdown text, with runs of blank lines (outside code blocks) cut to one."""
    out: list[str] = []
    fenced = False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line == "" and (not out or out[-1] == ""):
            continue
        out.append(line)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


class ReportError(LmdistillError, FileNotFoundError):
    """A folder that holds no run to report on. Also a FileNotFoundError, which it was before the
    tool had its own error classes, so callers catching that keep working."""


def write_report(run_dir: Path, eval_results: dict | None = None, bench_results: dict | None = None) -> Path:
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png from whatever the run directory holds.

    Works on a finished run, one still going, and an interrupted one (no student/, no
    summary.json, torn last metrics line). ``eval_results`` (either evaluation shape, see
    :func:`format_eval`) replaces RUN_DIR/eval.json; ``bench_results`` replaces
    RUN_DIR/bench.json. The demo's RUN_DIR/results.json is included when present, unless
    ``eval_results`` is itself in the demo's shape. Returns the path of report.md.
    """
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise ReportError(f"{run.root} is not a folder; pass a run directory written by lmdistill distill")
    if not run.config.is_file() and not run.metrics.is_file():
        raise ReportError(f"{run.root} holds no config.yaml or metrics.jsonl; pass a run directory "
                                f"written by lmdistill distill")
    config_text = run.config.read_text() if run.config.is_file() else None
    config = _read_yaml(run.config) if config_text else {}
    rows = read_metrics(run.metrics)
    lines_in_file = sum(1 for line in run.metrics.read_text().splitlines() if line.strip()) if run.metrics.is_file() else 0
    skipped = lines_in_file - len(rows)
    train, val = split_rows(rows)
    status = run_status(run.root)

    plots = plot_metrics(rows, run.root / "plots", run_name=run.root.name, config=config)
    written = {p.name for p in plots}

    out = [f"# lmdistill run: `{run.root}`", ""]
    out += _status_lines(run.root, status, train, val)
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

    evals: list[dict[str, Any]] = []
    if eval_results is not None:
        evals.append(eval_results)
    elif (found := _read_json(run.root / "eval.json")) is not None:
        evals.append(found)
    if not (eval_results is not None and isinstance(eval_results.get("models"), dict)):
        if (demo := _read_json(run.root / "results.json")) is not None:
            evals.append(demo)
    for results in evals:
        out += ["", "## Evaluation", ""]
        out += format_eval(results)
    bench = bench_results if bench_results is not None else _read_json(run.root / "bench.json")
    if bench is not None:
        out += ["", "## Size and speed", ""]
        out += format_bench(bench)

    out += ["", "## Configuration", ""]
    if config_text is not None:
        out += ["`config.yaml`, as resolved for this run:", "", "```yaml", config_text.rstrip("\n"), "```"]
    else:
        out.append("No config.yaml in the run directory.")
    write_text_atomic(run.report, _join(out))
    return run.report

"""PNG plots of a run's metrics, drawn with matplotlib's object API on the Agg canvas (no
pyplot state, no display needed), 7 x 4 inches at 120 dpi, so each PNG is 840 x 480 pixels."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ..atomic import FILE_MODE
from ..markdown import finite
from .run import LOSS_TERMS, split_rows, term_weight

FIGSIZE = (7.0, 4.0)
DPI = 120
PLOT_FILES = {"loss": "loss.png", "lr": "lr.png", "val_ppl": "val_ppl.png", "grad_norm": "grad_norm.png"}
PLOT_TITLES = {"loss": "Loss terms", "lr": "Learning rate", "val_ppl": "Validation perplexity",
               "grad_norm": "Gradient norm"}


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
    pairs = [(r[x], r[y]) for r in rows if finite(r.get(x)) and finite(r.get(y))]
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
                weight = term_weight(term, loss_cfg)
                _plot_lines(ax, xs, ys, term + (f" \u00d7{weight:g}" if finite(weight) else ""))
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
        if finite(clip) and clip > 0:
            ax.axhline(clip, color="gray", linestyle="--", linewidth=1, label=f"clip at {clip:g}")
        if _wide_range(norm + ([clip] if finite(clip) and clip > 0 else [])):
            ax.set_yscale("log")
        ax.legend(loc="best", fontsize="small")
        written.append(_save(fig, out_dir / PLOT_FILES["grad_norm"]))
    return written

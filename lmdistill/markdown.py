"""Markdown tables for the result renderers (evaluation, bench, report).

A bottom-layer module (it imports nothing of lmdistill), so that the renderers in
``evaluate/`` and ``measure/`` and the report can share one way of drawing a table. Values
that are missing or not finite numbers show as ``-``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

MISSING = "-"

# (header, getter of the value from one row's item, formatter of a present value)
Column = tuple[str, Callable[[Any], Any], Callable[[Any], str]]


def finite(value: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number(value: Any, fmt: str = ",.2f", suffix: str = "") -> str:
    return f"{value:{fmt}}{suffix}" if finite(value) else MISSING


def get(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...`` or None when any level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def protocol_text(value: Any) -> str | None:
    """A protocol as one sentence without its final period (None when there is none)."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in value.items())
    return str(value).rstrip(".")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table, the first column left-aligned and the others (numbers) right-aligned."""
    return ["| " + " | ".join(_cell(h) for h in header) + " |",
            "|---|" + "---:|" * (len(header) - 1),
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)]


def column_table(items: Sequence[Any], columns: Sequence[Column]) -> list[str]:
    """One row per item; a column whose getter finds nothing for any item is left out."""
    kept = [(h, read, fmt) for h, read, fmt in columns if any(read(it) is not None for it in items)]
    rows = [[fmt(value) if (value := read(it)) is not None else MISSING for _, read, fmt in kept] for it in items]
    return table([h for h, _, _ in kept], rows)


def join(lines: list[str]) -> str:
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

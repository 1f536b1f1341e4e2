"""JSON-lines reading shared by the data sources and the evaluation datasets."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmdistill.data.errors import DataError


def json_objects(lines: Iterable[str], path: Path, expected: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of ``path``; a line that is not a JSON
    object raises a :class:`DataError` naming the file, the line and ``expected`` (how each
    line should look, e.g. ``'one JSON object such as {"text": "..."}'``)."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({err.msg}); {expected}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {lineno}: a JSON {type(row).__name__}, not an object; {expected}")
        yield lineno, row

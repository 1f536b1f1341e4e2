"""The bundled public-domain corpora and their fixed train/validation/test split.

The split is the one defined in ``corpora/README.md``; every number the project reports on
these corpora uses it, so it is written out here as data, not derived from a seed.
"""

from __future__ import annotations

import json
import lzma
from dataclasses import dataclass
from pathlib import Path

from lmdistill.data.errors import DataError

CORPORA: tuple[str, ...] = ("austen", "moby_dick", "sotu")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"

# README: austen test = persuasion, validation = northangerabbey.
_AUSTEN = {"persuasion": "test", "northangerabbey": "validation"}
# README: moby_dick test = chapters 126-135 + epilogue, validation = chapters 116-125.
_MOBY = {f"chapter_{n}": "test" for n in range(126, 136)}
_MOBY |= {f"chapter_{n}": "validation" for n in range(116, 126)}
_MOBY["epilogue"] = "test"


@dataclass(frozen=True)
class Document:
    """One document of a bundled corpus (a novel, a chapter, an address)."""

    id: str
    title: str
    text: str


def corpus_path(name: str) -> Path:
    """The ``.jsonl.xz`` file of a bundled corpus."""
    _check_name(name)
    return CORPORA_DIR / f"{name}.jsonl.xz"


def split_of(name: str, row: dict) -> str:
    """The README split of one corpus row (``id`` and, for sotu, ``year``)."""
    if name == "austen":
        return _AUSTEN.get(row["id"], "train")
    if name == "moby_dick":
        return _MOBY.get(row["id"], "train")
    year = int(row["year"])
    if year >= 2001:
        return "test"
    if year >= 1990:
        return "validation"
    return "train"


def corpus_documents(name: str, split: str) -> list[Document]:
    """The documents of corpus ``name`` in ``split``, in file order."""
    _check_name(name)
    check_split(split)
    path = corpus_path(name)
    docs = []
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for row in map(json.loads, f):
            if split_of(name, row) == split:
                docs.append(Document(id=row["id"], title=row["title"], text=row["text"]))
    return docs


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _check_name(name: str) -> None:
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; bundled corpora: {', '.join(CORPORA)} (or 'all')")

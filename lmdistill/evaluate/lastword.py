"""A LAMBADA-style last-word set built from the bundled corpora's test split, shipped as data.

LAMBADA itself cannot be fetched on an offline machine, so the package ships a set in exactly
the ``lambada_openai`` format (``{"text": "<context> <target>"}``, the target being the last
space-separated word) built from the test documents of the bundled public-domain corpora,
plus ``corpus`` and ``doc_id`` fields saying where each passage comes from. Unlike LAMBADA the
passages are not filtered for being guessable only from a long context; they measure
last-word prediction on held-out prose, teacher and student side by side.

Construction (:func:`build_lastword`, deterministic, no randomness beyond the seed):

1. Each test document (``corpus_documents(name, "test")`` for each of ``CORPORA``) is split on
   whitespace into words, and into sentences: a word ends a sentence when it ends with ``.``,
   ``!`` or ``?`` (so the mark is followed by a space/newline or the end of the text), except
   when it is a known abbreviation (``Mr.``, ``Mrs.``, ``Dr.``, ``St.``, ...), an initial or an
   initialism (``W.``, ``U.S.``, ``p.m.``), or the next word starts with a lower-case letter.
2. Candidates: for each sentence, the shortest run of consecutive whole sentences ending with
   it that has at least ``min_words`` words; kept when it has at most ``max_words`` words and
   its target (the last word with trailing punctuation removed) is purely alphabetic ASCII
   and at least 3 letters long.
3. Selection per corpus: candidates are ordered by ``sha256(f"{seed}|{corpus}|{doc_id}|{first
   sentence index}")`` and taken greedily, skipping any that overlaps (shares a sentence with)
   one already taken, until ``per_corpus`` are taken (fewer if the corpus runs out).
4. The passage text is its words joined by single spaces (newlines become spaces) without the
   final punctuation: ``context + " " + target``. Rows are written in corpus, document and
   position order.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from lmdistill.data.corpora import CORPORA, corpus_documents
from lmdistill.evaluate.datasets import read_lambada

LASTWORD_FILE = Path(__file__).resolve().parent / "data" / "lastword_test.jsonl"

_ABBREVIATIONS = frozenset(
    "mr mrs ms messrs mme mlle dr st jr sr rev hon esq capt col gen lt sgt maj cmdr adm gov sen rep "
    "pres prof mt ft vol vs etc cf viz inc co corp ltd bros jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_TRAILING_PUNCT = re.compile(r"[^A-Za-z0-9]+$")


def _ends_sentence(word: str, next_word: str | None) -> bool:
    if not word.endswith((".", "!", "?")):
        return False
    if next_word is not None and next_word[:1].islower():
        return False
    if word.endswith("."):
        core = word.rstrip(".").lstrip("\"'([_")
        if core.lower() in _ABBREVIATIONS or "." in core or (len(core) == 1 and core.isalpha()):
            return False
    return True


def _sentences(text: str) -> list[list[str]]:
    """The document's sentences, each a list of whitespace-separated words (rule 1 above)."""
    words = text.split()
    out: list[list[str]] = []
    current: list[str] = []
    for i, word in enumerate(words):
        current.append(word)
        if _ends_sentence(word, words[i + 1] if i + 1 < len(words) else None):
            out.append(current)
            current = []
    return out  # trailing words after the last sentence end never end a passage


def _target(word: str) -> str | None:
    """The last word without its trailing punctuation, if it is a usable target (rule 2)."""
    target = _TRAILING_PUNCT.sub("", word)
    if len(target) >= 3 and target.isascii() and target.isalpha():
        return target
    return None


def _candidates(sentences: list[list[str]], min_words: int, max_words: int) -> list[tuple[int, int]]:
    """(first, last) sentence indices of each candidate passage (rule 2)."""
    out = []
    for last, sentence in enumerate(sentences):
        if _target(sentence[-1]) is None:
            continue
        count, first = 0, last
        while first >= 0:
            count += len(sentences[first])
            if count >= min_words:
                break
            first -= 1
        if first >= 0 and count <= max_words:
            out.append((first, last))
    return out


def build_lastword(min_words: int = 60, max_words: int = 120, per_corpus: int = 100, seed: int = 0) -> list[dict]:
    """The last-word set: ``[{"text", "corpus", "doc_id"}, ...]`` (see the module docstring).

    ``text`` is in the ``lambada_openai`` format: ``text.rsplit(" ", 1)`` gives the context and
    the target word.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    rows: list[dict] = []
    for corpus in CORPORA:
        pool = []
        for doc_index, doc in enumerate(corpus_documents(corpus, "test")):
            sentences = _sentences(doc.text)
            for first, last in _candidates(sentences, min_words, max_words):
                key = hashlib.sha256(f"{seed}|{corpus}|{doc.id}|{first}".encode()).hexdigest()
                pool.append((key, doc_index, doc.id, first, last, sentences))
        pool.sort(key=lambda c: c[0])
        taken: dict[int, set[int]] = {}
        chosen = []
        for _, doc_index, doc_id, first, last, sentences in pool:
            if len(chosen) >= per_corpus:
                break
            used = taken.setdefault(doc_index, set())
            span = set(range(first, last + 1))
            if used & span:
                continue
            used |= span
            words = [w for s in sentences[first : last + 1] for w in s]
            text = " ".join(words[:-1] + [_target(words[-1])])
            chosen.append((doc_index, first, {"text": text, "corpus": corpus, "doc_id": doc_id}))
        rows.extend(row for _, _, row in sorted(chosen, key=lambda c: (c[0], c[1])))
    return rows


def to_jsonl(rows: list[dict]) -> str:
    """The shipped file's exact text for ``rows``: one compact JSON object a line, UTF-8."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def lastword_path() -> Path:
    """The shipped jsonl (regenerate it with ``scripts/build_lastword.py``)."""
    return LASTWORD_FILE


def load_lastword() -> list[dict]:
    """The shipped set, read and checked with :func:`~lmdistill.evaluate.datasets.read_lambada`."""
    return read_lambada(lastword_path())

"""Readers for the standard LM benchmarks, from their official files on a local path.

Nothing here downloads: WikiText, Penn Treebank, enwik8/text8, LAMBADA and HellaSwag are read
from the files their authors (or the Hugging Face hub) distribute, in those exact layouts.
Every malformed input raises :class:`~lmdistill.data.errors.DataError` naming the file (and
line) and the fix.

Rules, in one place (each function's docstring has the details):

- **WikiText** articles are split exactly as ``EleutherAI/wikitext_document_level`` (the
  dataset lm-evaluation-harness's ``wikitext`` task reads) splits the raw files: a line that,
  after ``"= = =" -> "==="``, ``"= =" -> "=="`` and ``strip()``, starts with ``"= "`` and ends
  with ``" ="`` (a level-1 heading `` = Title = ``) starts a new article; level-2+ headings
  (`` = = Section = = ``) do not. Text before the first heading (the files' leading blank
  line) is dropped when it is only whitespace. Lines are kept verbatim (WikiText's leading
  spaces included) and joined with ``"\\n"``.
- **PTB** (``ptb.{train,valid,test}.txt``, Mikolov's ``simple-examples`` layout, one sentence a
  line): the whole split is ONE document, each line stripped, blank lines dropped, joined with
  ``"\\n"`` (the newline stands where Mikolov's setup puts ``<eos>``).
- **enwik8 / text8**: a 10^8-byte file (or ``enwik8.zip`` / ``text8.zip``); train = the first
  90,000,000 bytes, validation = the next 5,000,000, test = the last 5,000,000 (the split of
  Mikolov et al. 2012 / Graves 2013, as in awd-lstm-lm's ``prep_enwik8.py``). A file of another
  size gets the same 90/5/5 proportions (``n*90//100``, ``n*95//100``) and a warning.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from lmdistill.data.errors import DataError
from lmdistill.data.jsonl import json_objects

ENWIK8_BYTES = 100_000_000
"""Size of enwik8 and of text8; the standard split is 90M / 5M / 5M bytes."""

_SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "test": "test"}


def _file_split(split: str) -> str:
    """The split name as the official files spell it (``wiki.valid.raw``, ``ptb.valid.txt``)."""
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise DataError(f"unknown split {split!r}; valid splits: train, validation (or valid), test") from None


def _hf_split(split: str) -> str:
    """The split name as Hugging Face parquet exports spell it."""
    return {"train": "train", "valid": "validation", "test": "test"}[_file_split(split)]


def _read_text(path: Path) -> str:
    """A UTF-8 text file, read with universal newlines (as ``open(..., encoding="utf-8")``)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 ({err.reason}); pass the raw text file as distributed"
        ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}); check the path and its permissions") from None


def _parquet_columns(files: list[Path], wanted: tuple[str, ...]) -> tuple[str, list[Any]]:
    """The first of ``wanted`` columns found in every parquet file, concatenated in file order."""
    import pyarrow.parquet as pq

    column, values = None, []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(f"{file}: not a readable parquet file ({err}); check or re-download it") from None
        names = table.column_names
        found = next((c for c in wanted if c in names), None)
        if found is None or (column is not None and found != column):
            raise DataError(
                f"{file}: no {' or '.join(repr(c) for c in wanted)} column (found: {', '.join(names) or 'none'}); "
                "pass the dataset's own parquet export"
            )
        column = found
        values.extend(table.column(found).to_pylist())
    assert column is not None
    return column, values


def _split_parquets(folder: Path, split: str) -> list[Path]:
    """Hugging Face parquet shards of ``split`` in ``folder``: ``test-00000-of-00001.parquet``
    (datasets' converter) or ``wikitext-2-raw-v1-test.parquet`` (EleutherAI's export)."""
    hf = _hf_split(split)
    names = {hf, _file_split(split)}
    files = {p for n in names for p in folder.glob(f"{n}-*.parquet")}
    files |= {p for n in names for p in folder.glob(f"*-{n}.parquet")}
    return sorted(files)


# --------------------------------------------------------------------------------------------
# WikiText


def _wikitext_articles(text: str) -> list[str]:
    """EleutherAI/wikitext_document_level's ``_generate_examples``, on the file's text.

    Same logic as the dataset script (https://huggingface.co/datasets/EleutherAI/
    wikitext_document_level, ``wikitext_document_level.py``): split on ``"\\n"``; a level-1
    heading line starts a new page; a page is yielded before a heading only when it is not
    whitespace-only (this drops the files' leading `` `` line); the last page is always yielded.
    """
    pages: list[str] = []
    ret: list[str] = []
    for line in text.split("\n"):
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.strip().endswith(" ="):
            page = "\n".join(ret)
            if page.strip():
                pages.append(page)
            ret = []
        ret.append(line)
    pages.append("\n".join(ret))
    return pages


def wikitext_documents(path: Path, split: str = "test") -> list[str]:
    """The articles of a WikiText split, exactly as ``EleutherAI/wikitext_document_level``.

    ``path`` is one of:

    - a folder of the official raw release (``wikitext-2-raw/`` or ``wikitext-103-raw/``) holding
      ``wiki.{train,valid,test}.raw`` (``wiki.{split}.tokens`` of the non-raw release is read
      when no ``.raw`` file is there);
    - a folder of Hugging Face parquet shards: ``Salesforce/wikitext`` (``{split}-*.parquet``,
      column ``text``, one line per row with its ``"\\n"``, blank lines stored as ``""``, which
      are restored as WikiText's `` `` blank lines) or ``EleutherAI/wikitext_document_level``
      (``*-{split}.parquet``, column ``page``, one article per row, returned as is);
    - a single ``.raw`` / ``.tokens`` / ``.txt`` / ``.parquet`` file (``split`` is then ignored).

    Articles split as described in this module's docstring; the last article is returned even
    when it is empty, as the dataset does. Feed each article to :func:`wikitext_detokenizer` to
    get the text lm-evaluation-harness scores, and count words on the article *before*
    detokenising (``len(re.split(r"\\s+", page))``), as the harness does.
    """
    path = Path(path)
    if path.is_dir():
        name = _file_split(split)
        for candidate in (path / f"wiki.{name}.raw", path / f"wiki.{name}.tokens"):
            if candidate.is_file():
                return _wikitext_from_text(candidate, _read_text(candidate))
        shards = _split_parquets(path, split)
        if shards:
            return _wikitext_from_parquet(shards)
        raise DataError(
            f"{path}: no WikiText {split!r} split here (looked for wiki.{name}.raw, wiki.{name}.tokens, "
            f"{_hf_split(split)}-*.parquet and *-{_hf_split(split)}.parquet); pass the unzipped "
            "wikitext-103-raw/ (or wikitext-2-raw/) folder, or a Hugging Face parquet folder"
        )
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass the unzipped wikitext-103-raw/ folder or a wiki.*.raw file")
    if path.suffix == ".parquet":
        return _wikitext_from_parquet([path])
    return _wikitext_from_text(path, _read_text(path))


def _wikitext_from_text(path: Path, text: str) -> list[str]:
    if not text.strip():
        raise DataError(f"{path}: empty (no text); pass the WikiText file as distributed")
    return _wikitext_articles(text)


def _wikitext_from_parquet(files: list[Path]) -> list[str]:
    column, values = _parquet_columns(files, ("page", "text"))
    where = files[0] if len(files) == 1 else files[0].parent
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(
                f"{where}, row {row}: column {column!r} holds {type(value).__name__}, not a string; "
                "pass the dataset's own parquet export"
            )
    if column == "page":
        if not values:
            raise DataError(f"{where}: no rows; pass the dataset's own parquet export")
        return list(values)
    # Salesforce/wikitext: one row per line, "\n" kept, blank lines (" \n" in the files) stored
    # as "" by the datasets script (``yield idx, {"text": row if row.strip() else ""}``).
    text = "".join(v if v else " \n" for v in values)
    return _wikitext_from_text(where, text)


def wikitext_detokenizer(text: str) -> str:
    """Undo WikiText's tokenisation; lm-evaluation-harness 0.4.13's ``wikitext_detokenizer``.

    Same replacements in the same order as ``lm_eval/tasks/wikitext/preprocess_wikitext.py``
    (which takes ``doc["page"]``; this takes the page text): ``s '`` -> ``s'``; `` @-@ `` ->
    ``-``, `` @,@ `` -> ``,``, `` @.@ `` -> ``.``; space before ``: ; . ! ? ,`` removed; inner
    spaces of ``()``, ``[]``, ``{}``, ``""`` and ``''`` pairs removed; ``= = =`` -> ``===`` etc.;
    `` ° `` -> ``°``; spaces at line ends/starts removed; `` N `` -> `` 1 ``; `` 's`` -> ``'s``.
    """
    string = text
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


# --------------------------------------------------------------------------------------------
# Penn Treebank


def ptb_documents(path: Path, split: str = "test") -> list[str]:
    """A Penn Treebank split as ONE document: ``[text]``.

    ``path`` is a folder holding ``ptb.{train,valid,test}.txt`` (Mikolov's ``simple-examples/
    data`` layout, also in ``ptb_text_only``), a folder of Hugging Face ``ptb_text_only``
    parquet shards (column ``sentence``), or a single ``.txt`` / ``.parquet`` file (``split``
    ignored). Each line (one sentence, lower-case, ``<unk>`` for rare words, ``N`` for numbers,
    most punctuation removed) is stripped of its surrounding spaces, blank lines are dropped,
    and the lines are joined with ``"\\n"`` into a single document, so a model is scored on the
    split as one running text, the newline marking each sentence end (``<eos>`` in the
    classic word-level setup; its 82,430 test words + 3,761 ``<eos>`` are the usual word count).
    """
    path = Path(path)
    if path.is_dir():
        name = _file_split(split)
        candidate = path / f"ptb.{name}.txt"
        if candidate.is_file():
            path = candidate
        else:
            shards = _split_parquets(path, split)
            if not shards:
                raise DataError(
                    f"{path}: no PTB {split!r} split here (looked for ptb.{name}.txt, {_hf_split(split)}-*.parquet); "
                    "pass the simple-examples/data folder or a ptb_text_only parquet folder"
                )
            return [_ptb_join(shards[0].parent, _parquet_columns(shards, ("sentence",))[1])]
    elif path.suffix == ".parquet":
        return [_ptb_join(path, _parquet_columns([path], ("sentence",))[1])]
    return [_ptb_join(path, _read_text(path).split("\n"))]


def _ptb_join(where: Path, lines: list[Any]) -> str:
    kept = []
    for lineno, line in enumerate(lines, 1):
        if not isinstance(line, str):
            raise DataError(f"{where}, line {lineno}: holds {type(line).__name__}, not text; pass the PTB text files")
        if line.strip():
            kept.append(line.strip())
    if not kept:
        raise DataError(f"{where}: empty (no sentences); pass ptb.test.txt (or the split you need) as distributed")
    return "\n".join(kept)


_PTB_CONTRACTION = re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b")


def ptb_detokenizer(text: str) -> str:
    """Light, GPT-2-paper-style detokenisation of PTB text (reversible in spirit, never lossy).

    Only the split clitics are rejoined to their word: `` n't`` -> ``n't`` (``do n't`` ->
    ``don't``), `` 's`` / `` 're`` / `` 've`` / `` 'm`` / `` 'll`` / `` 'd`` -> attached
    (``it 's`` -> ``it's``), and spaces at line starts/ends are removed. Everything else is
    kept as is: ``<unk>`` (the dataset's own out-of-vocabulary word), ``N`` (its number
    placeholder), ``$``, lower case and the ``"\\n"`` sentence ends. Word counts for word-level
    perplexity should be taken on the text before detokenising.
    """
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _PTB_CONTRACTION.sub(r"\1", text)


# --------------------------------------------------------------------------------------------
# enwik8 / text8


def byte_corpus(path: Path, split: str = "test", name: str = "enwik8") -> bytes:
    """The bytes of one split of enwik8 or text8.

    ``path`` is the raw file (``enwik8``, ``text8``), its zip as distributed by Matt Mahoney
    (``enwik8.zip`` holding ``enwik8``; ``text8.zip`` holding ``text8``), or a folder holding
    either. The standard split of a 100,000,000-byte file: train = bytes [0, 90M), validation =
    [90M, 95M), test = [95M, 100M). A file of another size is split in the same proportions
    (train = ``[0, n*90//100)``, validation = ``[n*90//100, n*95//100)``, test = the rest) with
    a warning, since its numbers are then not comparable with published ones. text8 must hold
    only ``a-z`` and spaces.
    """
    if name not in ("enwik8", "text8"):
        raise DataError(f"unknown byte corpus {name!r}; use 'enwik8' or 'text8'")
    which = _file_split(split)
    path = Path(path)
    if path.is_dir():
        found = next((p for p in (path / name, path / f"{name}.zip") if p.is_file()), None)
        if found is None:
            raise DataError(f"{path}: holds neither {name} nor {name}.zip; pass the folder or file you downloaded")
        path = found
    data = _read_bytes_member(path, name)
    n = len(data)
    if n == 0:
        raise DataError(f"{path}: empty; pass the {name} file as distributed ({ENWIK8_BYTES:,} bytes)")
    if n != ENWIK8_BYTES:
        warnings.warn(
            f"{path}: {n:,} bytes, not the {ENWIK8_BYTES:,} of {name}; splitting it 90/5/5 in proportion, "
            "so the numbers are not comparable with published ones",
            stacklevel=2,
        )
    if name == "text8":
        stray = data.translate(None, b"abcdefghijklmnopqrstuvwxyz ")
        if stray:
            at = next(i for i, b in enumerate(data) if b not in b"abcdefghijklmnopqrstuvwxyz ")
            raise DataError(
                f"{path}: byte {at} is {data[at:at + 1]!r}; text8 holds only a-z and spaces "
                "(is this enwik8? pass name='enwik8')"
            )
    train_end, valid_end = n * 90 // 100, n * 95 // 100
    return {"train": data[:train_end], "valid": data[train_end:valid_end], "test": data[valid_end:]}[which]


def _read_bytes_member(path: Path, name: str) -> bytes:
    try:
        if not zipfile.is_zipfile(path):
            return path.read_bytes()
        with zipfile.ZipFile(path) as zf:
            members = [i.filename for i in zf.infolist() if not i.is_dir()]
            member = name if name in members else (members[0] if len(members) == 1 else None)
            if member is None:
                raise DataError(
                    f"{path}: zip has no member {name!r} (found: {', '.join(members) or 'none'}); "
                    f"pass {name}.zip as distributed or the unzipped {name}"
                )
            return zf.read(member)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; pass the {name} file or {name}.zip") from None
    except zipfile.BadZipFile as err:
        raise DataError(f"{path}: corrupt zip ({err}); re-download {name}.zip") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}); check the path and its permissions") from None


# --------------------------------------------------------------------------------------------
# LAMBADA and HellaSwag (JSON lines)


def _json_lines(path: Path, what: str, example: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and line."""
    path = Path(path)
    text = _read_text(path)
    rows = list(json_objects(io.StringIO(text), path, f"each line of a {what} file must be one JSON object such as "
                                                       f"{example}"))
    if not rows:
        raise DataError(f"{path}: empty (no JSON lines); pass the {what} .jsonl file as distributed")
    return rows


def read_lambada(path: Path) -> list[dict]:
    """The examples of a LAMBADA jsonl (``lambada_openai``'s ``lambada_test.jsonl`` format).

    Each line is ``{"text": "..."}``; the target is the last space-separated word, the context
    everything before it, exactly as lm-evaluation-harness's ``lambada_openai`` task
    (``text.split(' ')[:-1]`` / ``' ' + text.split(' ')[-1]``). Blank lines are skipped; rows are
    returned as read (extra fields kept). A row whose ``text`` is missing, not a string, empty,
    or not at least two space-separated words (non-empty context and target) is an error.
    """
    path = Path(path)
    out = []
    for lineno, row in _json_lines(path, "LAMBADA", '{"text": "... context ... target"}'):
        if "text" not in row:
            raise DataError(
                f'{path}, line {lineno}: no "text" field (found: {", ".join(row) or "none"}); each LAMBADA '
                'line needs {"text": "<context> <target word>"}'
            )
        text = row["text"]
        if not isinstance(text, str):
            raise DataError(f'{path}, line {lineno}: "text" is {type(text).__name__}, not a string; store the passage as a JSON string')
        context, _, target = text.rpartition(" ")
        if not text.strip() or not context.strip() or not target:
            raise DataError(
                f'{path}, line {lineno}: "text" must be a context and a final target word separated by a '
                f"space (got {text[:60]!r}); fix or drop this line"
            )
        out.append(row)
    return out


_HELLASWAG_STRINGS = ("ctx_a", "ctx_b", "ctx", "activity_label")


def read_hellaswag(path: Path) -> list[dict]:
    """The examples of a HellaSwag jsonl in the official format (``hellaswag_val.jsonl``).

    Each line holds ``ind``, ``activity_label``, ``ctx_a``, ``ctx_b``, ``ctx``, ``endings`` (4
    strings in the release; at least 2 accepted), ``label``, ``split``, ``split_type``,
    ``source_id``. ``ctx_a``, ``ctx_b`` (may be ``""``), ``ctx``, ``activity_label`` must be
    strings; ``label`` an int or a string of one (Hugging Face's ``Rowan/hellaswag`` stores
    ``"0"``) with ``0 <= label < len(endings)``; it is returned as an ``int``. Other fields are
    kept. The official test file has no labels: use the validation file.
    """
    path = Path(path)
    example = '{"ctx_a": ..., "ctx_b": ..., "ctx": ..., "endings": [4 strings], "label": 0, "activity_label": ...}'
    out = []
    for lineno, row in _json_lines(path, "HellaSwag", example):
        where = f"{path}, line {lineno}"
        missing = [k for k in (*_HELLASWAG_STRINGS, "endings", "label") if k not in row]
        if missing:
            hint = " (the official test file has no labels; use hellaswag_val.jsonl)" if missing == ["label"] else ""
            raise DataError(
                f"{where}: missing field(s) {', '.join(missing)}{hint}; each line needs ctx_a, ctx_b, ctx, "
                "endings, label and activity_label"
            )
        for key in _HELLASWAG_STRINGS:
            if not isinstance(row[key], str):
                raise DataError(f'{where}: "{key}" is {type(row[key]).__name__}, not a string; fix this line')
        endings = row["endings"]
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            raise DataError(
                f'{where}: "endings" must be a list of at least 2 strings (got {json.dumps(endings)[:80]}); fix this line'
            )
        label = row["label"]
        if isinstance(label, str) and re.fullmatch(r"\s*\d+\s*", label):
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f'{where}: "label" is {json.dumps(row["label"])}, not an integer; give the index of the correct ending')
        if not 0 <= label < len(endings):
            raise DataError(
                f'{where}: "label" {label} is out of range for {len(endings)} endings (0..{len(endings) - 1}); '
                "give the index of the correct ending"
            )
        out.append({**row, "label": label})
    return out

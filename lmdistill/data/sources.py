"""Text sources: where the documents to tokenise come from, and how they are split.

A SOURCE spec is one of:

- ``corpus:NAME`` with NAME ``austen``, ``moby_dick``, ``sotu`` or ``all``: a bundled corpus,
  split as its README says;
- a local ``.txt``, ``.jsonl``, ``.jsonl.xz`` or ``.parquet`` file, or a folder of such files
  (searched recursively; hidden files and other extensions are ignored);
- ``hf:NAME[:CONFIG]``: a Hugging Face dataset (needs the hub), field ``text``.

Documents of local files:

- ``.txt``: cut into documents at blank lines, each about ``TXT_PIECE_CHARS`` (10,000)
  characters, so that one big text file can be split at all; a stretch of more than four
  times that without a blank line is cut at a line end.
- ``.jsonl`` / ``.jsonl.xz``: one JSON object a line with a string field ``text``.
- ``.parquet``: the string column ``text``, one row a document.

Documents that are empty or only whitespace are skipped everywhere.

Split rule for local data:

1. Split files. If a folder holds files whose name without extension is ``train``,
   ``validation`` (or ``valid``/``val``) or ``test`` -- or that sit under a top-level
   subfolder of that name -- those files are the splits. A folder must not mix such files
   with others (that would leave it unclear where the others go).
2. Otherwise, by hash. Each document goes to a split by the sha256 of its text: bucket
   ``h mod 100`` below 90 is train, below 95 validation, the rest test. The rule depends on
   the content only, so that reordering or adding files moves no existing document, and
   identical documents never straddle two splits. When a split comes out empty (a small
   source), the document with the smallest hash moves into it from the biggest split that can
   spare one; splits are filled in the order train, validation, test, so one document goes
   to train, two to train and validation.

A requested split that is still empty raises :class:`DataError` naming the fix.

Hugging Face datasets use their own ``train``/``validation``/``test`` splits (``valid``,
``val`` or ``dev`` for validation); a missing validation or test split is carved out of
``train`` by the same content hash (without the small-source fix-ups).
"""

from __future__ import annotations

import abc
import hashlib
import json
import lzma
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from lmdistill.data.corpora import CORPORA, SPLITS, check_split, corpus_documents, corpus_path
from lmdistill.data.errors import DataError
from lmdistill.data.jsonl import json_objects
from lmdistill.models.hub import hub_reachable

TXT_PIECE_CHARS = 10_000
# Bump when the document or split rules change, so that prepared caches are rebuilt.
SPLIT_RULE_VERSION = 1
SUFFIXES: tuple[str, ...] = (".jsonl.xz", ".jsonl", ".txt", ".parquet")
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}
_SPEC_HELP = (
    "use corpus:NAME (NAME in " + ", ".join(CORPORA) + ", all), hf:NAME[:CONFIG], or a path to a "
    + "/".join(SUFFIXES)
    + " file or a folder of them"
)


class Source(abc.ABC):
    """A parsed SOURCE spec: its documents per split and a fingerprint of its inputs."""

    spec: str

    @abc.abstractmethod
    def documents(self, split: str) -> Iterator[str]:
        """The texts of ``split``; raises DataError at once when the split would be empty."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A sha256 hex digest that changes when the inputs (or the split rule) change."""

    def validate(self) -> None:
        """Read what is cheap to read, so that bad input fails before tokenising starts."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def hash_split(text: str) -> int:
    """The 0..99 bucket of a document: its split without fix-ups (<90 train, <95 validation)."""
    return _text_key(text) % 100


def _text_key(text: str) -> int:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


def _bucket_split(bucket: int) -> int:
    return 0 if bucket < 90 else 1 if bucket < 95 else 2


# ---------------------------------------------------------------------------------------
# Bundled corpora


class CorpusSource(Source):
    """One or all of the bundled corpora, with the README's fixed split."""

    def __init__(self, spec: str, names: tuple[str, ...]) -> None:
        self.spec = spec
        self.names = names

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        return (doc.text for name in self.names for doc in corpus_documents(name, split))

    def fingerprint(self) -> str:
        files = [(name, corpus_path(name).stat().st_size) for name in self.names]
        return _digest({"kind": "corpus", "files": files, "rule": SPLIT_RULE_VERSION})


# ---------------------------------------------------------------------------------------
# Local files


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _stem(path: Path) -> str:
    suffix = _suffix(path) or ""
    return path.name[: len(path.name) - len(suffix)].lower()


def _open_text(path: Path):
    if path.name.lower().endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_txt(path: Path) -> Iterator[str]:
    piece: list[str] = []
    size = 0
    with _open_text(path) as f:
        for line in f:
            blank = not line.strip()
            if (blank and size >= TXT_PIECE_CHARS) or size >= 4 * TXT_PIECE_CHARS:
                yield _trim("".join(piece))
                piece, size = [], 0
                if blank:
                    continue
            piece.append(line)
            size += len(line)
    if piece:
        yield _trim("".join(piece))


def _trim(piece: str) -> str:
    # The blank lines around a cut belong to neither piece; indentation of a first line stays.
    return piece.lstrip("\r\n").rstrip()


def _read_jsonl(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, row in json_objects(f, path, 'each line must be one JSON object such as {"text": "..."}'):
            if "text" not in row:
                keys = ", ".join(map(str, row))
                raise DataError(
                    f'{path}, line {lineno}: no "text" field (found: {keys}); each line needs '
                    'a string field "text" holding the document'
                )
            text = row["text"]
            if not isinstance(text, str):
                raise DataError(
                    f'{path}, line {lineno}: field "text" is {type(text).__name__}, not a string; '
                    "store each document's text as a JSON string"
                )
            yield text


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err}); check or re-export it") from None
    if "text" not in pf.schema_arrow.names:
        names = ", ".join(pf.schema_arrow.names)
        raise DataError(
            f'{path}: no "text" column (found: {names}); rename the column holding the '
            'documents to "text"'
        )
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


_READERS: dict[str, Callable[[Path], Iterator[str]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".jsonl.xz": _read_jsonl,
    ".parquet": _read_parquet,
}


def read_documents(path: Path) -> Iterator[str]:
    """The non-empty documents of one local file, by the rules in the module docstring."""
    reader = _READERS[_suffix(path) or ""]
    try:
        for text in reader(path):
            if text.strip():
                yield text
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8") from None
    except lzma.LZMAError as err:
        raise DataError(f"{path}: corrupt xz data ({err}); re-compress the file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err}); check the file") from None


class LocalSource(Source):
    """A local file or folder, split by split files or by content hash (see module doc)."""

    def __init__(self, spec: str, root: Path, files: list[Path], split_files: dict[str, list[Path]] | None) -> None:
        self.spec = spec
        self.root = root
        self.files = files
        self.split_files = split_files
        self._assignment: bytearray | None = None  # hash mode: split index per document

    def fingerprint(self) -> str:
        entries = []
        for path in self.files:
            st = path.stat()
            entries.append((str(path.relative_to(self.root)) if path != self.root else path.name, st.st_size, st.st_mtime_ns))
        return _digest({"kind": "local", "root": str(self.root), "files": entries, "rule": SPLIT_RULE_VERSION})

    def validate(self) -> None:
        if self.split_files is None:
            self._assign()
        else:
            for _ in self._all_documents():
                pass

    def _all_documents(self) -> Iterator[str]:
        for path in self.files:
            yield from read_documents(path)

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        if self.split_files is not None:
            files = self.split_files.get(split, [])
            if not files:
                have = ", ".join(s for s in SPLITS if self.split_files.get(s))
                raise DataError(
                    f"{self.root} has split files for {have} but none for {split}; add a "
                    f"{split}.txt/.jsonl/.jsonl.xz/.parquet file (or leave out all split files "
                    "to split by hash)"
                )
            return (text for path in files for text in read_documents(path))
        index = SPLITS.index(split)
        assignment = self._assign()
        if not assignment:
            raise DataError(f"{self.root} holds no text (every document is empty or whitespace); add text or pass "
                            "another source")
        if index not in assignment:
            raise DataError(
                f"{self.root}: only {len(assignment)} document(s), too few for a non-empty {split} "
                f"split; add more text (a .txt file is cut into documents of about "
                f"{TXT_PIECE_CHARS:,} characters at blank lines) or provide train/validation/test "
                "split files"
            )
        return (text for text, s in zip(self._all_documents(), assignment) if s == index)

    def _assign(self) -> bytearray:
        """One pass over all documents: their splits, with the small-source fix-ups.

        This pass also reads every file before any tokenising, so bad lines fail early.
        """
        if self._assignment is not None:
            return self._assignment
        assignment = bytearray(_bucket_split(hash_split(text)) for text in self._all_documents())
        counts = [assignment.count(s) for s in range(len(SPLITS))]
        if 0 in counts and len(assignment) > 1:
            keys = [_text_key(text) for text in self._all_documents()]
            for target in range(len(SPLITS)):
                if counts[target]:
                    continue
                # A split may give its last document only to a split filled before it.
                donors = [d for d in range(len(SPLITS)) if d != target and (counts[d] >= 2 or (counts[d] == 1 and d > target))]
                if not donors:
                    continue
                donor = max(donors, key=lambda d: (counts[d], -d))
                moved = min((i for i, s in enumerate(assignment) if s == donor), key=lambda i: keys[i])
                assignment[moved] = target
                counts[donor] -= 1
                counts[target] += 1
        self._assignment = assignment
        return assignment


def _local_files(root: Path) -> list[Path]:
    if root.is_file():
        if _suffix(root) is None:
            raise DataError(f"{root}: unsupported file type; {_SPEC_HELP}")
        return [root]
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and _suffix(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"folder {root} holds no {'/'.join(SUFFIXES)} files; add some or point to another folder")
    return files


def _split_files(root: Path, files: list[Path]) -> dict[str, list[Path]] | None:
    if root.is_file():
        return None
    named: dict[str, list[Path]] = {}
    others = []
    for path in files:
        rel = path.relative_to(root)
        top = rel.parts[0].lower() if len(rel.parts) > 1 else None
        split = SPLIT_ALIASES.get(top or "") or SPLIT_ALIASES.get(_stem(path))
        if split:
            named.setdefault(split, []).append(path)
        else:
            others.append(path)
    if not named:
        return None
    if others:
        raise DataError(
            f"folder {root} mixes split files ({', '.join(sorted(named))}) with other files "
            f"(e.g. {others[0].relative_to(root)}); rename them into train/validation/test "
            "files or move them out"
        )
    return named


def _parse_local(spec: str) -> LocalSource:
    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"source {spec!r}: no such file or folder; check the path ({_SPEC_HELP})")
    if not os.access(root, os.R_OK) or (root.is_dir() and not os.access(root, os.X_OK)):
        raise DataError(f"source {spec!r}: not readable; check its permissions")
    root = root.resolve()
    files = _local_files(root)
    return LocalSource(spec, root, files, _split_files(root, files))


# ---------------------------------------------------------------------------------------
# Hugging Face datasets


_HF_SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}


class HFSource(Source):
    """A Hugging Face dataset read by streaming, field ``text``."""

    def __init__(self, spec: str, name: str, config: str | None, split_names: list[str], revision: str | None) -> None:
        self.spec = spec
        self.name = name
        self.config = config
        self.split_names = split_names
        self.revision = revision

    def fingerprint(self) -> str:
        return _digest(
            {"kind": "hf", "name": self.name, "config": self.config, "splits": self.split_names,
             "revision": self.revision, "rule": SPLIT_RULE_VERSION}
        )

    def _own(self, split: str) -> str | None:
        return next((s for s in _HF_SPLIT_NAMES[split] if s in self.split_names), None)

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        if "train" not in self.split_names:
            own = self._own(split)
            if own is None:
                raise DataError(
                    f"{self.spec}: the dataset has splits {', '.join(self.split_names)} and no "
                    f"{split}; pick a dataset or config that has one, or save it to local split files"
                )
            return self._rows(own, None)
        # Splits the dataset lacks are carved from its train split by content hash.
        carved = {SPLITS.index(s) for s in SPLITS if s != "train" and self._own(s) is None}
        if SPLITS.index(split) in carved or (split == "train" and carved):
            return self._rows("train", lambda text: _doc_split(text, carved) == SPLITS.index(split))
        return self._rows(self._own(split) or split, None)

    def _rows(self, hf_split: str, keep: Callable[[str], bool] | None) -> Iterator[str]:
        import datasets

        ds = datasets.load_dataset(self.name, self.config, split=hf_split, streaming=True)
        for row in ds:
            if "text" not in row:
                raise DataError(
                    f'{self.spec}: rows have no "text" field (found: {", ".join(row)}); use a '
                    "dataset with a text field, or export it to .jsonl with one"
                )
            text = row["text"]
            if text and text.strip() and (keep is None or keep(text)):
                yield text


def _doc_split(text: str, carved: set[int]) -> int:
    split = _bucket_split(hash_split(text))
    return split if split in carved else 0


def _parse_hf(spec: str) -> HFSource:
    rest = spec[len("hf:") :]
    name, _, config = rest.partition(":")
    if not name:
        raise DataError(f"source {spec!r}: missing dataset name; write hf:NAME or hf:NAME:CONFIG")
    if not hub_reachable():
        raise DataError(
            f"source {spec!r} needs the Hugging Face hub, which cannot be reached from here; "
            "download the dataset elsewhere and pass a local .jsonl/.parquet file or folder, "
            "or use a bundled corpus:NAME"
        )
    try:
        import datasets

        builder = datasets.load_dataset_builder(name, config or None)
        split_names = list(builder.info.splits or []) or datasets.get_dataset_split_names(name, config or None)
    except Exception as err:  # datasets raises many types; all mean the same to the user
        raise DataError(
            f"source {spec!r}: cannot load Hugging Face dataset {name!r}"
            f"{f' config {config!r}' if config else ''} ({type(err).__name__}: {err}); check the "
            "name and config on huggingface.co, or use a local file"
        ) from None
    features = builder.info.features
    if features is not None and "text" not in features:
        raise DataError(
            f'source {spec!r}: the dataset has no "text" field (found: {", ".join(features)}); '
            "use a dataset with a text field, or export it to .jsonl with one"
        )
    return HFSource(spec, name, config or None, split_names, getattr(builder, "hash", None))


# ---------------------------------------------------------------------------------------


def parse_source(spec: str) -> Source:
    """Parse and check a SOURCE spec (paths must exist) before any expensive work."""
    if spec.startswith("corpus:"):
        name = spec[len("corpus:") :]
        if name == "all":
            return CorpusSource(spec, CORPORA)
        if name not in CORPORA:
            raise DataError(f"unknown corpus {name!r} in {spec!r}; bundled corpora: {', '.join(CORPORA)}, all")
        return CorpusSource(spec, (name,))
    if spec.startswith("hf:"):
        return _parse_hf(spec)
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]+):", spec)
    if scheme and not Path(spec).exists():
        raise DataError(f"unknown source scheme {scheme.group(1)!r} in {spec!r}; {_SPEC_HELP}")
    return _parse_local(spec)

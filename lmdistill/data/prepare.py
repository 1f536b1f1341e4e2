"""Tokenise text sources into one token shard per split, plus a ``meta.json`` describing them.

``out_dir`` is a derived cache: when its ``meta.json`` names the same source fingerprints,
tokenizer fingerprint and splits, and every shard verifies, :func:`prepare` reuses it without
tokenising; otherwise it rebuilds it. ``meta.json`` is removed first and written last, so a
crash in between leaves a folder that is rebuilt, never one that is trusted half-written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lmdistill.atomic import write_text_atomic
from lmdistill.data.corpora import SPLITS, check_split
from lmdistill.data.errors import DataError
from lmdistill.data.shards import SHARD_VERSION, ShardError, ShardWriter, dtype_for_vocab, read_shard, shard_info
from lmdistill.data.sources import Source, parse_source
from lmdistill.models.fingerprint import tokenizer_fingerprint

META_FORMAT_VERSION = 1
META_NAME = "meta.json"


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no "
            "eos token, which marks document ends in the shards; set one "
            "(tokenizer.eos_token = '...') or use the model's own tokenizer"
        )
    return int(eos)


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while batch := list(islice(it, size)):
        yield batch


def _encode_batch(tokenizer: PreTrainedTokenizerBase, batch: list[str], eos: int) -> np.ndarray:
    # verbose=False: documents longer than model_max_length are fine here (cut into blocks later).
    ids = tokenizer(batch, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
    out = np.empty(sum(len(x) + 1 for x in ids), dtype=np.uint32)
    pos = 0
    for x in ids:
        out[pos : pos + len(x)] = x
        pos += len(x)
        out[pos] = eos
        pos += 1
    return out


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], batch_size: int = 64) -> np.ndarray:
    """All ``texts`` tokenised without special tokens, each followed by EOS (uint32)."""
    eos = _eos_id(tokenizer)
    parts = [_encode_batch(tokenizer, batch, eos) for batch in _batches(texts, batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


@dataclass
class PreparedData:
    """A prepared folder: ``{split}.bin`` shards and ``meta.json``."""

    out_dir: Path
    splits: dict[str, int]  # tokens per split
    fingerprint: str  # of the tokenizer
    vocab_size: int
    eos_token_id: int
    reused: bool
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> source spec -> tokens, in order

    def tokens(self, split: str) -> np.ndarray:
        """The verified tokens of ``split`` as a read-only memmap."""
        if split not in self.splits:
            raise DataError(
                f"{self.out_dir} has no {split!r} split (prepared: {', '.join(self.splits)}); "
                f"re-run lmdistill prepare --out {self.out_dir} with that split"
            )
        return read_shard(self.out_dir / f"{split}.bin", expected_fingerprint=self.fingerprint)


def _from_meta(out_dir: Path, meta: dict, reused: bool) -> PreparedData:
    return PreparedData(
        out_dir=out_dir,
        splits={s: int(info["tokens"]) for s, info in meta["splits"].items()},
        fingerprint=meta["tokenizer"]["fingerprint"],
        vocab_size=int(meta["tokenizer"]["vocab_size"]),
        eos_token_id=int(meta["tokenizer"]["eos_token_id"]),
        reused=reused,
        by_source={s: {spec: int(v["tokens"]) for spec, v in info.get("by_source", {}).items()}
                   for s, info in meta["splits"].items()},
    )


def _read_meta(out_dir: Path) -> dict | None:
    """meta.json when it is readable and complete, else None (so callers never KeyError)."""
    try:
        meta = json.loads((out_dir / META_NAME).read_text(encoding="utf-8"))
        ok = (
            meta["format_version"] == META_FORMAT_VERSION
            and all(k in meta["tokenizer"] for k in ("fingerprint", "vocab_size", "eos_token_id"))
            and all("spec" in s and "fingerprint" in s for s in meta["sources"])
            and all(int(info["tokens"]) >= 0 for info in meta["splits"].values())
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return meta if ok else None


def _verify_shards(out_dir: Path, meta: dict) -> None:
    """Every shard's header, size and fingerprint, and its count against meta (cheap: no data read)."""
    for split, info in meta["splits"].items():
        path = out_dir / f"{split}.bin"
        header = shard_info(path)
        if header.fingerprint != meta["tokenizer"]["fingerprint"] or header.num_tokens != info["tokens"]:
            raise ShardError(
                f"token shard {path} does not match {out_dir / META_NAME} ({header.num_tokens} tokens, "
                f"meta says {info['tokens']}); re-run lmdistill prepare --out {out_dir}"
            )


def load_prepared(out_dir: Path) -> PreparedData:
    """A folder written by :func:`prepare`, with every shard verified."""
    out_dir = Path(out_dir)
    if not (out_dir / META_NAME).is_file():
        raise DataError(f"no prepared data in {out_dir} ({META_NAME} missing); run lmdistill prepare --out {out_dir} first")
    meta = _read_meta(out_dir)
    if meta is None:
        raise DataError(
            f"{out_dir / META_NAME} is unreadable or from another lmdistill version; "
            f"re-run lmdistill prepare --out {out_dir}"
        )
    _verify_shards(out_dir, meta)
    return _from_meta(out_dir, meta, reused=True)


def _mismatch(meta: dict | None, wanted: dict) -> str | None:
    """Why an existing meta.json cannot be reused, or None when it can."""
    if meta is None:
        return "no readable meta.json"
    if meta["tokenizer"].get("fingerprint") != wanted["tokenizer"]["fingerprint"]:
        return "another tokenizer"
    if meta["sources"] != wanted["sources"]:
        return "other sources, or source files changed"
    if set(meta["splits"]) != set(wanted["splits"]):
        return f"other splits ({', '.join(meta['splits'])})"
    return None


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _tokenize_split(
    tokenizer: PreTrainedTokenizerBase, split: str, parsed: Sequence[Source], out_dir: Path,
    fingerprint: str, eos: int, batch_size: int = 64,
) -> dict:
    by_source = {}
    with ShardWriter(out_dir / f"{split}.bin", fingerprint, len(tokenizer)) as writer:
        for source in parsed:
            docs = tokens = 0
            bar = tqdm(desc=f"{split} {source.spec}", unit="doc", disable=None, leave=False)
            for batch in _batches(source.documents(split), batch_size):
                ids = _encode_batch(tokenizer, batch, eos)
                writer.write(ids)
                docs += len(batch)
                tokens += len(ids)
                bar.update(len(batch))
                bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
            bar.close()
            print(f"prepare {split}: {source.spec}: {docs:,} documents, {tokens:,} tokens")
            by_source[source.spec] = {"documents": docs, "tokens": tokens}
        total = writer.num_tokens
    return {
        "shard": f"{split}.bin",
        "tokens": total,
        "documents": sum(v["documents"] for v in by_source.values()),
        "by_source": by_source,
    }


def prepare(
    tokenizer: PreTrainedTokenizerBase,
    sources: list[str],
    out_dir: Path,
    splits: Sequence[str] = SPLITS,
    tokenizer_name: str = "",
) -> PreparedData:
    """Tokenise ``sources`` into ``out_dir/{split}.bin`` + ``meta.json``, or reuse them."""
    out_dir = Path(out_dir)
    if not sources:
        raise DataError("no sources given; pass at least one, e.g. corpus:austen or a .txt file")
    splits = list(dict.fromkeys(splits))
    if not splits:
        raise DataError("no splits requested; pass some of " + ", ".join(SPLITS))
    for split in splits:
        check_split(split)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} is a file, not a folder for token shards; choose another output folder (--out)")
    # Cheap checks first: specs (paths exist), tokenizer, then whether out_dir is reusable.
    parsed = [parse_source(spec) for spec in sources]
    eos = _eos_id(tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer)
    wanted = {
        "tokenizer": {"fingerprint": fingerprint},
        "sources": [{"spec": s.spec, "fingerprint": s.fingerprint()} for s in parsed],
        "splits": splits,
    }
    old = _read_meta(out_dir) if (out_dir / META_NAME).exists() else None
    reason = _mismatch(old, wanted)
    if reason is None:
        try:
            _verify_shards(out_dir, old)
            print(f"prepare: reusing {out_dir} (same sources and tokenizer)")
            return _from_meta(out_dir, old, reused=True)
        except ShardError as err:
            reason = f"a shard failed verification ({err})"
    if (out_dir / META_NAME).exists():
        print(f"prepare: {out_dir} holds data for different inputs ({reason}); overwriting it")
    # Local sources read all their files here, so that a bad line or an empty split fails
    # before any tokenising.
    for source in parsed:
        source.validate()
        for split in splits:
            source.documents(split)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_NAME).unlink(missing_ok=True)
    for split in set(SPLITS) - set(splits):
        (out_dir / f"{split}.bin").unlink(missing_ok=True)  # stale shards of an earlier run
    split_info = {split: _tokenize_split(tokenizer, split, parsed, out_dir, fingerprint, eos) for split in splits}
    meta = {
        "format_version": META_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": {
            "name": tokenizer_name or getattr(tokenizer, "name_or_path", ""),
            "fingerprint": fingerprint,
            "vocab_size": len(tokenizer),
            "eos_token_id": eos,
        },
        "sources": wanted["sources"],
        "shards": {"format_version": SHARD_VERSION, "dtype": dtype_for_vocab(len(tokenizer)).name},
        "splits": split_info,
    }
    _write_json(out_dir / META_NAME, meta)
    return _from_meta(out_dir, meta, reused=False)

"""Reading a complete teacher cache.

Every open checks each header (magic, version, header checksum, codes, geometry) and the
exact file size, and that all parts agree and are all present; a part still being written has
the suffix ``.partial`` and is never read. It then reads every block once and checks its
checksum and that every stored id (top-k and tail) is a token of the vocabulary, so a damaged
cache is refused, naming the file and block, before a run starts; each block read for a batch
is checked again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..loss.sparse import SparseTargets
from .format import (
    HEADER_BYTES,
    PART_RE,
    VALUE_TORCH,
    CacheHeader,
    TeacherCacheError,
    block_checksum,
    cache_error,
    damaged_error,
    read_header,
    temperatures_text,
)


# A batch of stored targets at one temperature; the loss side's type (lmdistill.loss.sparse).
TeacherTargets = SparseTargets


def _same_temperature(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def _check_ids(path: Path, header: CacheHeader, records: np.ndarray, blocks: np.ndarray) -> None:
    """Every token id in ``records`` (``(n, B)``, of the blocks with global indices ``blocks``),
    top-k and tail, is one of the vocabulary's."""
    B = header.block_size
    for field, what in (("indices", "top-k token id"), ("tail_ids", "tail-sample token id")):
        if field not in records.dtype.names:
            continue
        ids = records[field]
        if ids.max(initial=0) < header.vocab_size and ids.min(initial=0) >= 0:
            continue  # the usual case, without a mask's worth of memory
        row, pos, *rest = np.argwhere((ids >= header.vocab_size) | (ids < 0))[0]
        block = int(blocks[row])
        raise damaged_error(path, f"block {block} (positions {block * B}..{block * B + B - 1}), position "
                                  f"{block * B + pos}: {what} {ids[(row, pos, *rest)]} is outside the vocabulary of "
                                  f"{header.vocab_size:,} tokens")


def _check_checksums(path: Path, header: CacheHeader, records: np.ndarray, checksums: np.ndarray,
                     blocks: np.ndarray) -> None:
    """Each block of ``records`` matches its stored checksum."""
    B = header.block_size
    for row, block in enumerate(blocks.tolist()):
        computed, recorded = block_checksum(block, records[row]), int(checksums[row])
        if computed != recorded:
            raise damaged_error(path, f"block {block} (positions {block * B}..{block * B + B - 1}) fails its checksum "
                                      f"(stored {recorded:08x}, computed {computed:08x})")


def _check_blocks(path: Path, header: CacheHeader, records: np.ndarray, checksums: np.ndarray | None,
                  blocks: np.ndarray) -> None:
    """Refuse damaged blocks: ``records`` ``(n, B)`` of the blocks ``blocks`` (global indices) of
    the part ``path``, with their stored ``checksums`` (None in a version-2 file)."""
    _check_ids(path, header, records, blocks)  # first: it can name the position
    if checksums is not None:
        _check_checksums(path, header, records, checksums, blocks)


# Part files this process has verified, keyed by (path, size, mtime, inode): a run opens its
# cache more than once (config checks, then set-up) and reads a large one through once.
_VERIFIED: set[tuple[str, int, int, int]] = set()
_VERIFY_CHUNK_BYTES = 1 << 24


def _file_key(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino


class TeacherCache:
    """A complete teacher cache for one split: every part present and verified.

    ``targets(blocks, T)`` returns the stored targets of those blocks (the sampler's block
    indices); the files are memory-mapped, so only the blocks asked for are read, and each
    is checked again as it is read. ``verify=False`` skips :meth:`verify` at open (the
    headers are checked all the same).
    """

    def __init__(self, root: str | Path, split: str = "train", *, verify: bool = True) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise TeacherCacheError(f"teacher cache {self.root} does not exist; build it with lmdistill "
                                    f"cache-teacher --out {self.root}")
        found: dict[int, dict[int, Path]] = {}
        for path in self.root.iterdir():
            m = PART_RE.match(path.name)
            if m and m["split"] == split:
                found.setdefault(int(m["parts"]), {})[int(m["part"])] = path
        partial = sorted(p.name for p in self.root.glob(f"{split}.*-of-*.bin.partial"))
        if not found:
            unfinished = f" (unfinished: {', '.join(partial)}; rerun the same cache-teacher command to finish)" if partial else ""
            raise TeacherCacheError(f"teacher cache {self.root} holds no complete {split!r} cache{unfinished}; build "
                                    f"it with lmdistill cache-teacher --split {split} --out {self.root}")
        if len(found) > 1:
            raise TeacherCacheError(
                f"teacher cache {self.root} mixes {split!r} caches split into {' and '.join(map(str, sorted(found)))} "
                f"parts; keep one set of part files (delete the others)"
            )
        ((parts, by_index),) = found.items()
        missing = [r for r in range(parts) if r not in by_index]
        if missing:
            raise TeacherCacheError(
                f"teacher cache {self.root} is incomplete: part(s) {', '.join(map(str, missing))} of {parts} are "
                f"missing or unfinished; run lmdistill cache-teacher with --rank R --world-size {parts} for each "
                f"(a rerun continues where a killed one stopped)"
            )
        self.paths = [by_index[r] for r in range(parts)]
        self.headers = [read_header(p) for p in self.paths]
        first = self.headers[0].settings()
        for path, header in zip(self.paths, self.headers):
            if header.settings() != first or header.split != split:
                raise cache_error(path, f"made with other settings than {self.paths[0].name} (another teacher, data, k, "
                                        f"block size or temperatures); rebuild all parts together")
            if (header.part, header.parts) != (int(PART_RE.match(path.name)["part"]), parts):
                raise cache_error(path, f"header says part {header.part} of {header.parts}, its name another (renamed?)")
        self.header = first
        self._maps: list[np.ndarray | None] = [None] * parts
        self._starts = np.array([h.first_block for h in self.headers], dtype=np.int64)
        if verify:
            self.verify()

    def verify(self) -> None:
        """Read every block once and check its checksum and its token ids (see
        :func:`_check_blocks`); a part this process verified before, unchanged since, is skipped.

        A version-2 cache has no checksums: its ids are checked, and a notice says that damage
        to its values cannot be detected.
        """
        scanned = False
        for part, (path, header) in enumerate(zip(self.paths, self.headers)):
            key = _file_key(path)
            if key in _VERIFIED:
                continue
            stored = self._blocks(part)
            step = max(1, _VERIFY_CHUNK_BYTES // header.block_dtype.itemsize)
            for start in range(0, len(stored), step):
                chunk = stored[start : start + step]
                _check_blocks(path, header, chunk["records"], chunk["checksum"] if header.has_checksums else None,
                              header.first_block + np.arange(start, start + len(chunk)))
            _VERIFIED.add(key)
            scanned = True
        if scanned and not self.header.has_checksums:
            print(f"[lmdistill] teacher cache {self.root} is in format version {self.header.version}, without "
                  f"checksums: its token ids are range-checked, but damaged values would go unnoticed; rebuild "
                  f"it with lmdistill cache-teacher (into a new --out) to add them")

    def describe(self) -> str:
        h = self.header
        return (f"{self.root}: split {h.split}, {h.num_blocks:,} blocks of {h.block_size} = {h.total_positions:,} "
                f"positions, top-{h.k} logits ({h.value_dtype}) of a {h.vocab_size:,}-token vocabulary, "
                f"{h.tail_samples} tail samples, temperatures {temperatures_text(h.temperatures)}, {h.parts} part(s)")

    # -- checks ------------------------------------------------------------------------
    def check(self, *, block_size: int | None = None, temperature: float | None = None,
              tokenizer_fingerprint: str | None = None, teacher_config_fingerprint: str | None = None,
              teacher_fingerprint: str | None = None, data_fingerprint: str | None = None,
              vocab_size: int | None = None, num_tokens: int | None = None, teacher: str = "the teacher") -> None:
        """Refuse, with a message naming the fix, a cache that does not fit what is given."""
        h, root = self.header, self.root
        rebuild = f"rebuild it with lmdistill cache-teacher --teacher {teacher} ... --out NEW_DIR"
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != h.tokenizer_fingerprint:
            raise TeacherCacheError(
                f"teacher cache {root} was built with another tokenizer (fingerprint {h.tokenizer_fingerprint[:12]}..., "
                f"{teacher}'s is {tokenizer_fingerprint[:12]}...): its token ids mean other tokens; {rebuild}")
        for what, given, stored in (("config", teacher_config_fingerprint, h.teacher_config_fingerprint),
                                    ("weights", teacher_fingerprint, h.teacher_fingerprint)):
            if given is not None and given != stored:
                raise TeacherCacheError(f"teacher cache {root} was built from another teacher ({what} fingerprint "
                                        f"{stored[:12]}..., {teacher}'s is {given[:12]}...); {rebuild}")
        if vocab_size is not None and vocab_size != h.vocab_size:
            raise TeacherCacheError(
                f"teacher cache {root} holds logits over a vocabulary of {h.vocab_size:,} tokens, the student has "
                f"{vocab_size:,} output logits: logit distillation needs the teacher's vocabulary (a student cut from "
                f"the teacher, or one that shares its tokenizer)")
        if data_fingerprint is not None and data_fingerprint != h.data_fingerprint:
            raise TeacherCacheError(
                f"teacher cache {root} was built on other token data (token-shard fingerprint "
                f"{h.data_fingerprint[:12]}..., this {h.split} shard's is {data_fingerprint[:12]}...); point "
                f"data.sources / data.prepared_dir at the data it was built on, or rebuild it on this data")
        if num_tokens is not None and (num_tokens - 1) // h.block_size != h.num_blocks:
            raise TeacherCacheError(f"teacher cache {root} covers {h.num_blocks:,} blocks, the {h.split} split here "
                                    f"has {(num_tokens - 1) // h.block_size:,}; {rebuild}")
        if block_size is not None and block_size != h.block_size:
            raise TeacherCacheError(
                f"teacher cache {root} was built for blocks of {h.block_size} tokens (position i*B+j is the teacher's "
                f"prediction after token j of block i), not data.block_size={block_size}; set "
                f"data.block_size={h.block_size}, or rebuild the cache with --block-size {block_size}")
        if temperature is not None and not any(_same_temperature(temperature, t) for t in h.temperatures):
            raise TeacherCacheError(
                f"teacher cache {root} holds the teacher's log-sum-exp at temperature(s) "
                f"{temperatures_text(h.temperatures)} only, not at loss.temperature={temperature:g}; set "
                f"loss.temperature to one of them, or rebuild the cache with --temperatures including {temperature:g}")

    # -- data --------------------------------------------------------------------------
    def _blocks(self, part: int) -> np.ndarray:
        """The stored blocks of ``part`` (:attr:`CacheHeader.block_dtype`), memory-mapped."""
        if self._maps[part] is None:
            h = self.headers[part]
            self._maps[part] = np.memmap(self.paths[part], dtype=h.block_dtype, mode="r", offset=HEADER_BYTES,
                                         shape=(h.part_num_blocks,))
        return self._maps[part]  # type: ignore[return-value]

    def records(self, blocks: Sequence[int] | np.ndarray) -> np.ndarray:
        """The raw records of ``blocks``, ``(len(blocks), block_size)`` of :attr:`CacheHeader.record_dtype`,
        each block checked (checksum, token ids) as it is read."""
        blocks = np.asarray(blocks, dtype=np.int64).reshape(-1)
        if blocks.size and (blocks.min() < 0 or blocks.max() >= self.header.num_blocks):
            raise TeacherCacheError(f"teacher cache {self.root} has blocks 0..{self.header.num_blocks - 1}, asked for "
                                    f"{blocks.min()}..{blocks.max()}")
        out = np.empty((blocks.size, self.header.block_size), dtype=self.header.record_dtype)
        checksums = np.zeros(blocks.size, dtype=np.uint32)
        parts = np.searchsorted(self._starts, blocks, side="right") - 1
        for row, (block, part) in enumerate(zip(blocks, parts)):
            stored = self._blocks(int(part))[int(block - self._starts[part])]
            out[row] = stored["records"]
            if self.header.has_checksums:
                checksums[row] = stored["checksum"]
            # The copy is checked: what the loss sees is what passed.
            _check_blocks(self.paths[part], self.headers[part], out[row : row + 1],
                          checksums[row : row + 1] if self.header.has_checksums else None, blocks[row : row + 1])
        return out

    def targets(self, blocks: Sequence[int] | np.ndarray, temperature: float) -> TeacherTargets:
        """Stored values, indices and lse (at ``temperature``) of ``blocks``, as tensors."""
        self.check(temperature=temperature)
        t_index = next(i for i, t in enumerate(self.header.temperatures) if _same_temperature(temperature, t))
        rec = self.records(blocks)
        value_type = VALUE_TORCH[self.header.value_dtype]
        values = torch.from_numpy(np.ascontiguousarray(rec["values"]).view(np.int16)).view(value_type)
        indices = torch.from_numpy(rec["indices"].astype(np.int64))
        lse = torch.from_numpy(np.ascontiguousarray(rec["lse"][..., t_index]))
        tail_indices = tail_values = None
        if self.header.tail_samples:
            tail_indices = torch.from_numpy(rec["tail_ids"][..., t_index, :].astype(np.int64))
            tail_values = torch.from_numpy(np.ascontiguousarray(rec["tail_values"][..., t_index, :]).view(np.int16)).view(value_type)
        return TeacherTargets(values, indices, lse, temperature=float(self.header.temperatures[t_index]),
                              tail_indices=tail_indices, tail_values=tail_values)

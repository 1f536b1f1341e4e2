"""Teacher soft targets computed once and stored next to the token shards.

``lmdistill cache-teacher`` runs the teacher once over the training blocks of a prepared
folder and stores, for every input position, its ``k`` largest logits (16-bit), their token
ids and the log-sum-exp of the logits over the whole vocabulary at each temperature asked
for; ``lmdistill distill --teacher-cache DIR`` then trains without the teacher's weights,
with the sparse KL of :mod:`lmdistill.sparse_kl`. ``docs/teacher_cache.md`` is the guide.

Alignment. The sampler's block ``i`` has input ``tokens[i*B : i*B + B]`` (B = block size);
the teacher runs on exactly those blocks, and cache position ``p = i*B + j`` holds its
prediction after input token ``p`` within block ``i``. There are ``(num_tokens - 1) // B``
blocks (the sampler's count), so a cache is valid for one block size only.

Values. The stored logits are shifted by the position's largest logit (``v = logit - max``,
so the top one is 0): softmax is shift-invariant, and small magnitudes keep the 16-bit
rounding small (GPT-2's raw logits sit near -100, where fp16 steps by 0.06). The stored
log-sum-exp uses the same shift: ``lse_T = logsumexp((logits - max) / T)``, so
``exp(v_i / T - lse_T)`` is the teacher's probability of token ``i`` at ``T``.

Files (``CACHE_DIR/{split}.{part:05d}-of-{parts:05d}.bin``), one per part; a part is a
contiguous range of blocks, part ``r`` of ``W`` holding blocks ``[r*n//W, (r+1)*n//W)``. Each
is a 1024-byte little-endian header, then for each block of the part its ``B`` records (one
per position) followed by the block's checksum::

    offset  type        field
    0       int32       magic CACHE_MAGIC
    4       int32       format version CACHE_VERSION
    8       int32       k (logits kept per position)
    12      int32       value dtype code: 1 = float16, 2 = bfloat16 (raw 16-bit words)
    16      int32       index dtype code: 2 = uint16 (vocab <= 65536), 4 = int32
    20      int32       number of temperatures n_T (1..16)
    24      int64       vocabulary size (the teacher's logit count)
    32      int64       block size B
    40      int64       positions in the whole cache (all parts): blocks * B
    48      int64       first position of this part
    56      int64       positions in this part
    64      int32       part index r
    68      int32       number of parts W
    72      16 float64  temperatures (the first n_T are used)
    200     64 B        teacher fingerprint (config and weights), sha256 hex
    264     64 B        teacher config fingerprint, sha256 hex
    328     64 B        tokenizer fingerprint, sha256 hex
    392     64 B        token-shard fingerprint (sha256 of the split's .bin file)
    456     16 B        split name, ascii, zero-padded
    472     int32       tail samples per position and temperature S (0 = none)
    (zeros up to 1020)
    1020    uint32      crc32 of the header's bytes 0..1019

    record: values       k x 16-bit        (logit - max), descending
            indices      k x uint16/int32
            lse          n_T x float32     (logsumexp((logit - max) / T) at each temperature)
            tail_ids     n_T x S x uint16/int32  (only when S > 0)
            tail_values  n_T x S x 16-bit        (logit - max of those ids)
    block:  B records, then uint32 crc32 of the block index (int64) followed by the B records

Version 2 files (before the checksums) have the same header without its checksum and blocks
without theirs; they are still read, with a notice (see :meth:`TeacherCache.verify`).

Tail samples. At ``T = 2`` a 49,152-token teacher puts most of its mass outside its top 64
(77% on average for SmolLM2-135M on the bundled corpora), and the tail bucket alone says
nothing about how that mass is spread, so the gradient of the sparse KL points well away
from the full KL's (cosine 0.72 on a real batch, benchmarks/tail_gradient.py). ``S`` ids drawn with replacement from the
teacher's distribution at ``T`` restricted to the tail (the top-k ids excluded) make the
tail part of the gradient unbiased (see :mod:`lmdistill.sparse_kl`). Each block draws from
its own generator, seeded by its block index and the temperature's position, so a cache's
bytes do not depend on the batch size, the number of parts or a resumption.

Every open checks each header (magic, version, header checksum, codes, geometry) and the
exact file size, and that all parts agree and are all present; a part still being written has
the suffix ``.partial`` and is never read. It then reads every block once and checks its
checksum and that every stored id (top-k and tail) is a token of the vocabulary, so a damaged
cache is refused, naming the file and block, before a run starts; each block read for a batch
is checked again.

Writes. A part is built in ``NAME.partial`` (the header first, the file at its full size),
one batch of blocks at a time: each batch's blocks (records and checksums) are written at
their offset and fsynced, then ``NAME.progress.json`` (blocks done) is replaced atomically.
A killed build resumes after the last recorded batch, with the recorded batch size, so it
writes the same bytes as an uninterrupted one; the finished part is fsynced and renamed to
``NAME``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .atomic import write_text_atomic
from .data.errors import DataError
from .errors import NonFiniteError
from .data.prepare import PreparedData
from .data.shards import read_header_bytes, shard_digest
from .models.arch import config_context_length
from .models.device import model_device
from .models.fingerprint import config_fingerprint, model_fingerprint
from .sparse_kl import SparseTargets

__all__ = [
    "CACHE_MAGIC",
    "CACHE_VERSION",
    "CacheHeader",
    "MAX_TAIL_SAMPLES",
    "TeacherCache",
    "TeacherCacheError",
    "TeacherTargets",
    "BuildResult",
    "block_checksum",
    "build_teacher_cache",
    "data_fingerprint",
    "part_blocks",
    "part_name",
    "sample_tail",
]

CACHE_MAGIC = 20251201
CACHE_VERSION = 3
# Version 2 (no checksums) is still read: such caches took hours to build, and their ids are
# range-checked like any other (TeacherCache.verify prints a notice).
READABLE_VERSIONS = (2, 3)
HEADER_BYTES = 1024
_HEADER_CHECKSUM_AT = HEADER_BYTES - 4  # version 3: crc32 of the header bytes before it
MAX_TEMPERATURES = 16
_HEADER = struct.Struct("<iiiiiiqqqqqii16d64s64s64s64s16si")
MAX_TAIL_SAMPLES = 4096
_VALUE_CODES = {1: "fp16", 2: "bf16"}
_VALUE_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16}
_INDEX_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<i4")}


class TeacherCacheError(DataError):
    """A teacher cache that is missing, incomplete, corrupt, or made for other settings."""


def part_name(split: str, part: int, parts: int) -> str:
    return f"{split}.{part:05d}-of-{parts:05d}.bin"


_PART_RE = re.compile(r"^(?P<split>.+)\.(?P<part>\d{5})-of-(?P<parts>\d{5})\.bin$")


def part_blocks(num_blocks: int, part: int, parts: int) -> tuple[int, int]:
    """The contiguous block range ``[start, end)`` of part ``part`` of ``parts``."""
    return part * num_blocks // parts, (part + 1) * num_blocks // parts


def data_fingerprint(data: PreparedData, split: str = "train") -> str:
    """The token-shard fingerprint a cache built on ``split`` of ``data`` records."""
    data.tokens(split)  # a missing split or a shard that fails verification is reported here
    return shard_digest(data.out_dir / f"{split}.bin")


# ---------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class CacheHeader:
    """The decoded header of one part file."""

    k: int
    value_dtype: str  # "fp16" or "bf16"
    index_code: int  # 2 = uint16, 4 = int32
    vocab_size: int
    block_size: int
    total_positions: int
    part_start: int
    part_positions: int
    part: int
    parts: int
    temperatures: tuple[float, ...]
    teacher_fingerprint: str
    teacher_config_fingerprint: str
    tokenizer_fingerprint: str
    data_fingerprint: str
    split: str
    tail_samples: int = 0
    version: int = CACHE_VERSION

    @property
    def has_checksums(self) -> bool:
        return self.version >= 3

    @property
    def record_dtype(self) -> np.dtype:
        """One position: ``values`` (raw 16-bit), ``indices``, ``lse`` (float32 per temperature),
        and with tail samples ``tail_ids`` and ``tail_values`` (per temperature)."""
        n_t, index = len(self.temperatures), _INDEX_DTYPES[self.index_code]
        fields = [("values", "<u2", (self.k,)), ("indices", index, (self.k,)), ("lse", "<f4", (n_t,))]
        if self.tail_samples:
            fields += [("tail_ids", index, (n_t, self.tail_samples)), ("tail_values", "<u2", (n_t, self.tail_samples))]
        return np.dtype(fields)

    @property
    def block_dtype(self) -> np.dtype:
        """One block as stored: ``records`` (``B`` of :attr:`record_dtype`), then from version 3
        its ``checksum`` (see :func:`block_checksum`)."""
        fields = [("records", self.record_dtype, (self.block_size,))]
        return np.dtype(fields + [("checksum", "<u4")] if self.has_checksums else fields)

    @property
    def num_blocks(self) -> int:
        return self.total_positions // self.block_size

    @property
    def first_block(self) -> int:
        """The global index of this part's first block."""
        return self.part_start // self.block_size

    @property
    def part_num_blocks(self) -> int:
        return self.part_positions // self.block_size

    @property
    def file_bytes(self) -> int:
        return HEADER_BYTES + self.part_num_blocks * self.block_dtype.itemsize

    def settings(self) -> CacheHeader:
        """The header with its part fields zeroed: what every part of one cache shares."""
        return replace(self, part_start=0, part_positions=0, part=0)

    def pack(self) -> bytes:
        value_code = {v: c for c, v in _VALUE_CODES.items()}[self.value_dtype]
        temps = list(self.temperatures) + [0.0] * (MAX_TEMPERATURES - len(self.temperatures))
        head = _HEADER.pack(
            CACHE_MAGIC, self.version, self.k, value_code, self.index_code, len(self.temperatures),
            self.vocab_size, self.block_size, self.total_positions, self.part_start, self.part_positions,
            self.part, self.parts, *temps, self.teacher_fingerprint.encode("ascii"),
            self.teacher_config_fingerprint.encode("ascii"), self.tokenizer_fingerprint.encode("ascii"),
            self.data_fingerprint.encode("ascii"), self.split.encode("ascii"), self.tail_samples,
        ).ljust(_HEADER_CHECKSUM_AT, b"\0")
        checksum = zlib.crc32(head) if self.has_checksums else 0
        return head + struct.pack("<I", checksum)


def block_checksum(block: int, records: np.ndarray) -> int:
    """crc32 of the global block index (int64) followed by the block's record bytes: a block
    stored at another block's place fails it as surely as a damaged one."""
    return zlib.crc32(records, zlib.crc32(struct.pack("<q", block)))


def _fail(path: Path, problem: str) -> TeacherCacheError:
    return TeacherCacheError(
        f"teacher cache file {path}: {problem}; rebuild it with lmdistill cache-teacher (it is a derived cache, "
        f"safe to delete)"
    )


def _damaged(path: Path, problem: str) -> TeacherCacheError:
    """A part whose bytes are damaged: deleting it and rerunning its build redoes that part only."""
    m = _PART_RE.match(path.name.removesuffix(".partial"))  # the name, not a header that may be damaged too
    parts = int(m["parts"]) if m else 1
    which = "it" if parts == 1 else \
        f"this part (--rank {int(m['part'])} --world-size {parts}; the other parts are kept)"
    return TeacherCacheError(f"teacher cache file {path}: {problem}; the file is damaged: delete it and rerun the "
                             f"lmdistill cache-teacher command that built {which}")


def read_header(path: Path) -> CacheHeader:
    """The verified header of one part file: magic, version, codes, geometry and exact size."""
    path = Path(path)
    raw, size = read_header_bytes(path, HEADER_BYTES, _fail)
    fields = _HEADER.unpack_from(raw)
    magic, version, k, value_code, index_code, n_t = fields[:6]
    vocab, block, total, start, count, part, parts = fields[6:13]
    temps = fields[13 : 13 + MAX_TEMPERATURES]
    fps = fields[13 + MAX_TEMPERATURES : 17 + MAX_TEMPERATURES]
    split_raw, tail_samples = fields[17 + MAX_TEMPERATURES : 19 + MAX_TEMPERATURES]
    if magic != CACHE_MAGIC:
        raise _fail(path, f"bad magic number {magic} (expected {CACHE_MAGIC}); not an lmdistill teacher cache")
    if version not in READABLE_VERSIONS:
        raise _fail(path, f"format version {version}, this lmdistill reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    if version >= 3:
        (stored,) = struct.unpack_from("<I", raw, _HEADER_CHECKSUM_AT)
        if stored != zlib.crc32(raw[:_HEADER_CHECKSUM_AT]):
            raise _damaged(path, "its header fails its checksum")
    if value_code not in _VALUE_CODES or index_code not in _INDEX_DTYPES:
        raise _fail(path, f"unknown value/index dtype codes {value_code}/{index_code}")
    if not 1 <= n_t <= MAX_TEMPERATURES or not all(math.isfinite(t) and t > 0 for t in temps[:n_t]):
        raise _fail(path, f"bad temperature list ({n_t} temperatures)")
    if not (1 <= k <= vocab and block >= 1 and total >= 0 and total % block == 0 and 1 <= parts and 0 <= part < parts):
        raise _fail(path, f"inconsistent header (k={k}, vocab={vocab}, block={block}, positions={total}, "
                          f"part {part} of {parts})")
    if not 0 <= tail_samples <= MAX_TAIL_SAMPLES or (tail_samples and k == vocab):
        raise _fail(path, f"bad tail sample count {tail_samples} (k={k}, vocab={vocab})")
    if index_code == 2 and vocab > 2**16:
        raise _fail(path, f"uint16 indices for a vocabulary of {vocab}")
    first, end = part_blocks(total // block, part, parts)
    if (start, count) != (first * block, (end - first) * block):
        raise _fail(path, f"part {part} of {parts} should hold positions {first * block}..{end * block}, "
                          f"header says {start}..{start + count}")
    try:
        teacher_fp, config_fp, tokenizer_fp, data_fp = (f.decode("ascii") for f in fps)
        split = split_raw.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise _fail(path, "fingerprints or split name are not ascii") from None
    header = CacheHeader(k, _VALUE_CODES[value_code], index_code, vocab, block, total, start, count, part, parts,
                         tuple(temps[:n_t]), teacher_fp, config_fp, tokenizer_fp, data_fp, split, tail_samples,
                         version)
    if size != header.file_bytes:
        state = "truncated" if size < header.file_bytes else "padded"
        raise _damaged(path, f"{state}: {size} bytes on disk, header says {header.part_num_blocks} blocks of "
                             f"{block} positions = {header.file_bytes} bytes")
    return header


# ---------------------------------------------------------------------------------------
# Reading


# A batch of stored targets at one temperature; the loss side's type (lmdistill.sparse_kl).
TeacherTargets = SparseTargets


def _same_temperature(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def _temperatures_text(temps: Sequence[float]) -> str:
    return ", ".join(f"{t:g}" for t in temps)


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
        raise _damaged(path, f"block {block} (positions {block * B}..{block * B + B - 1}), position "
                             f"{block * B + pos}: {what} {ids[(row, pos, *rest)]} is outside the vocabulary of "
                             f"{header.vocab_size:,} tokens")


def _check_checksums(path: Path, header: CacheHeader, records: np.ndarray, checksums: np.ndarray,
                     blocks: np.ndarray) -> None:
    """Each block of ``records`` matches its stored checksum."""
    B = header.block_size
    for row, block in enumerate(blocks.tolist()):
        computed, recorded = block_checksum(block, records[row]), int(checksums[row])
        if computed != recorded:
            raise _damaged(path, f"block {block} (positions {block * B}..{block * B + B - 1}) fails its checksum "
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
            m = _PART_RE.match(path.name)
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
                raise _fail(path, f"made with other settings than {self.paths[0].name} (another teacher, data, k, "
                                  f"block size or temperatures); rebuild all parts together")
            if (header.part, header.parts) != (int(_PART_RE.match(path.name)["part"]), parts):
                raise _fail(path, f"header says part {header.part} of {header.parts}, its name another (renamed?)")
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

    # -- facts -------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.header.k

    @property
    def block_size(self) -> int:
        return self.header.block_size

    @property
    def temperatures(self) -> tuple[float, ...]:
        return self.header.temperatures

    @property
    def num_blocks(self) -> int:
        return self.header.num_blocks

    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    def describe(self) -> str:
        h = self.header
        return (f"{self.root}: split {h.split}, {h.num_blocks:,} blocks of {h.block_size} = {h.total_positions:,} "
                f"positions, top-{h.k} logits ({h.value_dtype}) of a {h.vocab_size:,}-token vocabulary, "
                f"{h.tail_samples} tail samples, temperatures {_temperatures_text(h.temperatures)}, {h.parts} part(s)")

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
        if teacher_config_fingerprint is not None and teacher_config_fingerprint != h.teacher_config_fingerprint:
            raise TeacherCacheError(
                f"teacher cache {root} was built from another teacher (config fingerprint "
                f"{h.teacher_config_fingerprint[:12]}..., {teacher}'s is {teacher_config_fingerprint[:12]}...); {rebuild}")
        if teacher_fingerprint is not None and teacher_fingerprint != h.teacher_fingerprint:
            raise TeacherCacheError(
                f"teacher cache {root} was built from another teacher (weights fingerprint "
                f"{h.teacher_fingerprint[:12]}..., {teacher}'s is {teacher_fingerprint[:12]}...); {rebuild}")
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
                f"{_temperatures_text(h.temperatures)} only, not at loss.temperature={temperature:g}; set "
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
        if blocks.size and (blocks.min() < 0 or blocks.max() >= self.num_blocks):
            raise TeacherCacheError(f"teacher cache {self.root} has blocks 0..{self.num_blocks - 1}, asked for "
                                    f"{blocks.min()}..{blocks.max()}")
        out = np.empty((blocks.size, self.block_size), dtype=self.header.record_dtype)
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
        t_index = next(i for i, t in enumerate(self.temperatures) if _same_temperature(temperature, t))
        rec = self.records(blocks)
        value_type = _VALUE_TORCH[self.header.value_dtype]
        values = torch.from_numpy(np.ascontiguousarray(rec["values"]).view(np.int16)).view(value_type)
        indices = torch.from_numpy(rec["indices"].astype(np.int64))
        lse = torch.from_numpy(np.ascontiguousarray(rec["lse"][..., t_index]))
        tail_indices = tail_values = None
        if self.header.tail_samples:
            tail_indices = torch.from_numpy(rec["tail_ids"][..., t_index, :].astype(np.int64))
            tail_values = torch.from_numpy(np.ascontiguousarray(rec["tail_values"][..., t_index, :]).view(np.int16)).view(value_type)
        return TeacherTargets(values, indices, lse, temperature=float(self.temperatures[t_index]),
                              tail_indices=tail_indices, tail_values=tail_values)


# ---------------------------------------------------------------------------------------
# Writing


@dataclass
class BuildResult:
    path: Path
    """The part file (``.partial`` while unfinished)."""
    complete: bool
    blocks_done: int
    blocks_total: int
    """Blocks of this part."""
    resumed_from: int
    """Blocks already done when this call started (0 for a fresh build)."""


def _temperature_list(temperatures: Sequence[float]) -> tuple[float, ...]:
    temps = tuple(float(t) for t in temperatures)
    if not 1 <= len(temps) <= MAX_TEMPERATURES:
        raise TeacherCacheError(f"give 1 to {MAX_TEMPERATURES} temperatures, got {len(temps)}")
    bad = [t for t in temps if not (math.isfinite(t) and t > 0)]
    if bad:
        raise TeacherCacheError(f"temperatures must be finite numbers > 0, got {bad[0]}")
    if len({round(t, 12) for t in temps}) != len(temps):
        raise TeacherCacheError(f"temperatures {_temperatures_text(temps)} repeat a value")
    return temps


def _read_progress(path: Path) -> dict | None:
    try:
        progress = json.loads(path.read_text())
        int(progress["blocks_done"]), int(progress["batch_size"])
        return progress
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_existing(out_dir: Path, header: CacheHeader) -> None:
    """Refuse to mix this build with part files (finished or not) made for other settings."""
    want = header.settings()
    for path in sorted(out_dir.glob(f"{header.split}.*-of-*.bin*")):
        m = _PART_RE.match(path.name.removesuffix(".partial"))
        if m is None or m["split"] != header.split:
            continue
        if int(m["parts"]) != header.parts:
            raise TeacherCacheError(
                f"{out_dir} already holds a {header.split!r} cache split into {int(m['parts'])} parts ({path.name}); "
                f"use --world-size {int(m['parts'])}, or another --out")
        try:
            other = read_header(path)  # a .partial file is preallocated, so its size checks too
        except TeacherCacheError:
            continue  # unreadable: the matching part is rebuilt below, others are the reader's problem
        if other.settings() != want:
            raise TeacherCacheError(
                f"{out_dir} already holds a teacher cache made with other settings ({path.name}: "
                f"{_settings_difference(other, header)}); choose another --out, or delete {out_dir} to rebuild")


def _settings_difference(a: CacheHeader, b: CacheHeader) -> str:
    names = ("version", "k", "tail_samples", "value_dtype", "vocab_size", "block_size", "total_positions",
             "temperatures", "teacher_fingerprint", "teacher_config_fingerprint", "tokenizer_fingerprint",
             "data_fingerprint")
    diffs = [f"{n} {getattr(a, n)} vs {getattr(b, n)}" if "fingerprint" not in n else f"another {n.replace('_fingerprint', '')}"
             for n in names if getattr(a, n) != getattr(b, n)]
    return "; ".join(diffs) or "header differs"


def _words(values: torch.Tensor, value_dtype: str) -> np.ndarray:
    """Logits as the raw 16-bit words the file stores."""
    return values.to(_VALUE_TORCH[value_dtype]).view(torch.int16).cpu().numpy().view("<u2")


def sample_tail(shifted: torch.Tensor, top_ids: torch.Tensor, temperature: float, samples: int,
                generator: torch.Generator) -> torch.Tensor:
    """``samples`` ids per row of ``shifted`` ``(rows, vocab)`` logits, drawn with replacement from
    ``softmax(shifted / temperature)`` with the ``top_ids`` ``(rows, k)`` excluded."""
    probs = torch.softmax(shifted / temperature, dim=-1).scatter_(-1, top_ids, 0.0)
    # A tail with no mass in float32 (a very sure teacher): any tail id will do, its weight is 0.
    empty = probs.sum(dim=-1) <= 0
    if bool(empty.any()):
        probs[empty] = torch.ones_like(probs[empty]).scatter_(-1, top_ids[empty], 0.0)
    return torch.multinomial(probs, samples, replacement=True, generator=generator)


@torch.no_grad()
def teacher_records(teacher: PreTrainedModel, input_ids: torch.Tensor, k: int, temperatures: Sequence[float],
                    record_dtype: np.dtype, value_dtype: str, tail_samples: int = 0, first_block: int = 0) -> np.ndarray:
    """The records of a batch of blocks ``(n, B)``: ``(n * B,)`` of ``record_dtype``. Row ``r`` of
    ``input_ids`` is block ``first_block + r`` (it seeds that block's tail samples)."""
    logits = teacher(input_ids=input_ids.to(model_device(teacher))).logits.float()
    if not torch.isfinite(logits).any(dim=-1).all() or torch.isnan(logits).any():
        raise NonFiniteError("the teacher produced NaN logits (or no finite logit at a position); check its weights "
                             "(load it with lmdistill eval to see its perplexity)")
    top, idx = logits.topk(k, dim=-1)  # sorted, largest first
    peak = top[..., :1]
    shifted = logits - peak
    lse = torch.stack([torch.logsumexp(shifted / t, dim=-1) for t in temperatures], dim=-1)
    rec = np.empty(top.shape[0] * top.shape[1], dtype=record_dtype)
    rec["values"] = _words(top - peak, value_dtype).reshape(-1, k)
    rec["indices"] = idx.reshape(-1, k).cpu().numpy()
    rec["lse"] = lse.reshape(-1, len(temperatures)).cpu().numpy()
    if tail_samples:
        n_t = len(temperatures)
        ids = torch.empty(*top.shape[:2], n_t, tail_samples, dtype=torch.long, device=logits.device)
        generator = torch.Generator(device=logits.device)
        for row in range(input_ids.shape[0]):
            for t_index, temperature in enumerate(temperatures):
                generator.manual_seed((first_block + row) * MAX_TEMPERATURES + t_index)
                ids[row, :, t_index] = sample_tail(shifted[row], idx[row], temperature, tail_samples, generator)
        rec["tail_ids"] = ids.reshape(-1, n_t, tail_samples).cpu().numpy()
        rec["tail_values"] = _words(shifted.unsqueeze(2).expand(-1, -1, n_t, -1).gather(-1, ids), value_dtype).reshape(
            -1, n_t, tail_samples)
    return rec


def build_teacher_cache(
    teacher: PreTrainedModel,
    data: PreparedData,
    out_dir: str | Path,
    *,
    top_k: int,
    temperatures: Sequence[float],
    block_size: int,
    tokenizer_fingerprint: str,
    tail_samples: int = 0,
    split: str = "train",
    value_dtype: str = "fp16",
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    progress: bool = True,
    teacher_fingerprint: str | None = None,
) -> BuildResult:
    """Compute (or continue computing) part ``rank`` of ``world_size`` of the cache in ``out_dir``.

    ``max_batches`` stops after that many batches (the part stays ``.partial``; a later call
    continues it). ``teacher_fingerprint`` skips hashing the weights when the caller has it.
    The cache is complete once every part is: :class:`TeacherCache` refuses it before.
    """
    out_dir = Path(out_dir)
    if value_dtype not in _VALUE_TORCH:
        raise TeacherCacheError(f"value dtype must be one of {', '.join(_VALUE_TORCH)}, got {value_dtype!r}")
    temps = _temperature_list(temperatures)
    if world_size < 1 or not 0 <= rank < world_size:
        raise TeacherCacheError(f"need 0 <= rank < world_size, got rank {rank}, world size {world_size}")
    if batch_size < 1:
        raise TeacherCacheError(f"batch size must be at least 1, got {batch_size}")
    vocab = teacher.get_output_embeddings().weight.shape[0] if teacher.get_output_embeddings() is not None \
        else teacher.config.vocab_size
    if not 1 <= top_k <= vocab:
        raise TeacherCacheError(f"top-k must be between 1 and the teacher's vocabulary of {vocab:,}, got {top_k}")
    if isinstance(tail_samples, bool) or not 0 <= tail_samples <= MAX_TAIL_SAMPLES:
        raise TeacherCacheError(f"tail samples must be between 0 and {MAX_TAIL_SAMPLES}, got {tail_samples}")
    if tail_samples and top_k == vocab:
        raise TeacherCacheError(f"top-k {top_k} keeps the whole vocabulary: there is no tail to sample; use "
                                f"--tail-samples 0")
    context = config_context_length(teacher.config)
    if block_size < 1 or (context is not None and block_size > context):
        raise TeacherCacheError(f"block size {block_size} must be between 1 and the teacher's context of {context} "
                                f"tokens")
    if data.fingerprint != tokenizer_fingerprint:
        raise DataError(f"{data.out_dir} was prepared with another tokenizer than the teacher's; prepare it with "
                        f"lmdistill prepare --tokenizer TEACHER")
    tokens = data.tokens(split)
    num_blocks = max(len(tokens) - 1, 0) // block_size
    if num_blocks < world_size:
        raise DataError(f"the {split} split has {len(tokens):,} tokens: {num_blocks} block(s) of {block_size} (+1), "
                        f"fewer than the {world_size} part(s) asked for; use a smaller block size or more data")
    first, end = part_blocks(num_blocks, rank, world_size)
    header = CacheHeader(
        k=top_k, value_dtype=value_dtype, index_code=2 if vocab <= 2**16 else 4, vocab_size=vocab,
        block_size=block_size, total_positions=num_blocks * block_size, part_start=first * block_size,
        part_positions=(end - first) * block_size, part=rank, parts=world_size, temperatures=temps,
        teacher_fingerprint=teacher_fingerprint or model_fingerprint(teacher),
        teacher_config_fingerprint=config_fingerprint(teacher.config), tokenizer_fingerprint=tokenizer_fingerprint,
        data_fingerprint=data_fingerprint(data, split), split=split, tail_samples=tail_samples,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_existing(out_dir, header)
    final = out_dir / part_name(split, rank, world_size)
    partial = final.with_name(final.name + ".partial")
    progress_path = final.with_name(final.name.removesuffix(".bin") + ".progress.json")
    blocks_total = end - first
    if final.exists():
        read_header(final)  # complete, verified, same settings (checked above): nothing to do
        progress_path.unlink(missing_ok=True)  # left by a run killed just after its rename
        return BuildResult(final, True, blocks_total, blocks_total, blocks_total)

    packed = header.pack()
    done, step = 0, batch_size
    saved = _read_progress(progress_path) if partial.exists() else None
    if saved is not None and partial.stat().st_size == header.file_bytes and _file_starts_with(partial, packed):
        done, step = min(int(saved["blocks_done"]), blocks_total), int(saved["batch_size"])
        if step != batch_size:
            print(f"[lmdistill] resuming with the batch size of the interrupted run ({step}), so that the bytes match")
    else:
        with open(partial, "wb") as fh:
            fh.write(packed)
            fh.truncate(header.file_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(partial, 0o644)
        write_text_atomic(progress_path, json.dumps({"blocks_done": 0, "batch_size": step}) + "\n")
    resumed_from = done

    stored_block = header.block_dtype
    teacher.eval()
    bar = tqdm(total=blocks_total, initial=done, unit="block", disable=not progress, dynamic_ncols=True,
               desc=f"cache-teacher part {rank}/{world_size}")
    batches = 0
    fd = os.open(partial, os.O_RDWR)
    try:
        while done < blocks_total and (max_batches is None or batches < max_batches):
            count = min(step, blocks_total - done)
            starts = (first + done + np.arange(count)) * block_size
            window = np.asarray(tokens)[starts[:, None] + np.arange(block_size)]
            rec = teacher_records(teacher, torch.from_numpy(window.astype(np.int64)), top_k, temps,
                                  header.record_dtype, value_dtype, tail_samples, first + done)
            os.pwrite(fd, _stored_blocks(rec, first + done, stored_block).tobytes(),
                      HEADER_BYTES + done * stored_block.itemsize)
            os.fsync(fd)
            done += count
            batches += 1
            write_text_atomic(progress_path, json.dumps({"blocks_done": done, "batch_size": step}) + "\n")
            bar.update(count)
    finally:
        os.close(fd)
        bar.close()
    if done < blocks_total:
        return BuildResult(partial, False, done, blocks_total, resumed_from)
    os.replace(partial, final)
    progress_path.unlink(missing_ok=True)
    read_header(final)
    return BuildResult(final, True, done, blocks_total, resumed_from)


def _stored_blocks(records: np.ndarray, first_block: int, block_dtype: np.dtype) -> np.ndarray:
    """``records`` of consecutive blocks from ``first_block`` as stored: each block's records
    followed by its :func:`block_checksum`."""
    stored = np.empty(len(records) // block_dtype["records"].shape[0], dtype=block_dtype)
    stored["records"] = records.reshape(stored["records"].shape)
    for row in range(len(stored)):
        stored["checksum"][row] = block_checksum(first_block + row, stored["records"][row])
    return stored


def _file_starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(prefix)) == prefix

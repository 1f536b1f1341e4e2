"""The teacher cache's file format: header, records, part names, checksums.

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
without theirs; they are still read, with a notice (see :meth:`.reader.TeacherCache.verify`).
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..data.errors import DataError
from ..data.prepare import PreparedData
from ..data.shards import read_header_bytes, shard_digest


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
VALUE_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16}
_INDEX_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<i4")}


class TeacherCacheError(DataError):
    """A teacher cache that is missing, incomplete, corrupt, or made for other settings."""


def part_name(split: str, part: int, parts: int) -> str:
    return f"{split}.{part:05d}-of-{parts:05d}.bin"


PART_RE = re.compile(r"^(?P<split>.+)\.(?P<part>\d{5})-of-(?P<parts>\d{5})\.bin$")


def part_blocks(num_blocks: int, part: int, parts: int) -> tuple[int, int]:
    """The contiguous block range ``[start, end)`` of part ``part`` of ``parts``."""
    return part * num_blocks // parts, (part + 1) * num_blocks // parts


def data_fingerprint(data: PreparedData, split: str = "train") -> str:
    """The token-shard fingerprint a cache built on ``split`` of ``data`` records."""
    data.tokens(split)  # a missing split or a shard that fails verification is reported here
    return shard_digest(data.out_dir / f"{split}.bin")


def temperatures_text(temps: Sequence[float]) -> str:
    return ", ".join(f"{t:g}" for t in temps)


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


def cache_error(path: Path, problem: str) -> TeacherCacheError:
    return TeacherCacheError(
        f"teacher cache file {path}: {problem}; rebuild it with lmdistill cache-teacher (it is a derived cache, "
        f"safe to delete)"
    )


def damaged_error(path: Path, problem: str) -> TeacherCacheError:
    """A part whose bytes are damaged: deleting it and rerunning its build redoes that part only."""
    m = PART_RE.match(path.name.removesuffix(".partial"))  # the name, not a header that may be damaged too
    parts = int(m["parts"]) if m else 1
    which = "it" if parts == 1 else \
        f"this part (--rank {int(m['part'])} --world-size {parts}; the other parts are kept)"
    return TeacherCacheError(f"teacher cache file {path}: {problem}; the file is damaged: delete it and rerun the "
                             f"lmdistill cache-teacher command that built {which}")


def read_header(path: Path) -> CacheHeader:
    """The verified header of one part file: magic, version, codes, geometry and exact size."""
    path = Path(path)
    raw, size = read_header_bytes(path, HEADER_BYTES, cache_error)
    fields = _HEADER.unpack_from(raw)
    magic, version, k, value_code, index_code, n_t = fields[:6]
    vocab, block, total, start, count, part, parts = fields[6:13]
    temps = fields[13 : 13 + MAX_TEMPERATURES]
    fps = fields[13 + MAX_TEMPERATURES : 17 + MAX_TEMPERATURES]
    split_raw, tail_samples = fields[17 + MAX_TEMPERATURES : 19 + MAX_TEMPERATURES]
    if magic != CACHE_MAGIC:
        raise cache_error(path, f"bad magic number {magic} (expected {CACHE_MAGIC}); not an lmdistill teacher cache")
    if version not in READABLE_VERSIONS:
        raise cache_error(path, f"format version {version}, this lmdistill reads versions "
                                f"{', '.join(map(str, READABLE_VERSIONS))}")
    if version >= 3:
        (stored,) = struct.unpack_from("<I", raw, _HEADER_CHECKSUM_AT)
        if stored != zlib.crc32(raw[:_HEADER_CHECKSUM_AT]):
            raise damaged_error(path, "its header fails its checksum")
    if value_code not in _VALUE_CODES or index_code not in _INDEX_DTYPES:
        raise cache_error(path, f"unknown value/index dtype codes {value_code}/{index_code}")
    if not 1 <= n_t <= MAX_TEMPERATURES or not all(math.isfinite(t) and t > 0 for t in temps[:n_t]):
        raise cache_error(path, f"bad temperature list ({n_t} temperatures)")
    if not (1 <= k <= vocab and block >= 1 and total >= 0 and total % block == 0 and 1 <= parts and 0 <= part < parts):
        raise cache_error(path, f"inconsistent header (k={k}, vocab={vocab}, block={block}, positions={total}, "
                                f"part {part} of {parts})")
    if not 0 <= tail_samples <= MAX_TAIL_SAMPLES or (tail_samples and k == vocab):
        raise cache_error(path, f"bad tail sample count {tail_samples} (k={k}, vocab={vocab})")
    if index_code == 2 and vocab > 2**16:
        raise cache_error(path, f"uint16 indices for a vocabulary of {vocab}")
    first, end = part_blocks(total // block, part, parts)
    if (start, count) != (first * block, (end - first) * block):
        raise cache_error(path, f"part {part} of {parts} should hold positions {first * block}..{end * block}, "
                                f"header says {start}..{start + count}")
    try:
        teacher_fp, config_fp, tokenizer_fp, data_fp = (f.decode("ascii") for f in fps)
        split = split_raw.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise cache_error(path, "fingerprints or split name are not ascii") from None
    header = CacheHeader(k, _VALUE_CODES[value_code], index_code, vocab, block, total, start, count, part, parts,
                         tuple(temps[:n_t]), teacher_fp, config_fp, tokenizer_fp, data_fp, split, tail_samples,
                         version)
    if size != header.file_bytes:
        state = "truncated" if size < header.file_bytes else "padded"
        raise damaged_error(path, f"{state}: {size} bytes on disk, header says {header.part_num_blocks} blocks of "
                                  f"{block} positions = {header.file_bytes} bytes")
    return header

"""Token shards: a fixed 1024-byte header, then the tokens, as in llm.c's data_common.py.

Header layout (little-endian; the rest of the 1024 bytes is zero):

====== ======= ==========================================================
offset type    field
====== ======= ==========================================================
0      int32   magic ``SHARD_MAGIC``
4      int32   format version (``SHARD_VERSION``)
8      int32   dtype code: 2 = uint16, 4 = uint32 (the item size)
12     int32   reserved (0)
16     int64   token count
24     int64   vocabulary size of the tokenizer
32     64 B    tokenizer fingerprint, sha256 as ascii hex
====== ======= ==========================================================

Every read checks the header and the file size, so that a truncated copy, a shard from
another tokenizer or a file that is not a shard fails loudly instead of training on garbage.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from lmdistill.data.errors import DataError

HEADER_BYTES = 1024
SHARD_MAGIC = 20250417  # an arbitrary date stamp, like llm.c's 20240520
SHARD_VERSION = 1
_HEADER = struct.Struct("<iiiiqq64s")
_DTYPES: dict[int, np.dtype] = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class ShardError(DataError):
    """A shard file that is missing, corrupt, truncated or made with another tokenizer."""


@dataclass(frozen=True)
class ShardHeader:
    """The decoded header of a shard file."""

    version: int
    dtype: np.dtype
    num_tokens: int
    vocab_size: int
    fingerprint: str


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits (vocab_size <= 65536), otherwise uint32."""
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


def _fail(path: Path, problem: str) -> ShardError:
    return ShardError(
        f"token shard {path}: {problem}; re-run `lmdistill prepare` to rebuild it "
        f"(it is a derived cache, safe to delete)"
    )


def _pack_header(num_tokens: int, dtype: np.dtype, vocab_size: int, fingerprint: str) -> bytes:
    fp = fingerprint.encode("ascii")
    if len(fp) != 64:
        raise ValueError(f"fingerprint must be 64 hex characters, got {len(fp)}")
    head = _HEADER.pack(SHARD_MAGIC, SHARD_VERSION, dtype.itemsize, 0, num_tokens, vocab_size, fp)
    return head.ljust(HEADER_BYTES, b"\0")


class ShardWriter:
    """Streams tokens into a shard: append chunks, then ``close`` writes the header and
    moves the file into place atomically, so a crash never leaves a half shard at ``path``.

    Used as a context manager; an exception inside the block discards the temp file.
    """

    def __init__(self, path: Path, fingerprint: str, vocab_size: int) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.num_tokens = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._file.write(b"\0" * HEADER_BYTES)  # placeholder until the count is known

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got {tokens.min()}..{tokens.max()}")
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.num_tokens += int(tokens.size)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(_pack_header(self.num_tokens, self.dtype, self.vocab_size, self.fingerprint))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o644)  # mkstemp makes 0600; a cache others read should not be
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: Path, tokens: np.ndarray, fingerprint: str, vocab_size: int) -> None:
    """Write ``tokens`` as one shard at ``path`` (atomic: temp file, fsync, rename)."""
    with ShardWriter(path, fingerprint, vocab_size) as writer:
        writer.write(tokens)


def read_header_bytes(path: Path, header_bytes: int, fail) -> tuple[bytes, int]:
    """The first ``header_bytes`` of ``path`` and its size; ``fail(path, problem)`` makes the error.

    Shared by every headed binary format here (token shards, teacher-cache parts).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(header_bytes)
        size = path.stat().st_size
    except FileNotFoundError:
        raise fail(path, "file does not exist") from None
    except OSError as err:
        raise fail(path, f"cannot be read ({err.strerror})") from None
    if len(raw) < header_bytes:
        raise fail(path, f"only {len(raw)} bytes, shorter than the {header_bytes}-byte header")
    return raw, size


def shard_info(path: Path) -> ShardHeader:
    """The verified header of a shard: magic, version, dtype code and exact file size."""
    path = Path(path)
    raw, size = read_header_bytes(path, HEADER_BYTES, _fail)
    magic, version, code, _, count, vocab, fp = _HEADER.unpack_from(raw)
    if magic != SHARD_MAGIC:
        raise _fail(path, f"bad magic number {magic} (expected {SHARD_MAGIC}); not an lmdistill shard")
    if version != SHARD_VERSION:
        raise _fail(path, f"format version {version}, this lmdistill reads version {SHARD_VERSION}")
    if code not in _DTYPES:
        raise _fail(path, f"unknown dtype code {code} (expected 2 for uint16 or 4 for uint32)")
    if count < 0:
        raise _fail(path, f"negative token count {count}")
    expected = HEADER_BYTES + count * code
    if size != expected:
        state = "truncated" if size < expected else "padded"
        raise _fail(path, f"{state}: {size} bytes on disk, header says {count} tokens = {expected} bytes")
    try:
        fingerprint = fp.decode("ascii")
    except UnicodeDecodeError:
        raise _fail(path, "tokenizer fingerprint in header is not ascii") from None
    return ShardHeader(version=version, dtype=_DTYPES[code], num_tokens=count, vocab_size=vocab, fingerprint=fingerprint)


def read_shard(path: Path, expected_fingerprint: str | None = None) -> np.ndarray:
    """The tokens of a verified shard as a read-only memmap (no copy into RAM)."""
    path = Path(path)
    header = shard_info(path)
    if expected_fingerprint is not None and header.fingerprint != expected_fingerprint:
        raise _fail(
            path,
            f"made with a different tokenizer (fingerprint {header.fingerprint[:12]}..., "
            f"expected {expected_fingerprint[:12]}...)",
        )
    if header.num_tokens == 0:  # np.memmap refuses a zero-length map
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,))


# Digests already computed by this process, keyed by (path, size, mtime): a run's several
# checks hash a large shard once.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def shard_digest(path: Path) -> str:
    """sha256 of a verified shard file (header and tokens): the identity of its token data.

    Two shards hash alike exactly when they hold the same tokens from the same tokenizer, so
    data derived from a shard (a teacher cache) can be matched to it later.
    """
    path = Path(path)
    shard_info(path)  # a missing, truncated or foreign file fails here with the usual message
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]

"""Building a teacher cache, one part at a time, resumably.

Tail samples. At ``T = 2`` a 49,152-token teacher puts most of its mass outside its top 64
(77% on average for SmolLM2-135M on the bundled corpora), and the tail bucket alone says
nothing about how that mass is spread, so the gradient of the sparse KL points well away
from the full KL's (cosine 0.72 on a real batch, benchmarks/tail_gradient.py). ``S`` ids drawn with replacement from the
teacher's distribution at ``T`` restricted to the tail (the top-k ids excluded) make the
tail part of the gradient unbiased (see :mod:`lmdistill.loss.sparse`). Each block draws from
its own generator, seeded by its block index and the temperature's position, so a cache's
bytes do not depend on the batch size, the number of parts or a resumption.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..atomic import write_text_atomic
from ..data.errors import DataError
from ..data.prepare import PreparedData
from ..errors import NonFiniteError
from ..models.arch import config_context_length
from ..models.device import model_device
from ..models.fingerprint import config_fingerprint, model_fingerprint
from .format import (
    HEADER_BYTES,
    MAX_TAIL_SAMPLES,
    MAX_TEMPERATURES,
    PART_RE,
    VALUE_TORCH,
    CacheHeader,
    TeacherCacheError,
    block_checksum,
    data_fingerprint,
    part_blocks,
    part_name,
    read_header,
    temperatures_text,
)


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
        raise TeacherCacheError(f"temperatures {temperatures_text(temps)} repeat a value")
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
        m = PART_RE.match(path.name.removesuffix(".partial"))
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
    return values.to(VALUE_TORCH[value_dtype]).view(torch.int16).cpu().numpy().view("<u2")


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
    head = teacher.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else teacher.config.vocab_size
    temps = check_build_settings(vocab, config_context_length(teacher.config), top_k=top_k, temperatures=temperatures,
                                 block_size=block_size, tail_samples=tail_samples, value_dtype=value_dtype,
                                 batch_size=batch_size, rank=rank, world_size=world_size)
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

    done, step = _start_part(partial, progress_path, header, batch_size)
    resumed_from = done
    done = _write_batches(teacher, tokens, header, partial, progress_path, done, step, max_batches, progress)
    if done < blocks_total:
        return BuildResult(partial, False, done, blocks_total, resumed_from)
    os.replace(partial, final)
    progress_path.unlink(missing_ok=True)
    read_header(final)
    return BuildResult(final, True, done, blocks_total, resumed_from)


def api_setting(name: str, value: object) -> str:
    """How a caller of :func:`build_teacher_cache` sets ``name`` (the CLI passes its flags instead)."""
    return f"{name}={value}"


def check_build_settings(vocab: int | None, context: int | None, *, top_k: int, temperatures: Sequence[float],
                         block_size: int, tail_samples: int, value_dtype: str = "fp16", batch_size: int = 1,
                         rank: int = 0, world_size: int = 1,
                         setting: Callable[[str, object], str] = api_setting) -> tuple[float, ...]:
    """Refuse build arguments that cannot work with a teacher of ``vocab`` logits and a context
    of ``context`` tokens (None: unknown, not checked); returns the temperatures. ``setting``
    names an argument and its fix in the caller's terms (``top_k=8`` or ``--top-k 8``)."""
    if value_dtype not in VALUE_TORCH:
        raise TeacherCacheError(f"{setting('value_dtype', value_dtype)}: the value dtype must be one of "
                                f"{', '.join(VALUE_TORCH)}")
    temps = _temperature_list(temperatures)
    if world_size < 1 or not 0 <= rank < world_size:
        raise TeacherCacheError(f"{setting('rank', rank)} must be below {setting('world_size', world_size)} "
                                f"(parts 0 to {world_size - 1})")
    if batch_size < 1:
        raise TeacherCacheError(f"{setting('batch_size', batch_size)}: the batch size must be at least 1")
    if top_k < 1:
        raise TeacherCacheError(f"{setting('top_k', top_k)}: keep at least 1 logit per position")
    if vocab is not None and top_k > vocab:
        raise TeacherCacheError(f"{setting('top_k', top_k)} exceeds the teacher's vocabulary of {vocab:,} tokens; "
                                f"use at most {vocab}")
    if isinstance(tail_samples, bool) or not 0 <= tail_samples <= MAX_TAIL_SAMPLES:
        raise TeacherCacheError(f"{setting('tail_samples', tail_samples)}: tail samples must be 0 (tail bucket only) "
                                f"to {MAX_TAIL_SAMPLES}")
    if tail_samples and top_k == vocab:
        raise TeacherCacheError(f"{setting('top_k', top_k)} keeps the whole vocabulary: there is no tail to sample; "
                                f"use {setting('tail_samples', 0)}")
    if block_size < 1 or (context is not None and block_size > context):
        raise TeacherCacheError(f"{setting('block_size', block_size)}: the block size must be between 1 and the "
                                f"teacher's context of {context} tokens (the distill run's data.block_size)")
    return temps


def _start_part(partial: Path, progress_path: Path, header: CacheHeader, batch_size: int) -> tuple[int, int]:
    """``(blocks done, batch size)``: those recorded for an interrupted build of this very part
    (its file at full size, starting with this header), or a fresh ``.partial`` file at 0."""
    packed = header.pack()
    done, step = 0, batch_size
    saved = _read_progress(progress_path) if partial.exists() else None
    if saved is not None and partial.stat().st_size == header.file_bytes and _file_starts_with(partial, packed):
        done, step = min(int(saved["blocks_done"]), header.part_num_blocks), int(saved["batch_size"])
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
    return done, step


def _write_batches(teacher: PreTrainedModel, tokens: np.ndarray, header: CacheHeader, partial: Path,
                   progress_path: Path, done: int, step: int, max_batches: int | None, progress: bool) -> int:
    """Run the teacher on the part's blocks from ``done`` on, ``step`` blocks a batch (at most
    ``max_batches`` batches), writing each batch and then its progress record; the blocks done."""
    first, blocks_total, block_size = header.first_block, header.part_num_blocks, header.block_size
    stored_block = header.block_dtype
    teacher.eval()
    bar = tqdm(total=blocks_total, initial=done, unit="block", disable=not progress, dynamic_ncols=True,
               desc=f"cache-teacher part {header.part}/{header.parts}")
    batches = 0
    fd = os.open(partial, os.O_RDWR)
    try:
        while done < blocks_total and (max_batches is None or batches < max_batches):
            count = min(step, blocks_total - done)
            starts = (first + done + np.arange(count)) * block_size
            window = np.asarray(tokens)[starts[:, None] + np.arange(block_size)]
            rec = teacher_records(teacher, torch.from_numpy(window.astype(np.int64)), header.k, header.temperatures,
                                  header.record_dtype, header.value_dtype, header.tail_samples, first + done)
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
    return done


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

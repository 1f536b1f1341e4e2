"""A damaged teacher cache is refused before training, naming the file, block and fix: the
per-block checksums and header checksum of format 3, the token-id range check, version-2
caches (no checksums) read with a notice. The cache and teacher are test_teacher_cache's."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdistill.cli import main
from lmdistill.teacher_cache.format import HEADER_BYTES, TeacherCacheError, part_name, read_header
from lmdistill.teacher_cache.reader import TeacherCache

from .test_teacher_cache import B, _overrides, build, distill_config, ws  # noqa: F401 (ws: the shared fixture)

VOCAB = 50257
NAME = part_name("train", 0, 1)


def damaged_copy(source: Path, folder: Path, edit) -> Path:
    """A copy of the cache ``source`` whose first part's stored blocks ``edit(blocks)`` changes
    in place (a writable memory map of the file's block records and checksums)."""
    shutil.copytree(source, folder)
    path = folder / NAME
    header = read_header(path)
    blocks = np.memmap(path, dtype=header.block_dtype, mode="r+", offset=HEADER_BYTES,
                       shape=(header.part_num_blocks,))
    edit(blocks)
    blocks.flush()
    del blocks
    return path


def refusal(folder: Path) -> str:
    with pytest.raises(TeacherCacheError) as err:
        TeacherCache(folder)
    return str(err.value)


def test_ids_overwritten_with_ff_are_refused_before_training(ws, tmp_path, capsys):
    def overwrite_ids(blocks):
        blocks["records"]["indices"][5, 3] = 0xFFFF  # position 3 of block 5: all top-k ids

    path = damaged_copy(ws["cache"], tmp_path / "cache", overwrite_ids)
    message = refusal(tmp_path / "cache")
    assert message.startswith(f"teacher cache file {path}: block 5 (positions {5 * B}..{6 * B - 1}), position "
                              f"{5 * B + 3}: top-k token id 65535 is outside the vocabulary of 50,257 tokens")
    assert message.endswith("the file is damaged: delete it and rerun the lmdistill cache-teacher command that built it")
    # Through the CLI: one line, exit 2, and no run folder.
    config = distill_config(ws, None, max_steps=1)
    run = tmp_path / "run"
    rc = main(["distill", "--out", str(run), "--teacher-cache", str(tmp_path / "cache"), *_overrides(config)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"lmdistill distill: error: teacher cache file {path}: block 5 ") and "Traceback" not in err
    assert not run.exists()


@pytest.mark.parametrize("what", ["value", "tail id", "lse", "checksum"])
def test_one_flipped_bit_in_range_fails_the_blocks_checksum(ws, tmp_path, what):
    def flip(blocks):
        records = blocks["records"]
        if what == "value":
            records["values"][7, 10, 2] ^= 1  # the last mantissa bit of an fp16 value: a finite value still
            assert np.isfinite(records["values"][7, 10, 2:3].view(np.float16)).all()
        elif what == "tail id":
            records["tail_ids"][7, 10, 1, 4] ^= 1
            assert records["tail_ids"][7, 10, 1, 4] < VOCAB  # still a token: only the checksum can tell
        elif what == "lse":
            records["lse"][7, 10, 0] = np.nextafter(records["lse"][7, 10, 0], np.float32(np.inf))
        else:
            blocks["checksum"][7] ^= 1 << 31

    path = damaged_copy(ws["cache"], tmp_path / "cache", flip)
    message = refusal(tmp_path / "cache")
    assert message.startswith(f"teacher cache file {path}: block 7 (positions {7 * B}..{8 * B - 1}) fails its "
                              f"checksum (stored ")
    assert "delete it and rerun the lmdistill cache-teacher command" in message


def test_a_block_stored_at_another_blocks_place_fails_its_checksum(ws, tmp_path):
    def swap(blocks):
        blocks[[2, 3]] = blocks[[3, 2]]  # records and checksums moved together

    damaged_copy(ws["cache"], tmp_path / "cache", swap)
    assert ": block 2 (positions" in refusal(tmp_path / "cache")  # the checksum covers the block's index


def test_a_damaged_header_fails_its_checksum(ws, tmp_path):
    shutil.copytree(ws["cache"], tmp_path / "cache")
    path = tmp_path / "cache" / NAME
    raw = bytearray(path.read_bytes())
    raw[72] ^= 1  # the first temperature's lowest bit: still a valid, finite, positive temperature
    path.write_bytes(raw)
    assert refusal(tmp_path / "cache") == (
        f"teacher cache file {path}: its header fails its checksum; the file is damaged: delete it and rerun the "
        f"lmdistill cache-teacher command that built it")


@pytest.fixture(scope="module")
def two_parts(ws):
    out = ws["root"] / "integrity_parts"
    for rank in (0, 1):
        assert build(ws, out, rank=rank, world_size=2).complete
    return out


def test_a_truncated_part_is_refused_and_rebuilt_by_the_fix_it_names(ws, two_parts, tmp_path):
    folder = tmp_path / "parts"
    shutil.copytree(two_parts, folder)
    path = folder / part_name("train", 1, 2)
    path.write_bytes(path.read_bytes()[:-10])
    message = refusal(folder)
    assert f"teacher cache file {path}: truncated: " in message
    assert message.endswith("delete it and rerun the lmdistill cache-teacher command that built this part "
                            "(--rank 1 --world-size 2; the other parts are kept)")
    # The fix as named: delete the part and rerun its build; the cache is whole again.
    path.unlink()
    assert build(ws, folder, rank=1, world_size=2).resumed_from == 0
    assert path.read_bytes() == (two_parts / path.name).read_bytes()
    single, parts = TeacherCache(ws["cache"]), TeacherCache(folder)
    blocks = np.arange(single.header.num_blocks)
    assert parts.records(blocks).tobytes() == single.records(blocks).tobytes()


def test_a_block_damaged_after_the_cache_was_opened_is_refused_when_read(ws, tmp_path):
    shutil.copytree(ws["cache"], tmp_path / "cache")
    cache = TeacherCache(tmp_path / "cache")  # verified intact
    good = cache.targets([4, 9], 2.0)
    path = tmp_path / "cache" / NAME
    with open(path, "r+b") as fh:  # a flipped bit in the first value of block 9 (reaches the open memory map)
        fh.seek(HEADER_BYTES + 9 * cache.header.block_dtype.itemsize)
        byte = fh.read(1)[0]
        fh.seek(-1, 1)
        fh.write(bytes([byte ^ 1]))
    assert torch.equal(cache.targets([4], 2.0).values, good.values[:1])  # other blocks still read
    with pytest.raises(TeacherCacheError, match=rf"^teacher cache file {path}: block 9 \(positions .* fails its checksum"):
        cache.targets([4, 9], 2.0)


# ---------------------------------------------------------------------------------------
# Version 2 (before the checksums)


def write_version_2(source: Path, folder: Path) -> Path:
    """The cache ``source`` in the version-2 layout: no header checksum, blocks of records only."""
    folder.mkdir()
    header = read_header(source / NAME)
    blocks = np.fromfile(source / NAME, dtype=header.block_dtype, offset=HEADER_BYTES)
    path = folder / NAME
    path.write_bytes(replace(header, version=2).pack() + np.ascontiguousarray(blocks["records"]).tobytes())
    return path


def test_a_version_2_cache_is_read_with_a_notice_and_its_ids_are_checked(ws, tmp_path, capsys):
    path = write_version_2(ws["cache"], tmp_path / "v2")
    old, new = TeacherCache(tmp_path / "v2"), TeacherCache(ws["cache"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"[lmdistill] teacher cache {tmp_path / 'v2'} is in format "
                                                   f"version 2, without checksums")
    assert old.header.version == 2 and not old.header.has_checksums
    blocks = np.arange(new.header.num_blocks)
    for T in (1.0, 2.0):
        a, b = old.targets(blocks, T), new.targets(blocks, T)
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("values", "indices", "lse", "tail_indices",
                                                                        "tail_values"))
    TeacherCache(tmp_path / "v2")  # a run opens its cache twice: one notice per process
    assert capsys.readouterr().out == ""
    # Out-of-range ids are refused without checksums too.
    raw = bytearray(path.read_bytes())
    header = old.header
    at = HEADER_BYTES + (3 * B + 1) * header.record_dtype.itemsize + header.record_dtype.fields["tail_ids"][1]
    raw[at : at + 2] = b"\xff\xff"
    (tmp_path / "v2_bad").mkdir()
    (tmp_path / "v2_bad" / NAME).write_bytes(raw)
    assert refusal(tmp_path / "v2_bad").startswith(
        f"teacher cache file {tmp_path / 'v2_bad' / NAME}: block 3 (positions {3 * B}..{4 * B - 1}), position "
        f"{3 * B + 1}: tail-sample token id 65535 is outside the vocabulary")
    # A version-3 build never mixes into a version-2 folder.
    with pytest.raises(TeacherCacheError, match=r"other settings \(train.00000-of-00001.bin: version 2 vs 3\)"):
        build(ws, tmp_path / "v2")


@pytest.mark.parametrize("bad, match", [
    ({"temperatures": (2.0, 2.0)}, "temperatures 2, 2 repeat a value"),
    ({"batch_size": 0}, "batch_size=0: the batch size must be at least 1"),
    ({"value_dtype": "fp8"}, "value_dtype=fp8: the value dtype must be one of fp16, bf16"),
    ({"block_size": 129}, "block_size=129: the block size must be between 1 and the teacher's context of 128 tokens"),
    ({"top_k": 50257}, "top_k=50257 keeps the whole vocabulary: there is no tail to sample; use tail_samples=0"),
    ({"top_k": 50258}, "top_k=50258 exceeds the teacher's vocabulary of 50,257 tokens; use at most 50257"),
    ({"rank": 1}, r"rank=1 must be below world_size=1 \(parts 0 to 0\)"),
])
def test_bad_build_arguments_are_tool_errors_before_anything_is_written(ws, tmp_path, bad, match):
    with pytest.raises(TeacherCacheError, match=match):  # a DataError, so the CLI reports it in one line
        build(ws, tmp_path / "c", **bad)
    assert not (tmp_path / "c").exists()

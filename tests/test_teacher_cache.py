"""Stored teacher soft targets: the cache format, its checks, resume and parts, the sparse KL,
and distillation from a cache, on tiny GPT-2-shaped teachers with the real GPT-2 tokenizer."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdistill.train.rundir import read_metrics
from lmdistill.cli import main
from lmdistill.config import ConfigError
from lmdistill.recipe import load_config
from lmdistill.data.corpora import corpus_documents
from lmdistill.data.prepare import prepare
from lmdistill.loss.sparse import sparse_kl_divergence
from lmdistill.loss.terms import kl_divergence
from lmdistill.models.fingerprint import model_fingerprint, tokenizer_fingerprint
from lmdistill.models.load import load_model
from lmdistill.teacher_cache.build import build_teacher_cache
from lmdistill.teacher_cache.format import CACHE_VERSION, HEADER_BYTES, TeacherCacheError, data_fingerprint, part_name
from lmdistill.teacher_cache.reader import TeacherCache
from lmdistill.train.run import run_training

from .helpers import save_with_tokenizer, small_text_file, softmax64, tiny_gpt2

B = 32  # block size of the shared cache
TEMPS = (1.0, 2.0)


def split_folder(folder: Path, train_chars: int, validation_chars: int, offset: int = 0) -> Path:
    """A source folder with train/validation/test files cut from Moby-Dick (sizes under our control)."""
    text = "\n\n".join(doc.text for doc in corpus_documents("moby_dick", "train")[:12])[offset:]
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text(text[:train_chars])
    (folder / "validation.txt").write_text(text[train_chars : train_chars + validation_chars])
    (folder / "test.txt").write_text(text[train_chars + validation_chars : train_chars + validation_chars + 500])
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory, gpt2_tokenizer, one_thread):
    root = tmp_path_factory.mktemp("teacher_cache")
    src = split_folder(root / "src", 5000, 2500)
    other_src = split_folder(root / "other_src", 5000, 2500, offset=20_000)
    data = prepare(gpt2_tokenizer, [str(src)], root / "data")
    teacher_dir = save_with_tokenizer(tiny_gpt2(n_layer=4, seed=0), gpt2_tokenizer, root / "teacher")
    teacher = load_model(teacher_dir)
    ws = {
        "root": root, "src": src, "other_src": other_src, "data": data, "teacher_dir": teacher_dir,
        "teacher": teacher, "fp": tokenizer_fingerprint(gpt2_tokenizer), "tokenizer": gpt2_tokenizer,
        "other_teacher_dir": save_with_tokenizer(tiny_gpt2(n_layer=4, seed=1), gpt2_tokenizer, root / "teacher2"),
    }
    ws["cache"] = root / "cache"
    result = build(ws, ws["cache"])
    assert result.complete and result.resumed_from == 0
    return ws


def build(ws, out: Path, **kw):
    args = dict(top_k=16, temperatures=TEMPS, block_size=B, tokenizer_fingerprint=ws["fp"], batch_size=4,
                progress=False, tail_samples=8)
    return build_teacher_cache(ws["teacher"], ws["data"], out, **{**args, **kw})


def teacher_logits(model, data, blocks: np.ndarray, batch_size: int) -> torch.Tensor:
    """The teacher's logits on the sampler's block inputs ``tokens[i*B : i*B + B]``, run in the
    builder's batches (so that float results match to the bit)."""
    tokens = np.asarray(data.tokens("train"))
    window = torch.from_numpy(tokens[(blocks * B)[:, None] + np.arange(B)].astype(np.int64))
    with torch.no_grad():
        return torch.cat([model(input_ids=window[i : i + batch_size]).logits.float()
                          for i in range(0, len(window), batch_size)])


def payload(path: Path) -> bytes:
    return path.read_bytes()[HEADER_BYTES:]


# ---------------------------------------------------------------------------------------
# Round trip and format


def test_round_trip_matches_the_teachers_logits_on_the_samplers_blocks(ws):
    cache = TeacherCache(ws["cache"])
    tokens = ws["data"].tokens("train")
    h = cache.header
    assert h.num_blocks == (len(tokens) - 1) // B and h.total_positions == h.num_blocks * B
    assert h.k == 16 and h.temperatures == TEMPS and h.vocab_size == 50257
    blocks = np.arange(h.num_blocks)
    logits = teacher_logits(ws["teacher"], ws["data"], blocks, batch_size=4)
    top, idx = logits.topk(16, dim=-1)
    peak = top[..., :1]
    for T in TEMPS:
        got = cache.targets(blocks, T)
        assert got.values.dtype == torch.float16 and got.indices.dtype == torch.int64 and got.lse.dtype == torch.float32
        assert torch.equal(got.indices, idx)
        assert torch.equal(got.values, (top - peak).half())  # the logits, shifted by the max, rounded to fp16
        assert torch.equal(got.lse, torch.logsumexp((logits - peak) / T, dim=-1))
        # So exp(v / T - lse) is the teacher's probability at T, up to the fp16 rounding of v.
        probs = torch.softmax(logits / T, dim=-1).gather(-1, idx)
        assert torch.allclose((got.values.float() / T - got.lse.unsqueeze(-1)).exp(), probs, rtol=2e-3, atol=1e-7)
        # Tail samples: 8 ids per position from outside the top-k, with their shifted logits.
        assert got.tail_indices.shape == (len(blocks), B, 8) and got.tail_values.dtype == torch.float16
        assert not (got.tail_indices.unsqueeze(-1) == idx.unsqueeze(-2)).any()
        assert torch.equal(got.tail_values, (logits - peak).gather(-1, got.tail_indices).half())
    # Any order of blocks, as the sampler draws them, from raw records too.
    picked = np.array([5, 0, cache.header.num_blocks - 1])
    assert torch.equal(cache.targets(picked, 2.0).indices, idx[picked])
    raw = cache.records(picked)
    assert raw.shape == (3, B) and raw["indices"].dtype == np.dtype("<u2")  # the vocabulary fits uint16
    # The header's first fields, as documented.
    magic, version, k, value_code, index_code, n_t = struct.unpack_from("<6i", (ws["cache"] / part_name("train", 0, 1)).read_bytes())
    assert (k, value_code, index_code, n_t, version) == (16, 1, 2, 2, CACHE_VERSION)


def test_bf16_values_and_int32_indices(ws, gpt2_tokenizer, tmp_path):
    big_vocab = tiny_gpt2(n_layer=1, seed=3, vocab_size=70_000)  # > 65536 ids: indices stored as int32
    result = build_teacher_cache(big_vocab, ws["data"], tmp_path / "c", top_k=4, temperatures=[3.0], block_size=B,
                                 tokenizer_fingerprint=ws["fp"], value_dtype="bf16", batch_size=2, progress=False)
    cache = TeacherCache(tmp_path / "c")
    assert result.complete and cache.header.index_code == 4 and cache.header.value_dtype == "bf16"
    blocks = np.array([2, 3])  # the builder's second batch
    logits = teacher_logits(big_vocab, ws["data"], blocks, batch_size=2)
    top, idx = logits.topk(4, dim=-1)
    got = cache.targets(blocks, 3.0)
    assert got.values.dtype == torch.bfloat16 and torch.equal(got.values, (top - top[..., :1]).bfloat16())
    assert torch.equal(got.indices, idx) and torch.equal(got.lse, torch.logsumexp((logits - top[..., :1]) / 3.0, -1))


def test_cli_cache_teacher_writes_the_same_cache(ws, capsys, tmp_path):
    rc = main(["cache-teacher", "--teacher", str(ws["teacher_dir"]), "--data", str(ws["data"].out_dir), "--top-k", "16",
               "--temperatures", "1,2", "--block-size", str(B), "--batch-size", "4", "--tail-samples", "8",
               "--out", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert rc == 0 and "complete:" in out and "top-16 logits (fp16)" in out and "8 tail samples" in out
    name = part_name("train", 0, 1)
    assert (tmp_path / "c" / name).read_bytes() == (ws["cache"] / name).read_bytes()
    # Bad arguments fail as one line before the teacher runs.
    rc = main(["cache-teacher", "--teacher", str(ws["teacher_dir"]), "--data", str(ws["data"].out_dir), "--top-k",
               "60000", "--block-size", str(B), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--top-k 60000 exceeds the teacher's vocabulary of 50,257 tokens" in err
    assert not (tmp_path / "d").exists()
    rc = main(["cache-teacher", "--teacher", str(ws["teacher_dir"]), "--data", str(ws["data"].out_dir), "--top-k",
               "4", "--tail-samples", "-1", "--block-size", str(B), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "--tail-samples -1: tail samples must be 0 (tail bucket only) to 4096" in err and not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------
# Checks


def test_a_cache_from_another_teacher_tokenizer_or_data_is_refused(ws, tmp_path):
    cache = TeacherCache(ws["cache"])
    cache.check(teacher_fingerprint=model_fingerprint(ws["teacher"]), tokenizer_fingerprint=ws["fp"],
                data_fingerprint=data_fingerprint(ws["data"]), block_size=B, temperature=2.0)  # all match
    other_teacher = load_model(ws["other_teacher_dir"])  # same config, other weights
    with pytest.raises(TeacherCacheError, match="built from another teacher .weights fingerprint"):
        cache.check(teacher_fingerprint=model_fingerprint(other_teacher))
    other_tokenizer = ws["tokenizer"].__class__.from_pretrained(ws["teacher_dir"])
    other_tokenizer.add_tokens(["<extra_token>"])
    with pytest.raises(TeacherCacheError, match="built with another tokenizer"):
        cache.check(tokenizer_fingerprint=tokenizer_fingerprint(other_tokenizer))
    other_data = prepare(ws["tokenizer"], [str(ws["other_src"])], tmp_path / "other_data")
    with pytest.raises(TeacherCacheError, match="built on other token data"):
        cache.check(data_fingerprint=data_fingerprint(other_data))
    with pytest.raises(TeacherCacheError, match=r"blocks of 32 tokens.*not data.block_size=16.*data.block_size=32"):
        cache.check(block_size=16)
    with pytest.raises(TeacherCacheError, match=r"temperature\(s\) 1, 2 only, not at loss.temperature=3"):
        cache.targets([0], 3.0)
    # Building into the folder with other settings is refused rather than mixed in.
    with pytest.raises(TeacherCacheError, match="other settings"):
        build(ws, ws["cache"], top_k=8)


def test_truncated_or_foreign_files_are_refused(ws, tmp_path):
    name = part_name("train", 0, 1)
    for case in ("truncated", "magic", "missing"):
        folder = tmp_path / case
        shutil.copytree(ws["cache"], folder)
        path = folder / name
        raw = bytearray(path.read_bytes())
        if case == "truncated":
            path.write_bytes(raw[:-10])
            match = "truncated: .* bytes on disk"
        elif case == "magic":
            raw[0:4] = b"\0\0\0\0"
            path.write_bytes(raw)
            match = "bad magic number"
        else:
            path.unlink()
            match = "holds no complete 'train' cache"
        with pytest.raises(TeacherCacheError, match=match):
            TeacherCache(folder)


# ---------------------------------------------------------------------------------------
# Resume and parts


def test_resume_after_a_kill_writes_the_same_bytes(ws, tmp_path):
    name = part_name("train", 0, 1)
    reference = (ws["cache"] / name).read_bytes()
    out = tmp_path / "c"
    first = build(ws, out, max_batches=3)
    assert not first.complete and first.blocks_done == 12 and first.path.name == name + ".partial"
    with pytest.raises(TeacherCacheError, match="no complete 'train' cache .unfinished"):
        TeacherCache(out)
    # A kill after the next batch reached the disk but before its progress was recorded: the
    # resumed run redoes that batch (and never trusts bytes past the recorded progress).
    block = TeacherCache(ws["cache"]).header.block_dtype.itemsize  # B records and the block's checksum
    with open(first.path, "r+b") as fh:
        fh.seek(HEADER_BYTES + 12 * block)
        fh.write(b"\xff" * (4 * block))
    assert json.loads((out / "train.00000-of-00001.progress.json").read_text())["blocks_done"] == 12
    second = build(ws, out, batch_size=7)  # the interrupted run's batch size is kept, so the bytes match
    assert second.complete and second.resumed_from == 12
    assert (out / name).read_bytes() == reference
    assert sorted(p.name for p in out.iterdir()) == [name]  # no .partial, no progress file left
    assert build(ws, out).resumed_from == second.blocks_total  # complete: nothing recomputed


def test_two_ranks_parts_equal_the_single_process_cache(ws, tmp_path):
    out = tmp_path / "parts"
    part0 = build(ws, out, rank=0, world_size=2)
    with pytest.raises(TeacherCacheError, match=r"incomplete: part\(s\) 1 of 2"):
        TeacherCache(out)
    with pytest.raises(TeacherCacheError, match="split into 2 parts.*--world-size 2"):
        build(ws, out)  # a single-process build into a folder of 2-part files
    part1 = build(ws, out, rank=1, world_size=2)
    assert part0.complete and part1.complete
    single, parts = TeacherCache(ws["cache"]), TeacherCache(out)
    blocks = np.arange(single.header.num_blocks)
    assert parts.header.num_blocks == single.header.num_blocks and len(parts.paths) == 2
    assert parts.records(blocks).tobytes() == single.records(blocks).tobytes()
    assert payload(part0.path) + payload(part1.path) == payload(single.paths[0])


# ---------------------------------------------------------------------------------------
# Sparse KL


def reference_sparse_kl(student: np.ndarray, teacher: np.ndarray, k: int, T: float) -> np.ndarray:
    """Per position, in float64, written plainly: the KL between teacher and student
    distributions coarsened to the teacher's top-k tokens plus one bucket for the rest."""
    out = np.zeros(student.shape[:2])
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            p, q = softmax64(teacher[b, t], T), softmax64(student[b, t], T)
            top = np.argsort(-teacher[b, t], kind="stable")[:k]
            p_top, q_top = p[top], q[top]
            kl = float(np.sum(p_top * np.log(p_top / q_top)))
            p_tail, q_tail = 1.0 - p_top.sum(), 1.0 - q_top.sum()
            if k < len(p) and p_tail > 0:
                kl += p_tail * np.log(p_tail / q_tail)
            out[b, t] = kl * T * T
    return out


def sparse_inputs(teacher: torch.Tensor, k: int, T: float):
    top, idx = teacher.topk(k, dim=-1)
    shift = top[..., :1]  # the cache's shift; the result must not depend on it
    return top - shift, idx, torch.logsumexp((teacher - shift) / T, dim=-1)


@pytest.mark.parametrize("k,T", [(5, 1.0), (5, 2.0), (1, 0.5), (19, 3.0)])
def test_sparse_kl_matches_a_float64_reference(k, T):
    g = torch.Generator().manual_seed(k)
    student = torch.randn(2, 3, 20, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 3, 20, generator=g, dtype=torch.float64) * 3
    values, idx, lse = sparse_inputs(teacher, k, T)
    per_pos = reference_sparse_kl(student.numpy(), teacher.numpy(), k, T)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    got = sparse_kl_divergence(student, values, idx, lse, mask=mask, temperature=T, reduction="sum")
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(per_pos[mask.numpy()].sum(), rel=1e-10, abs=1e-12)
    mean = sparse_kl_divergence(student, values, idx, lse, temperature=T)
    assert mean.item() == pytest.approx(per_pos.mean(), rel=1e-10, abs=1e-12)
    # Coarsening never increases a KL: at most the full one.
    assert mean.item() <= kl_divergence(student, teacher, temperature=T).item() + 1e-12


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sparse_kl_with_k_equal_to_the_vocabulary_is_the_full_kl(T):
    g = torch.Generator().manual_seed(7)
    student = torch.randn(2, 4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 11, generator=g, dtype=torch.float64) * 2
    values, idx, lse = sparse_inputs(teacher, 11, T)
    sparse = sparse_kl_divergence(student, values, idx, lse, temperature=T, reduction="sum")
    full = kl_divergence(student, teacher, temperature=T, reduction="sum")
    assert sparse.item() == pytest.approx(full.item(), rel=1e-12, abs=1e-14)
    (g_sparse,) = torch.autograd.grad(sparse, student)
    (g_full,) = torch.autograd.grad(full, student)
    assert torch.isfinite(g_sparse).all() and torch.allclose(g_sparse, g_full, rtol=1e-10, atol=1e-12)


def test_sparse_kl_gradient_and_edge_cases():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(1, 3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 3, 9, generator=g, dtype=torch.float64)
    values, idx, lse = sparse_inputs(teacher, 3, 2.0)
    assert torch.autograd.gradcheck(lambda s: sparse_kl_divergence(s, values, idx, lse, temperature=2.0), (student,))
    # All positions masked: 0 with a working backward, for both reductions.
    for reduction in ("mean", "sum"):
        loss = sparse_kl_divergence(student, values, idx, lse, mask=torch.zeros(1, 3), temperature=2.0,
                                    reduction=reduction)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))
        student.grad = None
    # fp16 teacher values (as stored) against float32 student logits: float32 result close to float64.
    s32 = student.detach().float()
    low = sparse_kl_divergence(s32, values.half(), idx, lse.float(), temperature=2.0)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(sparse_kl_divergence(student, values, idx, lse, temperature=2.0).item(), rel=2e-3)
    with pytest.raises(ValueError, match="1 <= k <= vocab"):
        sparse_kl_divergence(student, torch.zeros(1, 3, 10), torch.zeros(1, 3, 10, dtype=torch.long), lse)
    with pytest.raises(ValueError, match="teacher_lse must have shape"):
        sparse_kl_divergence(student, values, idx, lse[:, :2])


# ---------------------------------------------------------------------------------------
# Distillation from a cache


def distill_config(ws, cache: Path | None, src: Path | None = None, prepared: Path | None = None, **train):
    overrides = [
        f"model.teacher={ws['teacher_dir']}", "model.num_layers=2",
        f"data.sources=[{src or ws['src']}]", f"data.prepared_dir={prepared or ws['data'].out_dir}",
        f"data.block_size={train.pop('block_size', B)}", "loss.cos=0", "loss.temperature=2",
        "train.lr=1e-3", "train.warmup=0", "train.eval_every=0", "train.checkpoint_every=0", "train.eval_tokens=64",
        "train.threads=1", "train.batch_size=2",
    ]
    if train.pop("random_init", False):
        overrides.append("model.random_init=true")  # a student far from the teacher: a large KL
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    if cache is not None:
        overrides.append(f"model.teacher_cache={cache}")
    return load_config(None, overrides)


def first_step(run: Path) -> dict:
    return next(r for r in read_metrics(run / "metrics.jsonl") if "loss" in r)


def test_distill_refuses_what_a_cache_cannot_serve(ws, tmp_path):
    cases = [
        ({"cos": 1.0}, ConfigError, r"model.teacher_cache: .*not hidden states, so loss.cos .*set loss.cos=0"),
        ({"cos": 0, "align_mse": 1.0}, ConfigError, r"so loss.align_mse cannot be computed"),
        ({"cos": 0, "divergence": "reverse_kl"}, ConfigError, "forward KL only, not loss.divergence=reverse_kl"),
        ({"cos": 0, "kl": 0}, ConfigError, "loss.kl is 0, so the cache would never be read"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            load_config(None, [f"model.teacher_cache={ws['cache']}", "train.max_steps=1",
                               *[f"loss.{k}={v}" for k, v in change.items()]])
    mismatches = [
        (distill_config(ws, ws["cache"], max_steps=1, block_size=16), "blocks of 32 tokens"),
        (load_config(None, [*_overrides(distill_config(ws, ws["cache"], max_steps=1)), "loss.temperature=3"]),
         r"temperature\(s\) 1, 2 only"),
        (distill_config(ws, ws["cache"], src=ws["other_src"], prepared=tmp_path / "other_data", max_steps=1),
         "built on other token data"),
        (load_config(None, [*_overrides(distill_config(ws, ws["cache"], max_steps=1)),
                            f"model.teacher={ws['other_teacher_dir']}"]), r"another teacher .weights fingerprint"),
    ]
    for config, match in mismatches:
        with pytest.raises(TeacherCacheError, match=match):
            run_training(config, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()  # refused before any training or run folder


def test_distill_cli_reports_a_cache_mismatch_in_one_line(ws, tmp_path, capsys):
    config = distill_config(ws, None, max_steps=1, block_size=16)
    rc = main(["distill", "--out", str(tmp_path / "run"), "--teacher-cache", str(ws["cache"]), *_overrides(config)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("lmdistill distill: error: teacher cache ") and "set data.block_size=32" in err
    rc = main(["distill", "--resume", str(tmp_path / "run"), "--teacher-cache", str(ws["cache"])])
    assert rc == 2 and "saved config.yaml; drop --teacher-cache" in capsys.readouterr().err


def _overrides(config) -> list[str]:
    return [f"{section}.{name}={json.dumps(value)}" for section, fields in config.to_dict().items()
            for name, value in fields.items()]


@pytest.fixture(scope="module")
def full_vocab(ws):
    """A cache with k = the whole vocabulary (no tail) on a very small split, blocks of 16."""
    root = ws["root"] / "full_vocab"
    src = split_folder(root / "src", 900, 400)
    data = prepare(ws["tokenizer"], [str(src)], root / "data")
    # Larger embeddings (tied to the lm_head) give logits spread over several units, so that the
    # student cut from this teacher is measurably far from it (a random tiny GPT-2 is near uniform).
    model = tiny_gpt2(n_layer=4, seed=0)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(30.0)
    teacher_dir = save_with_tokenizer(model, ws["tokenizer"], root / "teacher")
    teacher = load_model(teacher_dir)
    for name, k, samples in (("cache_50257", 50257, 0), ("cache_8", 8, 0), ("cache_8_s512", 8, 512)):
        build_teacher_cache(teacher, data, root / name, top_k=k, temperatures=[2.0], block_size=16,
                            tokenizer_fingerprint=ws["fp"], batch_size=8, progress=False, tail_samples=samples)
    return {"root": root, "src": src, "data": data, "teacher_dir": teacher_dir}


def test_distill_with_a_full_vocabulary_cache_logs_the_live_kl(ws, full_vocab, tmp_path, capsys):
    ws = {**ws, "teacher_dir": full_vocab["teacher_dir"]}
    common = dict(src=full_vocab["src"], prepared=full_vocab["data"].out_dir, block_size=16, max_steps=1,
                  batch_size=4, random_init=True)
    run_training(distill_config(ws, None, **common), tmp_path / "live", progress=False)
    # The CLI flag is the config field: same run, and config.yaml records the cache.
    config = distill_config(ws, None, **common)
    cache_all = full_vocab["root"] / "cache_50257"
    rc = main(["distill", "--out", str(tmp_path / "cached"), "--teacher-cache", str(cache_all), *_overrides(config)])
    assert rc == 0, capsys.readouterr().err
    assert load_config(tmp_path / "cached" / "config.yaml").model.teacher_cache == str(cache_all)
    run_training(distill_config(ws, full_vocab["root"] / "cache_8", **common), tmp_path / "top8", progress=False)
    run_training(distill_config(ws, full_vocab["root"] / "cache_8_s512", **common), tmp_path / "s512", progress=False)
    live, cached, top8, s512 = (first_step(tmp_path / name) for name in ("live", "cached", "top8", "s512"))
    assert set(cached) == set(live)  # kl and ce logged as before
    # Only the fp16 rounding of the stored values (logit - max) separates the two (measured: 3e-6).
    assert cached["kl"] == pytest.approx(live["kl"], rel=1e-4)
    assert cached["grad_norm"] == pytest.approx(live["grad_norm"], rel=1e-4)
    assert cached["ce"] == pytest.approx(live["ce"], rel=1e-6)
    assert abs(top8["kl"] - live["kl"]) > 10 * abs(cached["kl"] - live["kl"])
    assert top8["kl"] < live["kl"]  # the coarsened KL is a lower bound
    # Tail samples estimate the full KL; the bucket misses most of the tail.
    assert abs(s512["kl"] - live["kl"]) < 0.2 * abs(top8["kl"] - live["kl"]), (s512, top8, live)
    # (measured: live 7.458, top-8 bucket 2.514, top-8 + 512 samples 7.440; the gradients are
    # compared in tests/test_sparse.py, here the random student's CE dominates them.)


def test_distill_from_a_small_k_cache_trains_and_resumes(ws, tmp_path, monkeypatch):
    text_root = ws["root"] / "bigger"
    text_root.mkdir(exist_ok=True)
    src = small_text_file(text_root, characters=30_000)
    data = prepare(ws["tokenizer"], [str(src)], text_root / "data")
    build_teacher_cache(ws["teacher"], data, text_root / "cache", top_k=8, temperatures=[2.0], block_size=B,
                        tokenizer_fingerprint=ws["fp"], batch_size=16, progress=False)
    common = dict(src=src, prepared=data.out_dir)
    config = distill_config(ws, text_root / "cache", **common, max_steps=30, batch_size=4, lr=3e-3, eval_every=10)
    run_training(config, tmp_path / "run", progress=False)
    val = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert val[0]["step"] == 0 and val[-1]["step"] == 30 and val[-1]["val_loss"] < val[0]["val_loss"] - 0.5, val

    # Resume works as with a live teacher, and a resumed run never loads the teacher's weights.
    short = distill_config(ws, text_root / "cache", **common, max_steps=4)
    run_training(short, tmp_path / "full", progress=False)
    run_training(short, tmp_path / "part", stop_at_step=2, progress=False)
    import lmdistill.train.setup as train_module

    loaded = []
    real_load = train_module.load_model
    monkeypatch.setattr(train_module, "load_model", lambda spec, *a, **kw: loaded.append(str(spec)) or real_load(spec, *a, **kw))
    assert run_training(None, tmp_path / "part", resume=True, progress=False)["step"] == 4
    assert loaded and str(ws["teacher_dir"]) not in loaded
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r}
    part = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl") if "loss" in r}
    assert sorted(full) == sorted(part) == [1, 2, 3, 4]
    assert all(part[s] == pytest.approx(full[s], abs=1e-6) for s in full)

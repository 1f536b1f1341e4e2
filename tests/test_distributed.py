"""Data parallelism through torchrun on the CPU (gloo): 2 real processes, the user's command.

Each torchrun launch costs about 10 s (two interpreters importing torch and transformers), so
launches are shared between tests through module-scoped fixtures; the one-process references
run in this process. Tiny GPT-2-shaped models (width 32), blocks of 32 tokens, a few steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lmdistill.train.rundir import RunDir, read_metrics
from lmdistill.config import ConfigError
from lmdistill.recipe import load_config
from lmdistill.data.errors import DataError
from lmdistill.data.sampler import BlockSampler
from lmdistill.models.device import cpu_computes_bf16
from lmdistill.train.rundir import RunDirError
from lmdistill.train.run import run_training
from lmdistill.train import setup as train_setup
from lmdistill.train.setup import build_setup, make_optimizer, resolve_precision
from lmdistill.train.step import train_step

from .helpers import LOGGED_REL, save_with_tokenizer, small_text_file, tiny_gpt2


@pytest.fixture(scope="module")
def ws(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("dist")
    return {
        "root": root,
        "text": small_text_file(root),
        "teacher": save_with_tokenizer(tiny_gpt2(n_layer=4, seed=0), gpt2_tokenizer, root / "teacher"),
        "teacher_dropout": save_with_tokenizer(tiny_gpt2(n_layer=4, dropout=0.1, seed=0), gpt2_tokenizer,
                                               root / "teacher_dropout"),
        "data": root / "data",
    }


# Runs in other layouts (2 processes vs 1, FSDP shards, other micro-batches) are the same
# maths, rounded differently in the last bits of every gradient (~1e-8 where large terms
# cancel). An Adam update is up to lr / adam_eps times as sensitive to that as the gradient: with
# the default eps (1e-6) that is 1e3, enough to move a weight whose gradient is ~eps by a full
# lr-sized step either way, depending on the CPU's kernels and thread count. With eps = 1e-3 (and
# lr = 1e-3) the factor is <= 1, so equivalent runs end within a few float32 ulps of |weight| <= ~1
# (1.2e-7 each): PARAM_ATOL. A wrong batch split or normalisation changes updates by ~lr / 2.
ADAM_EPS = 1e-3
PARAM_ATOL = 1e-6
GRAD_NORM_REL = 1e-5
"""Gradient norms of equivalent runs: LOGGED_REL plus float32 norms summed in another order
(measured under DDP: <= 4e-7)."""
FSDP_GRAD_NORM_REL = 1e-4
"""FSDP2's reported norm (of sharded DTensor gradients) is 3.4e-6 above one process's at the first
step and 1.4e-5 at the third, the same with any BLAS mode, while the weights agree to 1e-8; a
wrong normalisation over ranks would be a factor of 2."""


def overrides(ws, teacher: str = "teacher", **train) -> list[str]:
    values = [
        f"model.teacher={ws[teacher]}", "model.num_layers=2",
        f"data.sources=[{ws['text']}]", f"data.prepared_dir={ws['data']}", "data.block_size=32",
        "train.lr=1e-3", "train.warmup=0.2", "train.eval_every=0", "train.checkpoint_every=0", "train.eval_tokens=256",
        "train.threads=1", f"train.adam_eps={ADAM_EPS}",
    ]
    return values + [f"{k if '.' in k else 'train.' + k}={v}" for k, v in train.items()]


def config(ws, teacher: str = "teacher", **train):
    return load_config(None, overrides(ws, teacher, **{k.replace("__", "."): v for k, v in train.items()}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENTRY_POINT = Path(sys.executable).parent / "lmdistill"


def torchrun_command(args: list[str], nproc: int = 2, entry_point: bool = False) -> list[str]:
    """``torchrun ... -m lmdistill ARGS``, or with ``entry_point`` the installed ``lmdistill``
    command (``torchrun ... --no-python lmdistill ARGS``)."""
    program = ["--no-python", str(ENTRY_POINT)] if entry_point else ["-m", "lmdistill"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), *program, *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300, entry_point: bool = False) -> str:
    proc = subprocess.run(torchrun_command(args, nproc, entry_point), capture_output=True, text=True, env=env(),
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def params(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_same_params(a: Path, b: Path) -> None:
    """Equivalent runs' final weights agree to PARAM_ATOL, and they moved."""
    pa, pb, initial = params(a), params(b), params(a.parent / "student_init")
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.allclose(pa[name], pb[name], atol=PARAM_ATOL, rtol=0), (name, (pa[name] - pb[name]).abs().max())
    assert any(not torch.equal(pa[n], initial[n]) for n in pa), "training did not change the student"


def assert_same_run(a: Path, b: Path, grad_norm_rel: float = GRAD_NORM_REL) -> None:
    """Equivalent runs: the same losses and gradient norms at every step. Adam's update hardly
    depends on the gradient's scale, so the norm is what shows a wrong normalisation over ranks
    (a factor of 2)."""
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb), (sorted(la), sorted(lb))
    assert all(lb[s] == pytest.approx(la[s], rel=LOGGED_REL) for s in la), (la, lb)
    ga, gb = losses(a, "grad_norm"), losses(b, "grad_norm")
    assert all(gb[s] == pytest.approx(ga[s], rel=grad_norm_rel) for s in ga), (ga, gb)


def assert_identical_run(a: Path, b: Path) -> None:
    """The same run twice (same layout, same machine, one thread per process): every logged value
    and every weight equal to the bit."""
    assert losses(a) == losses(b) and losses(a, "grad_norm") == losses(b, "grad_norm")
    pa, pb = params(a / "student"), params(b / "student")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)


def run_files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}


# ---------------------------------------------------------------------------------------
# Two-process runs, each launched once


@pytest.fixture(scope="module")
def ddp_run(ws):
    """torchrun, 2 processes, DDP, batch 2 per process, the fused chunked loss (default)."""
    run = ws["root"] / "ddp"
    out = torchrun(["distill", "--out", str(run),
                    *overrides(ws, batch_size=2, max_steps=4, checkpoint_every=2)])
    return run, out


@pytest.fixture(scope="module")
def fsdp_run(ws):
    """torchrun, 2 processes, FSDP2 student and teacher, batch 2 x 2 micro-batches, the fused
    chunked loss (default); through the installed ``lmdistill`` command when there is one."""
    run = ws["root"] / "fsdp"
    out = torchrun(["distill", "--out", str(run),
                    *overrides(ws, batch_size=2, grad_accum=2, max_steps=3, checkpoint_every=2, distributed="fsdp",
                               teacher_sharding="fsdp")], entry_point=ENTRY_POINT.is_file())
    return run, out


def test_two_processes_equal_one_process_with_twice_the_batch(ws, ddp_run, tmp_path):
    run, out = ddp_run
    assert "2 process(es), student ddp" in out
    single = run_training(config(ws, batch_size=4, max_steps=4, checkpoint_every=2), tmp_path / "one", progress=False)
    assert single["tokens_seen"] == 4 * 4 * 32
    assert json.loads((run / "summary.json").read_text())["tokens_seen"] == single["tokens_seen"]
    assert_same_params(run / "student", tmp_path / "one" / "student")
    assert_same_run(run, tmp_path / "one")
    val = lambda d: [r["val_loss"] for r in read_metrics(d / "metrics.jsonl") if "val_loss" in r]  # noqa: E731
    # Full-precision val losses (~10.8): float32 NLLs summed per rank, then across ranks, of
    # weights within PARAM_ATOL: ~1e-7 relative; a window lost or scored twice is ~1e-2.
    assert np.allclose(val(run), val(tmp_path / "one"), atol=0, rtol=1e-6)


def test_only_rank_0_writes(ws, ddp_run, tmp_path):
    run, out = ddp_run
    run_training(config(ws, batch_size=4, max_steps=4, checkpoint_every=2), tmp_path / "one", progress=False)
    assert run_files(run) == run_files(tmp_path / "one")  # no stray or temporary files
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # one line per step, not one per rank
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 4]
    assert out.count("[lmdistill] done:") == 1 and out.count("step 0: validation perplexity") == 1
    assert out.count("student keeps teacher layers") == 1


def test_fsdp_student_and_teacher_equal_one_process(ws, fsdp_run, tmp_path):
    run, out = fsdp_run
    assert "2 process(es), student fsdp, teacher fsdp" in out
    one = tmp_path / "one"
    run_training(config(ws, batch_size=4, grad_accum=2, max_steps=3, checkpoint_every=2), one, progress=False)
    assert_same_params(run / "student", one / "student")
    assert_same_run(run, one, FSDP_GRAD_NORM_REL)


def test_two_processes_from_a_teacher_cache_equal_one_process(ws, gpt2_tokenizer, tmp_path):
    """Stored targets (top-k + tail samples, fused sparse KL) under DDP: each rank reads the
    targets of its own blocks, and the run is the one-process run with twice the batch."""
    from lmdistill.data.prepare import prepare
    from lmdistill.models.fingerprint import tokenizer_fingerprint
    from lmdistill.models.load import load_model
    from lmdistill.teacher_cache.build import build_teacher_cache

    data = prepare(gpt2_tokenizer, [str(ws["text"])], ws["data"])
    build_teacher_cache(load_model(ws["teacher"]), data, tmp_path / "cache", top_k=8, temperatures=[2.0],
                        block_size=32, tokenizer_fingerprint=tokenizer_fingerprint(gpt2_tokenizer), tail_samples=4,
                        progress=False)
    common = {"max_steps": 3, "loss.cos": 0, "model.teacher_cache": tmp_path / "cache"}
    out = torchrun(["distill", "--out", str(tmp_path / "two"), *overrides(ws, batch_size=2, **common)])
    assert "2 process(es), student ddp" in out and "4 tail samples" in out
    one = tmp_path / "one"
    run_training(config(ws, batch_size=4, max_steps=3, loss__cos=0, model__teacher_cache=tmp_path / "cache"), one,
                 progress=False)
    assert_same_params(tmp_path / "two" / "student", one / "student")
    assert_same_run(tmp_path / "two", one)


def rewind(run: Path, to: Path, step: int, **config_changes) -> Path:
    """A copy of a finished run as if it had been stopped after the checkpoint of ``step``."""
    shutil.copytree(run, to)
    for name in ("summary.json", "student"):
        shutil.rmtree(to / name, ignore_errors=True) if (to / name).is_dir() else (to / name).unlink(missing_ok=True)
    for ckpt in (to / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (to / "checkpoints" / "latest").write_text(f"step_{step:06d}\n")
    if config_changes:
        data = yaml.safe_load((to / "config.yaml").read_text())
        data["train"].update(config_changes)
        (to / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return to


def test_two_process_checkpoint_resumes_in_one_process_with_the_same_global_batch(ddp_run, tmp_path):
    run, _ = ddp_run
    with pytest.raises(RunDirError, match=r"global batch of 4 sequences.*train\.grad_accum=2 or train\.batch_size=4"):
        run_training(None, rewind(run, tmp_path / "as_is", 2), resume=True, progress=False)
    resumed = rewind(run, tmp_path / "accum", 2, grad_accum=2)  # 1 process x 2 sequences x 2 micro-batches
    summary = run_training(None, resumed, resume=True, progress=False)
    assert summary["finished"] and summary["step"] == 4
    assert_same_run(resumed, run)
    assert_same_params(resumed / "student", run / "student")


def test_fsdp_checkpoint_holds_full_state(fsdp_run, tmp_path):
    """The FSDP2 run's step-2 checkpoint (optimizer state gathered from the shards) continues
    in one process exactly as the two processes did."""
    run, _ = fsdp_run
    resumed = rewind(run, tmp_path / "one", 2, batch_size=4)
    assert run_training(None, resumed, resume=True, progress=False)["step"] == 3
    assert_same_run(resumed, run, FSDP_GRAD_NORM_REL)
    assert_same_params(resumed / "student", run / "student")


# ---------------------------------------------------------------------------------------
# Killed and resumed


def descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (from /proc/*/stat: torchrun starts its workers in
    sessions of their own, so killing its process group would leave them running)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds torchrun's workers through /proc")
def test_killed_two_process_run_resumes_with_the_same_losses(ws, tmp_path):
    # Dropout on: each rank's RNG state must come back for the losses to match. Full logits
    # (loss.chunk_tokens=0): the other runs here use the fused loss.
    args = overrides(ws, teacher="teacher_dropout", batch_size=2, max_steps=16, checkpoint_every=2,
                     **{"loss.chunk_tokens": 0})
    reference = tmp_path / "reference"
    torchrun(["distill", "--out", str(reference), *args])

    run = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_command(["distill", "--out", str(run), *args]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env())
    deadline = time.time() + 240
    while len(losses(run)) < 5:  # step 5 logged: the step-4 checkpoint is complete
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run ended or stalled before it could be killed:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.01)
    for pid in [*descendants(proc.pid), proc.pid]:  # the workers, then torchrun: nothing is left to clean up
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    latest = RunDir(run).latest_checkpoint()
    assert latest is not None and 4 <= int(latest.name.split("_")[1]) < 16, "killed too late to test a resume"
    assert not (run / "student").exists() and not (run / "summary.json").exists()

    out = torchrun(["distill", "--resume", str(run)])
    assert out.count(f"resuming {run} from step") == 1
    assert_identical_run(run, reference)  # both are the same 2-process run; the checkpoint is exact


# ---------------------------------------------------------------------------------------
# In-process checks (no launch)


def test_ranks_together_take_one_process_batch_blocks():
    """Rank r takes positions r, r+W, ... of the permutation: in every micro-batch the W ranks
    together take the W*b consecutive positions that one process with batch W*b takes."""
    tokens = np.arange(8 * 61 + 1, dtype=np.uint32)  # 61 blocks of 8: odd, so 2 ranks drop one per epoch
    one = BlockSampler(len(tokens), 8, 6, seed=5)
    ranks = [BlockSampler(len(tokens), 8, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):  # 60 blocks: the whole first epoch of both
        _, _, expected = one.next_indexed_batch(tokens)
        got = np.concatenate([s.next_indexed_batch(tokens)[2] for s in ranks])
        assert sorted(got) == sorted(expected)


def test_sampler_resumes_at_another_world_size():
    tokens = np.arange(8 * 48 + 1, dtype=np.uint32)
    two = [BlockSampler(len(tokens), 8, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for s in two:
            s.next_batch(tokens)
    state = two[0].state_dict()  # 12 blocks of epoch 0 consumed
    four = [BlockSampler(len(tokens), 8, 1, seed=1, rank=r, world_size=4) for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    after_two = np.concatenate([s.next_indexed_batch(tokens)[2] for s in two])
    after_four = np.concatenate([s.next_indexed_batch(tokens)[2] for s in four])
    assert sorted(after_two) == sorted(after_four)
    one = BlockSampler(len(tokens), 8, 1, seed=1)
    one.load_state_dict(state)
    assert one.state_dict()["position"] == 12
    with pytest.raises(DataError, match=r"5 processes cannot split.*Resume with 2 processes"):
        BlockSampler(len(tokens), 8, 1, seed=1, rank=0, world_size=5).load_state_dict(state)


def test_cpu_precision_is_float32_unless_bf16_is_native(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    with pytest.raises(ConfigError, match="train.precision: fp16 autocast is for CUDA.*train.precision=auto"):
        resolve_precision("fp16", cpu)
    monkeypatch.setattr(train_setup, "cpu_computes_bf16", lambda: True)
    assert resolve_precision("bf16", cpu) == torch.bfloat16 and resolve_precision("auto", cpu) is None
    monkeypatch.setattr(train_setup, "cpu_computes_bf16", lambda: False)
    with pytest.raises(ConfigError, match="bf16 needs a CPU that computes bf16 natively.*train.precision=fp32"):
        resolve_precision("bf16", cpu)


def test_precision_is_described_as_it_computes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train_setup.describe_precision(None, cpu) == "float32"
    assert train_setup.describe_precision(torch.bfloat16, cpu) == (
        "bf16 autocast (this CPU computes bf16 natively), float32 master weights")
    assert train_setup.describe_precision(torch.float16, cuda) == "fp16 autocast, float32 master weights"


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
def test_bf16_on_a_cpu_with_native_bf16_trains_with_float32_master_weights(ws, tmp_path):
    runs = {name: tmp_path / name for name in ("bf16", "fp32")}
    for name, out in runs.items():
        run_training(config(ws, max_steps=3, precision=name), out, progress=False)
    bf16, fp32 = ([r for r in read_metrics(out / "metrics.jsonl") if "loss" in r] for out in runs.values())
    # Step 1 starts from the same weights and batch: only the matmuls' rounding differs. bf16
    # keeps 8 significant bits (relative 2^-9 = 0.2% per product, partly cancelling over the
    # sums), so the loss moves by well under 5%, but it does move: the matmuls ran in bf16.
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.05) and bf16[0]["loss"] != fp32[0]["loss"]
    assert bf16[-1]["loss"] < bf16[0]["loss"]
    student = AutoModelForCausalLM.from_pretrained(runs["bf16"] / "student")
    assert {p.dtype for p in student.parameters()} == {torch.float32}  # the master weights, saved as trained


@pytest.mark.parametrize("override, field", [
    ("train.distributed=zero3", "train.distributed"), ("train.teacher_sharding=cpu", "train.teacher_sharding"),
    ("train.precision=fp8", "train.precision"), ("train.compile=maybe", "train.compile"),
])
def test_bad_distributed_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, ["train.max_steps=1", override])


def test_an_error_under_torchrun_stops_every_process(ws, tmp_path):
    proc = subprocess.run(torchrun_command(["distill", "--out", str(tmp_path / "run"),
                                            *overrides(ws, max_steps=1, precision="fp16")]),
                          capture_output=True, text=True, env=env(), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "lmdistill distill: error: config value train.precision: fp16 autocast is for CUDA" in out
    # Rank 1 either reports the same error itself or, when rank 0's exit reaches it first,
    # is stopped by torchrun with a signal (a race, seen once in a full run): both stop it.
    assert ("lmdistill distill (rank 1): error: config value train.precision" in out
            or re.search(r"Signal \d+ \(SIG[A-Z]+\) received", out)), out
    assert not (tmp_path / "run").exists()


def test_fp16_precision_on_cpu_is_refused_before_models_load(ws, tmp_path):
    with pytest.raises(ConfigError, match="train.precision"):
        run_training(config(ws, max_steps=1, precision="fp16"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_activation_checkpointing_recomputes_and_trains_identically(ws, tmp_path):
    calls = {}
    for flag in ("false", "true"):
        setup = build_setup(config(ws, max_steps=1, activation_checkpointing=flag))
        layer = setup.student.transformer.h[0].ln_1  # the first module inside the checkpointed layer
        calls[flag] = 0
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__(flag, calls[flag] + 1))
        _steps(setup, 1)
    assert calls == {"false": 1, "true": 2}  # the layer runs again in the backward pass
    plain = run_training(config(ws, batch_size=2, max_steps=2), tmp_path / "plain", progress=False)
    ckpt = run_training(config(ws, batch_size=2, max_steps=2, activation_checkpointing="true"), tmp_path / "ckpt",
                        progress=False)
    assert plain["tokens_seen"] == ckpt["tokens_seen"]
    # The recomputed forward is the same ops on the same values: the same gradients to the bit.
    assert_identical_run(tmp_path / "plain", tmp_path / "ckpt")


def _steps(setup, n: int = 2) -> list[dict]:
    optimizer = make_optimizer(setup.config, setup.student)
    tokens = setup.data.tokens("train")
    sampler = BlockSampler(len(tokens), setup.config.data.block_size, 2, seed=0)
    return [train_step(setup, optimizer, [sampler.next_batch(tokens)]) for _ in range(n)]


def test_a_step_frees_its_gradients_once_the_weights_moved(ws):
    setup = build_setup(config(ws, max_steps=2))
    before = {name: p.detach().clone() for name, p in setup.student.named_parameters()}
    metrics = _steps(setup, 1)[0]
    assert metrics["grad_norm"] > 0
    assert all(p.grad is None for p in setup.student.parameters())  # nothing held between steps
    moved = [name for name, p in setup.student.named_parameters() if not torch.equal(p, before[name])]
    assert moved and len(moved) == sum(p.requires_grad for p in setup.student.parameters())


def test_gradient_scaler_path_matches_float32(ws):
    """fp16's GradScaler path (scale, unscale, step, update), here on CPU float32: the
    power-of-two scale cancels exactly."""
    cfg = config(ws, max_steps=2)
    torch.manual_seed(0)
    reference = _steps(build_setup(cfg))
    setup = build_setup(cfg)
    setup.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = _steps(setup)
    for a, b in zip(reference, scaled):
        # Scaling by 2^10 and back is exact in floating point (no overflow or underflow here):
        # the same gradients, so the same steps, to the bit.
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
        assert b["loss_scale"] == 2.0**10


def test_bf16_autocast_step_is_close_to_float32(ws):
    """The bf16 code path (autocast, bf16 lm_head matmuls in the fused loss), run on the CPU's
    bf16 autocast, which the config refuses for training but torch provides."""
    cfg = config(ws, max_steps=2)
    reference = _steps(build_setup(cfg))
    setup = build_setup(cfg)
    setup.autocast = torch.bfloat16
    setup.objective.matmul_dtype = torch.bfloat16
    setup.teacher.to(torch.bfloat16)  # as place_teacher stores it under bf16
    low = _steps(setup)
    for a, b in zip(reference, low):
        # bf16 keeps 8 bits (0.4% per rounding) and the teacher's weights are bf16 too: a few %.
        assert np.isfinite(b["loss"]) and abs(a["loss"] - b["loss"]) < 0.05 * abs(a["loss"])


@pytest.mark.slow
def test_compiled_layers_train_identically(ws, tmp_path):
    """train.compile (inductor on the CPU: about half a minute of compiling) with activation
    checkpointing gives the losses and weights of plain eager training."""
    run_training(config(ws, batch_size=2, max_steps=3), tmp_path / "eager", progress=False)
    run_training(config(ws, batch_size=2, max_steps=3, compile="true", activation_checkpointing="true"),
                 tmp_path / "compiled", progress=False)
    assert_same_run(tmp_path / "compiled", tmp_path / "eager")
    assert_same_params(tmp_path / "compiled" / "student", tmp_path / "eager" / "student")

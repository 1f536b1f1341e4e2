"""The training loop on tiny GPT-2-shaped models with the real GPT-2 tokenizer and real text."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmdistill.train.rundir import RunDir, read_metrics
from lmdistill.config import ConfigError, LossConfig
from lmdistill.recipe import load_config
from lmdistill.train.rundir import RunDirError
from lmdistill.train.run import run_training

from .helpers import LOGGED_REL, save_with_tokenizer, small_text_file, tiny_gpt2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("train")
    text = small_text_file(root)
    teacher = save_with_tokenizer(tiny_gpt2(n_layer=4, seed=0), gpt2_tokenizer, root / "teacher")
    teacher_dropout = save_with_tokenizer(tiny_gpt2(n_layer=4, dropout=0.1, seed=0), gpt2_tokenizer, root / "teacher_dropout")
    return {"root": root, "text": text, "teacher": teacher, "teacher_dropout": teacher_dropout, "data": root / "data"}


def make_config(ws, **train):
    # One validation window (eval_tokens=32): only test_tiny_distillation_lowers_validation_loss
    # reads validation losses, and it asks for more.
    overrides = [
        f"model.teacher={ws['teacher']}", "model.num_layers=2",
        f"data.sources=[{ws['text']}]", f"data.prepared_dir={ws['data']}", "data.block_size=32",
        "train.lr=1e-3", "train.warmup=0.2", "train.eval_every=0", "train.checkpoint_every=0", "train.eval_tokens=32",
        "train.threads=1",
    ]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, overrides)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def student_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(run_dir / "student").state_dict()  # in the saved dtype


def grad_norms_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


# Two float32 runs that take different but equivalent code paths (micro-batches vs one batch,
# chunked vs full logits) differ in the last bits of every gradient, and Adam turns that into
# parameter differences of up to lr / adam_eps (= 1e3 here) times the gradient's rounding: on
# near-zero gradients that is a full-size update of either sign, and how large it gets depends
# on the CPU's kernels and thread count. So those comparisons train in float64 (rounding
# ~1e-16, amplified to < 1e-12), where any real difference (a dropped position or term, a wrong
# normalisation) still moves parameters by ~lr (1e-4..1e-3) and losses by far more than 1e-6.
PARAM_ATOL_F64 = 1e-10


@pytest.fixture
def float64_training(monkeypatch):
    """run_training loads the teacher (and so cuts the student) in float64, and trains in it."""
    import lmdistill.train.setup as train_module

    real_load = train_module.load_model
    monkeypatch.setattr(train_module, "load_model",
                        lambda spec, *args, **kw: real_load(spec, *args, **{**kw, "dtype": torch.float64}))


def assert_same_training(a: Path, b: Path) -> None:
    """Float64 runs a and b: the same logged losses and gradient norms at every step (the norm
    shows a wrong scale, which Adam's update hides) and the same final weights, which moved."""
    la, lb, ga, gb = losses_by_step(a), losses_by_step(b), grad_norms_by_step(a), grad_norms_by_step(b)
    assert la.keys() == lb.keys() and all(lb[s] == pytest.approx(la[s], rel=LOGGED_REL) for s in la), (la, lb)
    assert ga.keys() == gb.keys() and all(gb[s] == pytest.approx(ga[s], rel=LOGGED_REL) for s in ga), (ga, gb)
    pa, pb = student_params(a), student_params(b)
    initial = AutoModelForCausalLM.from_pretrained(a / "student_init").state_dict()
    assert all(p.dtype == torch.float64 for p in pa.values())
    for name in pa:
        assert torch.allclose(pa[name], pb[name], atol=PARAM_ATOL_F64, rtol=0), (name, (pa[name] - pb[name]).abs().max())
    assert any(not torch.equal(pa[n], initial[n]) for n in pa), "training did not change the student"


def test_gradient_accumulation_matches_one_big_batch(workspace, tmp_path, float64_training):
    big = run_training(make_config(workspace, batch_size=4, grad_accum=1, max_steps=2), tmp_path / "big", progress=False)
    small = run_training(make_config(workspace, batch_size=1, grad_accum=4, max_steps=2), tmp_path / "small", progress=False)
    assert big["tokens_seen"] == small["tokens_seen"] == 2 * 4 * 32
    assert_same_training(tmp_path / "big", tmp_path / "small")


def test_training_dropout_overrides_the_students_own(workspace, tmp_path, float64_training):
    # The two teachers have the same weights, one with dropout 0.1 (as GPT-2's config has it).
    with_dropout = {**workspace, "teacher": workspace["teacher_dropout"]}
    runs = {name: tmp_path / name for name in ("plain", "dropout-off", "dropout-kept")}
    run_training(make_config(workspace, batch_size=2, max_steps=3), runs["plain"], progress=False)
    run_training(make_config(with_dropout, batch_size=2, max_steps=3, dropout=0.0), runs["dropout-off"], progress=False)
    run_training(make_config(with_dropout, batch_size=2, max_steps=3), runs["dropout-kept"], progress=False)
    assert_same_training(runs["plain"], runs["dropout-off"])
    plain, kept = losses_by_step(runs["plain"]), losses_by_step(runs["dropout-kept"])
    assert all(abs(kept[s] - plain[s]) > 1e-6 * abs(plain[s]) for s in plain)  # dropout at 0.1 trained
    saved = AutoModelForCausalLM.from_pretrained(runs["dropout-off"] / "student").config
    assert (saved.attn_pdrop, saved.resid_pdrop, saved.activation_function) == (0.1, 0.1, "gelu_new")


def test_resume_continues_exactly(workspace, tmp_path):
    # Dropout on: the RNG state must be restored too for the losses to match.
    ws = {**workspace, "teacher": workspace["teacher_dropout"]}
    full = make_config(ws, batch_size=2, max_steps=6, eval_every=2)
    run_training(full, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    first = run_training(full, part, stop_at_step=3, progress=False)
    assert first["finished"] is False and RunDir(part).latest_checkpoint() is not None
    assert not (part / "student").exists()
    second = run_training(None, part, resume=True, progress=False)
    assert second["finished"] is True and second["step"] == 6
    # Bit for bit: one process, one thread, the same ops on the same values (the checkpoint
    # keeps the weights, Adam's state and the RNG states exactly), so no rounding can differ.
    lf, lp = losses_by_step(tmp_path / "full"), losses_by_step(part)
    assert sorted(lf) == sorted(lp) == [1, 2, 3, 4, 5, 6]
    assert lf == lp
    a, b = student_params(tmp_path / "full"), student_params(part)
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())


def test_tiny_distillation_lowers_validation_loss(workspace, tmp_path):
    summary = run_training(make_config(workspace, batch_size=4, max_steps=30, lr=3e-3, eval_every=10, eval_tokens=256),
                           tmp_path / "run", progress=False)
    val = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert val[0]["step"] == 0 and val[-1]["step"] == 30
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.5, val
    assert summary["finished"] and (tmp_path / "run" / "student" / "model.safetensors").is_file()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert {"kl", "ce", "cos", "lr", "grad_norm", "tokens_per_s", "tokens_seen"} <= rows[0].keys()
    assert rows[-1]["tokens_seen"] == 30 * 4 * 32


@pytest.mark.parametrize("freeze", [{}, {"freeze_embeddings": True, "freeze_pos_embeddings": False}])
def test_frozen_embeddings_keep_the_teachers_values(workspace, tmp_path, freeze):
    # Default: position embeddings frozen (DistilGPT2), token embeddings train; with
    # freeze_embeddings the token embeddings (and the LM head tied to them) stay fixed.
    run_training(make_config(workspace, batch_size=2, max_steps=3, **freeze), tmp_path / "run", progress=False)
    trained = student_params(tmp_path / "run")
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student_init").state_dict()
    frozen = {name for name in trained if torch.equal(trained[name], initial[name])}
    tokens, positions = "transformer.wte.weight", "transformer.wpe.weight"
    assert (tokens in frozen) == bool(freeze) and (positions in frozen) == (not freeze), frozen
    assert torch.equal(trained["lm_head.weight"], trained[tokens])  # still tied
    assert "transformer.h.0.mlp.c_fc.weight" not in frozen


def test_source_repeats_weigh_the_training_mix_and_resume(workspace, tmp_path, capsys):
    second = tmp_path / "second.txt"
    second.write_text(workspace["text"].read_text()[:32_000])
    sources = [str(workspace["text"]), str(second)]
    config = load_config(None, [f"model.teacher={workspace['teacher']}", "model.num_layers=2",
                                f"data.sources=[{','.join(sources)}]", f"data.prepared_dir={tmp_path / 'data'}",
                                "data.repeats=[1,2.5]", "data.block_size=32", "train.batch_size=2",
                                "train.max_steps=4", "train.eval_every=0", "train.checkpoint_every=2", "train.threads=1"])
    run = tmp_path / "run"
    run_training(config, run, stop_at_step=2, progress=False)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())["splits"]["train"]["by_source"]
    first, other = meta[sources[0]]["tokens"], meta[sources[1]]["tokens"]
    share = 2.5 * other / (first + 2.5 * other)
    mix = [line for line in capsys.readouterr().out.splitlines() if "training mix per epoch" in line]
    assert mix and f"{sources[1]} {other:,} tokens x 2.5 ({share:.0%})" in mix[0]
    state = torch.load(RunDir(run).latest_checkpoint() / "trainer_state.pt", weights_only=False)
    assert state["sampler"]["repeats"] == [[first, 1.0], [other, 2.5]]
    assert run_training(None, run, resume=True, progress=False)["step"] == 4


def test_token_budget_sets_steps(workspace, tmp_path):
    summary = run_training(make_config(workspace, batch_size=2, max_steps=None, max_tokens=64 * 3), tmp_path / "run", progress=False)
    assert summary["step"] == 3


def test_run_dir_holding_another_run_is_refused(workspace, tmp_path):
    run_training(make_config(workspace, max_steps=1), tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match="different run.*--resume"):
        run_training(make_config(workspace, max_steps=2), tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match="no run to resume"):
        run_training(None, tmp_path / "nothing", resume=True, progress=False)


def test_failed_start_leaves_no_run_dir(workspace, tmp_path):
    config = make_config(workspace, max_steps=1)
    config.model.layers = [0, 9]
    with pytest.raises(ConfigError, match="out of range"):
        run_training(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_block_size_beyond_context_is_refused(workspace, tmp_path):
    config = make_config(workspace, max_steps=1)
    config.data.block_size = 1024  # the tiny teacher has 128 positions
    with pytest.raises(ConfigError, match="exceeds the teacher's context"):
        run_training(config, tmp_path / "run", progress=False)


def test_checkpoints_are_complete_and_pruned(workspace, tmp_path):
    run_training(make_config(workspace, max_steps=4, checkpoint_every=1), tmp_path / "run", progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_000003", "step_000004"]
    latest = RunDir(tmp_path / "run").latest_checkpoint()
    assert latest.name == "step_000004"
    assert (latest / "student" / "model.safetensors").is_file() and (latest / "trainer_state.pt").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["kind"], summary["version"], summary["step"], summary["finished"]) == ("run", 1, 4, True)


def test_importance_strategy_keeps_the_most_influential_layers(workspace, tmp_path):
    from lmdistill.data.prepare import load_prepared
    from lmdistill.models.load import load_model
    from lmdistill.student.importance import block_influence, most_influential

    config = make_config(workspace, max_steps=1)
    config.model.strategy = "importance"
    config.model.calibration_tokens = 512  # 16 blocks, 4x cheaper; the 2nd and 3rd scores are still 2% apart
    run_training(config, tmp_path / "run", progress=False)
    train_tokens = load_prepared(workspace["data"]).tokens("train")
    scores = block_influence(load_model(workspace["teacher"]), train_tokens, block_size=32,
                             max_tokens=config.model.calibration_tokens)
    chosen = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student_init").config.lmdistill_layer_map
    assert chosen == most_influential(scores, 2)


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "tv"])
def test_configured_divergence_is_the_logged_logit_term(workspace, tmp_path, name, capsys):
    from lmdistill.data.prepare import load_prepared
    from lmdistill.data.sampler import BlockSampler
    from lmdistill.loss.divergences import DivergenceSpec
    from lmdistill.models.load import load_model

    config = make_config(workspace, max_steps=1, batch_size=2)
    config.loss = LossConfig(**{**asdict(config.loss), "divergence": name, "cos": 0.0, "ce": 0.0,
                                "jsd_beta": 0.9 if name == "jsd" else None})
    run_training(config, tmp_path / "run", progress=False)
    # Only forward KL has the fused lm_head loss: the run says once that it builds full logits, and why.
    assert capsys.readouterr().out.count(f"logit terms: full logits, loss.chunk_tokens=256 ignored: "
                                         f"loss.divergence={name} has no fused path") == 1
    logged = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r)
    # The first step's batch and models, rebuilt: the logged term is the divergence before the update.
    tokens = load_prepared(workspace["data"]).tokens("train")
    input_ids, _ = BlockSampler(len(tokens), 32, 2, seed=config.train.seed).next_batch(tokens)
    teacher, student = load_model(workspace["teacher"]), load_model(tmp_path / "run" / "student_init")
    with torch.no_grad():
        spec = DivergenceSpec(name, beta=config.loss.jsd_beta)
        expected = spec(student(input_ids=input_ids).logits, teacher(input_ids=input_ids).logits,
                        temperature=config.loss.temperature)
    # The same float32 divergence (a sum over tokens / their count vs a mean), written with 7
    # significant digits: ~1e-6 relative apart (measured: <= 0.5% of 1e-4); a wrong divergence,
    # temperature or weight is off by far more.
    assert logged[name] == pytest.approx(expected.item(), rel=1e-4)
    assert logged["loss"] == pytest.approx(config.loss.kl * expected.item(), rel=1e-4)
    assert "kl" not in logged  # the logit term carries its divergence's name; kl is forward KL's


@pytest.mark.parametrize("loss", [{}, {"cos": 0.0, "align_cos": 1.0, "mse": 0.5}, {"kl": 0.0, "cos": 0.0}])
def test_fused_chunked_logits_train_like_full_logits(workspace, tmp_path, loss, float64_training, monkeypatch):
    import lmdistill.loss.objective as train_module

    fused_calls = []  # (chunk_tokens, dtype of the student's hidden states) of each fused loss
    real_fused = train_module.chunked_logit_losses
    monkeypatch.setattr(train_module, "chunked_logit_losses",
                        lambda hidden, *a, **kw: fused_calls.append((kw["chunk_tokens"], hidden.dtype))
                        or real_fused(hidden, *a, **kw))
    runs = {}
    for chunk in (0, 7):  # 7 divides neither the 64 positions of a micro-batch nor the vocabulary
        # Two steps: the second one's loss and gradient follow the first update.
        config = make_config(workspace, max_steps=2, batch_size=2, grad_accum=2)
        config.loss = LossConfig(**{**asdict(config.loss), **loss, "chunk_tokens": chunk})
        # Layer 1 first, so no aligned pair starts identical: at cos = 1 the alignment gradient
        # is rounding noise, which Adam would scale up to full-size (and different) updates.
        config.model.layers = [1, 2, 3]
        run_training(config, tmp_path / f"chunk{chunk}", progress=False)
        runs[chunk] = tmp_path / f"chunk{chunk}"
    assert fused_calls == [(7, torch.float64)] * 2 * 2  # only the chunk-7 run, each micro-batch of 2 steps
    terms = [k for k in read_metrics(runs[7] / "metrics.jsonl")[1] if k in ("kl", "ce", "cos", "mse", "align_cos")]
    assert set(terms) == {k for k in ("kl", "ce", "cos", "mse", "align_cos") if {**asdict(LossConfig()), **loss}[k] > 0}
    assert_same_training(runs[0], runs[7])


def test_the_optimizer_is_torchs_fused_adamw_and_steps_like_the_per_tensor_loop():
    from lmdistill.config import RunConfig, TrainConfig
    from lmdistill.train.setup import make_optimizer

    torch.manual_seed(0)
    fused_model = tiny_gpt2(n_layer=2, seed=0)
    loop_model = tiny_gpt2(n_layer=2, seed=0)
    config = RunConfig(train=TrainConfig(lr=1e-2, weight_decay=0.1, max_steps=5))
    fused = make_optimizer(config, fused_model)
    assert all(group["fused"] for group in fused.param_groups)
    loop = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in
                              make_optimizer(config, loop_model).param_groups],
                             lr=1e-2, betas=tuple(config.train.betas), eps=config.train.adam_eps, foreach=False)
    for step in range(5):
        grads = [torch.randn_like(p) for p in fused_model.parameters()]
        for model in (fused_model, loop_model):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
        fused.step()
        loop.step()
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters()):
        # The same float32 update in another order of operations: a few ulps per step on values of
        # order 0.1-1 after 5 steps of lr 1e-2 (a wrong update is off by ~1e-2).
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    initial = tiny_gpt2(n_layer=2, seed=0).state_dict()
    moved = [name for name, p in fused_model.named_parameters() if not torch.equal(p, initial[name])]
    # every parameter but the position embeddings (frozen: train.freeze_pos_embeddings)
    assert moved == [name for name, _ in fused_model.named_parameters() if name != "transformer.wpe.weight"]

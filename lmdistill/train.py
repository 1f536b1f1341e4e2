"""The distillation loop: set-up, one optimiser step, validation, checkpoints, resume.

The loop only combines weighted loss terms from :mod:`lmdistill.losses`; the maths lives
there. Gradient accumulation is normalised by the token count of the whole optimiser step
(each micro-batch's summed loss is divided by the step's token total), so 4 micro-batches
of 1 sequence give the same update as 1 batch of 4.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .checkpoint import (
    RunDir,
    append_metrics,
    load_trainer_state,
    save_checkpoint,
    set_rng_state,
    truncate_metrics,
    write_text_atomic,
)
from .config import ConfigError, RunConfig, load_config
from .data.prepare import PreparedData, prepare
from .data.sampler import BlockSampler
from .evaluate.perplexity import PerplexityProtocol, perplexity
from .losses import LossWeights, distillation_loss
from .models import (
    architecture_of,
    cache_dir,
    count_parameters,
    decoder_layers,
    load_model,
    load_tokenizer,
    model_config,
    tokenizer_fingerprint,
)
from .student import build_student, check_shared_vocabulary, layer_map, save_model, validate_layer_map


# Steps after which a time-budget run re-estimates how many steps fit in the budget.
TIME_BUDGET_REESTIMATE = (3, 10, 30)


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message names the fix."""


# ---------------------------------------------------------------------------------------
# Set-up


@dataclass
class Setup:
    """Everything a run needs, built before the first step."""

    config: RunConfig
    teacher: PreTrainedModel | None
    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    device: torch.device
    weights: LossWeights
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config value train.device: {name} asked for but no CUDA device is visible; use cpu or auto")
    return torch.device(name)


def loss_weights(config: RunConfig) -> LossWeights:
    c = config.loss
    return LossWeights(kl=c.kl, ce=c.ce, cos=c.cos, mse=c.mse, temperature=c.temperature)


def needs_teacher(weights: LossWeights) -> bool:
    return any(name in weights.active_terms() for name in ("kl", "cos", "mse"))


def check_config_against_models(config: RunConfig) -> None:
    """Cheap checks from the model configs alone, before any weights are loaded."""
    teacher_cfg = model_config(config.model.teacher)
    if config.model.student is not None:
        student_cfg = model_config(config.model.student)
        if getattr(teacher_cfg, "vocab_size", None) != getattr(student_cfg, "vocab_size", None):
            raise ConfigError(
                f"teacher {config.model.teacher} and student {config.model.student} have different vocabularies "
                f"({teacher_cfg.vocab_size} vs {student_cfg.vocab_size} tokens): logit distillation needs a shared "
                f"tokenizer. Cut a student from the teacher (leave model.student empty) or pick one that shares it."
            )
    context = getattr(teacher_cfg, "max_position_embeddings", None) or getattr(teacher_cfg, "n_positions", None)
    if context is not None and config.data.block_size > context:
        raise ConfigError(
            f"config value data.block_size: {config.data.block_size} exceeds the teacher's context of {context} tokens; "
            f"set data.block_size={context} or less"
        )
    num_teacher = getattr(teacher_cfg, "num_hidden_layers", None) or getattr(teacher_cfg, "n_layer", None)
    if config.model.student is None and num_teacher is not None:
        if config.model.layers is not None:
            try:
                validate_layer_map(config.model.layers, num_teacher)
            except ValueError as err:
                raise ConfigError(f"config value model.layers: {err}") from None
        elif config.model.num_layers is not None and config.model.num_layers > num_teacher:
            raise ConfigError(
                f"config value model.num_layers: {config.model.num_layers} is more than the teacher's {num_teacher} layers"
            )


def prepared_dir(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Path:
    if config.data.prepared_dir:
        return Path(config.data.prepared_dir)
    key = hashlib.sha256(json.dumps([config.data.sources, tokenizer_fingerprint(tokenizer)]).encode()).hexdigest()[:16]
    return cache_dir() / "data" / key


def make_student(config: RunConfig, teacher: PreTrainedModel) -> PreTrainedModel:
    if config.model.student is not None:
        return load_model(config.model.student)
    num_teacher = len(decoder_layers(teacher))
    layers = config.model.layers or layer_map(
        num_teacher, config.model.num_layers or max(1, num_teacher // 2), config.model.strategy
    )
    return build_student(teacher, layers, random_init=config.model.random_init, seed=config.train.seed)


def build_setup(config: RunConfig, student_init: Path | None = None) -> Setup:
    """Load tokenizer, data, teacher and student; ``student_init`` overrides with a saved student."""
    check_config_against_models(config)
    device = resolve_device(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    weights = loss_weights(config)
    tokenizer = load_tokenizer(config.model.teacher)
    data = prepare(tokenizer, config.data.sources, prepared_dir(config, tokenizer), tokenizer_name=config.model.teacher)
    for split in ("train", "validation"):
        if data.splits.get(split, 0) < config.data.block_size + 1:
            raise ConfigError(
                f"the {split} split of {config.data.sources} has {data.splits.get(split, 0)} tokens, fewer than one "
                f"block of data.block_size={config.data.block_size}; add data or lower data.block_size"
            )
    teacher = load_model(config.model.teacher)
    if student_init is not None:
        student = load_model(student_init)
    else:
        torch.manual_seed(config.train.seed)
        student = make_student(config, teacher)
    student_tokenizer = load_tokenizer(config.model.student) if config.model.student else None
    check_shared_vocabulary(teacher, student, tokenizer, student_tokenizer)
    if not needs_teacher(weights):
        teacher = None  # causal-LM-only training: free the teacher's memory
    else:
        teacher.to(device).eval().requires_grad_(False)
    student.to(device)
    return Setup(config, teacher, student, tokenizer, data, device, weights)


# ---------------------------------------------------------------------------------------
# Optimiser and schedule


def trainable_parameters(student: PreTrainedModel, freeze_pos_embeddings: bool) -> list[nn.Parameter]:
    arch = architecture_of(student)
    if freeze_pos_embeddings and arch.pos_embed:
        student.get_submodule(arch.pos_embed).requires_grad_(False)
    return [p for p in student.parameters() if p.requires_grad]


def make_optimizer(config: RunConfig, student: PreTrainedModel) -> torch.optim.AdamW:
    params = trainable_parameters(student, config.train.freeze_pos_embeddings)
    # Biases and norm gains get no weight decay (standard practice; no-op at the recipe's 0).
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=tuple(config.train.betas), eps=config.train.adam_eps)


def lr_factor(step: int, total_steps: int, warmup: float, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier for optimiser step ``step`` (0-based) of ``total_steps``."""
    warmup_steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        decay = 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def total_steps_for(config: RunConfig, tokens_per_step: int) -> int | None:
    """Steps implied by a step or token budget; None when only a time budget is set."""
    budgets = []
    if config.train.max_steps is not None:
        budgets.append(config.train.max_steps)
    if config.train.max_tokens is not None:
        budgets.append(max(1, config.train.max_tokens // tokens_per_step))
    if not budgets and config.train.estimated_steps is not None:
        budgets.append(config.train.estimated_steps)
    return min(budgets) if budgets else None


# ---------------------------------------------------------------------------------------
# One step


def forward_teacher(teacher: PreTrainedModel | None, input_ids: torch.Tensor, want_hidden: bool):
    if teacher is None:
        return None, None
    with torch.no_grad():
        out = teacher(input_ids=input_ids, output_hidden_states=want_hidden)
    return out.logits, (out.hidden_states[-1] if want_hidden else None)


def train_step(setup: Setup, optimizer: torch.optim.Optimizer, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """One optimiser step over ``micro_batches``; returns per-token loss terms and the grad norm."""
    student, weights = setup.student, setup.weights
    want_hidden = any(name in weights.active_terms() for name in ("cos", "mse"))
    step_tokens = sum(labels.numel() for _, labels in micro_batches)
    sums: dict[str, float] = {}
    student.train()
    optimizer.zero_grad(set_to_none=True)
    for input_ids, labels in micro_batches:
        input_ids, labels = input_ids.to(setup.device), labels.to(setup.device)
        teacher_logits, teacher_hidden = forward_teacher(setup.teacher, input_ids, want_hidden)
        out = student(input_ids=input_ids, output_hidden_states=want_hidden)
        loss = distillation_loss(
            out.logits, teacher_logits, labels, weights,
            student_hidden=out.hidden_states[-1] if want_hidden else None,
            teacher_hidden=teacher_hidden, reduction="sum",
        )
        (loss.total / step_tokens).backward()
        sums["loss"] = sums.get("loss", 0.0) + loss.total.item()
        for name, value in loss.terms.items():
            sums[name] = sums.get(name, 0.0) + value.item()
    params = [p for p in student.parameters() if p.grad is not None]
    max_norm = setup.config.train.max_grad_norm
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(
            f"non-finite gradient norm ({grad_norm.item()}); lower train.lr or check the data. "
            "The last checkpoint is intact: fix the config and --resume."
        )
    optimizer.step()
    metrics = {name: total / step_tokens for name, total in sums.items()}
    metrics["grad_norm"] = grad_norm.item()
    metrics["tokens"] = step_tokens
    return metrics


def validate(setup: Setup, tokens: np.ndarray) -> dict[str, float]:
    """Student perplexity on the first ``train.eval_tokens`` validation tokens (disjoint windows)."""
    protocol = PerplexityProtocol(
        window=setup.config.data.block_size,
        max_tokens=min(len(tokens), setup.config.train.eval_tokens + 1),
        batch_size=setup.config.train.batch_size,
    )
    result = perplexity(setup.student, tokens, protocol, device=setup.device)
    return {"val_loss": result.nll_sum / result.tokens_scored, "val_ppl": result.perplexity, "val_tokens": result.tokens_scored}


# ---------------------------------------------------------------------------------------
# The run


def check_run_dir(run: RunDir, config: RunConfig, resume: bool) -> None:
    """Refuse to mix two runs in one directory (checked before any model loads)."""
    if resume:
        if not run.config.is_file():
            raise RunDirError(f"{run.root} holds no run to resume (no config.yaml); start one with --out {run.root}")
        return
    if run.config.is_file():
        same = run.config.read_text() == config.to_yaml()
        what = "this run already" if same else "a different run"
        raise RunDirError(
            f"{run.root} holds {what}; continue it with `lmdistill distill --resume {run.root}` "
            f"or choose another --out"
        )
    if run.root.exists() and any(run.root.iterdir()):
        raise RunDirError(f"{run.root} exists and is not empty; choose another --out")


def run_training(config: RunConfig, out_dir: Path, resume: bool = False, stop_at_step: int | None = None,
                 progress: bool = True, setup: Setup | None = None) -> dict[str, Any]:
    """Train (or resume) a run in ``out_dir``; returns a summary.

    ``stop_at_step`` ends the run early after that step, with a checkpoint, as an interrupt
    would; ``--resume`` then continues exactly where it stopped.
    """
    run = RunDir(Path(out_dir))
    check_run_dir(run, config, resume)
    if resume:
        config = load_config(run.config)
        finished = run.root / "summary.json"
        if finished.is_file():
            print(f"[lmdistill] {run.root} already finished; nothing to resume")
            return json.loads(finished.read_text())
    checkpoint = run.latest_checkpoint() if resume else None
    if setup is None:
        setup = build_setup(config, student_init=checkpoint / "student" if checkpoint else None)
    if not resume:
        # Written only once the set-up succeeded, so a failed start leaves no half-made run.
        run.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.config, config.to_yaml())
    optimizer = make_optimizer(config, setup.student)
    train_tokens = setup.data.tokens("train")
    val_tokens = setup.data.tokens("validation")
    sampler = BlockSampler(len(train_tokens), config.data.block_size, config.train.batch_size, seed=config.train.seed)
    tokens_per_step = sampler.tokens_per_batch * config.train.grad_accum

    step, tokens_seen, elapsed = 0, 0, 0.0
    total_steps = total_steps_for(config, tokens_per_step)
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        step, tokens_seen, elapsed, total_steps = state["step"], state["tokens_seen"], state["elapsed"], state["total_steps"]
        set_rng_state(state["rng"])
        truncate_metrics(run, step)
        print(f"[lmdistill] resuming {run.root} from step {step} ({tokens_seen:,} tokens)")
    elif resume:
        truncate_metrics(run, 0)
        print(f"[lmdistill] {run.root} has no checkpoint yet; starting it from the beginning")
    else:
        torch.manual_seed(config.train.seed)

    def checkpoint_now() -> None:
        save_checkpoint(run, step, setup.student, setup.tokenizer, {
            "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "step": step,
            "tokens_seen": tokens_seen, "elapsed": elapsed, "total_steps": total_steps,
        })

    if step == 0 and checkpoint is None:
        save_model(setup.student, setup.tokenizer, run.student_init)
        row = {"step": 0, "tokens_seen": 0, **validate(setup, val_tokens)}
        append_metrics(run, row)
        print(f"[lmdistill] step 0: validation perplexity {row['val_ppl']:.2f}")

    time_budget = config.train.max_minutes * 60 if config.train.max_minutes else None
    first_step_seconds = 0.0
    schedule_from_time = time_budget is not None and total_steps_for(config, tokens_per_step) is None
    bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    interrupted = False
    with GracefulStop() as stop_request:
        while True:
            if total_steps is not None and step >= total_steps:
                break
            if time_budget is not None and elapsed >= time_budget:
                break
            started = time.perf_counter()
            batches = [sampler.next_batch(train_tokens) for _ in range(config.train.grad_accum)]
            schedule_steps = total_steps or _estimate_total_steps(elapsed, step, time_budget)
            factor = lr_factor(step, schedule_steps, config.train.warmup, config.train.schedule, config.train.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = config.train.lr * factor
            metrics = train_step(setup, optimizer, batches)
            seconds = time.perf_counter() - started
            step += 1
            tokens_seen += int(metrics.pop("tokens"))
            elapsed += seconds
            if schedule_from_time and step in TIME_BUDGET_REESTIMATE:
                # Lay the schedule over the steps the time budget allows at the measured speed;
                # re-measured a few times because the first steps are slow (allocator warm-up).
                recent = (elapsed - first_step_seconds) / max(1, step - 1) if step > 1 else elapsed
                total_steps = max(step + 1, step + int((time_budget - elapsed) / recent))
                bar.total = total_steps
            if step == 1:
                first_step_seconds = seconds
            row = {"step": step, "tokens_seen": tokens_seen, "lr": config.train.lr * factor,
                   **{k: round(v, 6) for k, v in metrics.items()},
                   "tokens_per_s": round(tokens_per_step / seconds, 1), "elapsed_s": round(elapsed, 2)}
            append_metrics(run, row)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            last = (total_steps is not None and step >= total_steps) or (time_budget is not None and elapsed >= time_budget)
            if config.train.eval_every and step % config.train.eval_every == 0 and not last:
                val = {"step": step, "tokens_seen": tokens_seen, **validate(setup, val_tokens)}
                append_metrics(run, val)
                bar.write(f"[lmdistill] step {step}: validation perplexity {val['val_ppl']:.2f}")
            if config.train.checkpoint_every and step % config.train.checkpoint_every == 0 and not last:
                checkpoint_now()
            if not last and (stop_request.requested or (stop_at_step is not None and step >= stop_at_step)):
                checkpoint_now()
                interrupted = True
                break
    bar.close()
    if interrupted:
        print(f"[lmdistill] stopped at step {step}; checkpoint written. Continue with: lmdistill distill --resume {run.root}")
        return {"run_dir": str(run.root), "step": step, "tokens_seen": tokens_seen, "finished": False}

    final_val = {"step": step, "tokens_seen": tokens_seen, **validate(setup, val_tokens)}
    append_metrics(run, final_val)
    checkpoint_now()
    save_model(setup.student, setup.tokenizer, run.student)
    summary = {
        "run_dir": str(run.root), "step": step, "tokens_seen": tokens_seen, "finished": True,
        "train_seconds": round(elapsed, 1), "val_ppl": final_val["val_ppl"],
        "student_parameters": count_parameters(setup.student),
    }
    write_text_atomic(run.root / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"[lmdistill] done: {step} steps, {tokens_seen:,} tokens, validation perplexity {final_val['val_ppl']:.2f}; "
          f"student saved to {run.student}")
    return summary


class GracefulStop:
    """First Ctrl-C (or SIGTERM): finish the current step, checkpoint, stop. Second: stop at once.

    Stopping between steps keeps the checkpoint consistent (no half-applied optimiser step or
    sampler that ran ahead of the weights); an immediate stop falls back to the last checkpoint.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[lmdistill] stopping after this step (press Ctrl-C again to stop at once)", flush=True)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _estimate_total_steps(elapsed: float, step: int, time_budget: float | None) -> int:
    # Before the speed is measured (first steps of a time-budget run) warm-up runs on a guess.
    return 100 if step == 0 or time_budget is None else max(step + 1, int(time_budget / (elapsed / step)))

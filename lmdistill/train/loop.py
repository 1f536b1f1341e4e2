"""The training loop, read top to bottom: start or resume, step until the budget is spent, finish.

Under torchrun every rank runs it on its own blocks and takes the same decisions (the
slowest rank's time drives the budget; a stop asked of any rank stops all); only rank 0
writes to the run directory, the others wait for it at barriers.
"""

from __future__ import annotations

import json
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .. import dist
from ..atomic import write_text_atomic
from ..config import RunConfig
from ..data.errors import DataError
from ..data.sampler import BlockSampler
from ..errors import NonFiniteError
from ..models.arch import count_parameters
from ..models.device import describe_hardware
from ..models.save import save_model
from ..card import CardFacts, card_name, current_command, student_facts, training_facts, write_card
from ..schedule import Budget, lr_factor
from .health import ValidationWatch, non_finite_parameter, non_finite_stop, optimiser_fault
from .rundir import (
    SHARED_RUN_DIR,
    RunDir,
    RunDirError,
    load_trainer_state,
    read_metrics,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_metrics,
    writing,
)
from .on_policy import is_on_policy_step, on_policy_batches
from .setup import Setup, build_setup, describe_precision, make_optimizer
from .step import next_micro_batch, train_step, validate
from .tracking import Tracker, check_tracking


@dataclass
class Progress:
    """The counters a checkpoint restores."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds spent in training steps


@dataclass
class Loop:
    """A run's state between steps: what a checkpoint saves, plus what drives the next step."""

    run: RunDir
    setup: Setup
    optimizer: torch.optim.Optimizer
    sampler: BlockSampler
    budget: Budget
    warmup: float
    """The warm-up as a fraction of the budget."""
    done: Progress
    resumed: bool
    saved_step: int = -1
    """The step of the newest checkpoint written (or resumed from); -1 for none."""
    tracker: Tracker | None = None
    """Where metric rows go (rank 0; None on the other ranks)."""

    @property
    def config(self) -> RunConfig:
        return self.setup.config

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimiser step on all ranks."""
        return tokens_per_step(self.sampler, self.config, self.setup.ranks)

    def start_removed(self) -> bool:
        """Whether a failure now removes the whole run (run_training undoes a failed start)."""
        return not self.resumed and self.done.step == 0


def train(run: RunDir, config: RunConfig, resume: bool, stop_at_step: int | None, progress: bool,
          setup: Setup | None, ranks: dist.DistInfo, done: Progress) -> dict[str, Any]:
    """Start or resume the run in ``run``, train it to its budget (or ``stop_at_step``) and finish it."""
    checkpoint = resume_checkpoint(run) if resume else None
    if resume and checkpoint is None and run.checkpoints.is_dir() and any(run.checkpoints.glob("step_*")):
        raise RunDirError(f"{run.checkpoints} holds no intact checkpoint; start a new run with another --out")
    check_tracking(config)
    if setup is None:
        setup = build_setup(config, student_init=checkpoint / "student" if checkpoint else None, ranks=ranks)
    write_config(run, config, setup, resume)
    repeats = source_repeats(config, setup.data.by_source.get("train", {}))
    if repeats is not None and ranks.is_main:
        print(describe_mix(config.data.sources, repeats))
    sampler = BlockSampler(len(setup.data.tokens("train")), config.data.block_size, config.train.batch_size,
                           seed=config.train.seed, rank=ranks.rank, world_size=ranks.world_size, repeats=repeats)
    budget = Budget.from_config(config.train.max_steps, config.train.max_tokens, config.train.max_minutes,
                                tokens_per_step(sampler, config, ranks))
    loop = Loop(run, setup, make_optimizer(config, setup.student), sampler, budget,
                budget.warmup_fraction(config.train.warmup), done, resumed=resume)
    if checkpoint is not None:
        restore(loop, checkpoint)
    if ranks.is_main:  # a resumed run's TensorBoard drops the events after its checkpoint, as metrics.jsonl
        loop.tracker = Tracker(run, config, resume_step=(done.step if checkpoint else -1) if resume else None)
    try:
        if checkpoint is None:
            begin(loop)
        watch = ValidationWatch(config, read_metrics(run.metrics) if ranks.is_main else [])
        if step_until_done(loop, watch, stop_at_step, progress):
            print(f"[lmdistill] stopped at step {done.step}; checkpoint written. "
                  f"Continue with: lmdistill distill --resume {run.root}"
                  + (" (under torchrun, with the same launch command)" if ranks.enabled else ""))
            return run_summary(run, done, finished=False)
        return finish(loop, watch)
    finally:
        if loop.tracker is not None:
            loop.tracker.close()


def source_repeats(config: RunConfig, train_tokens: dict[str, int]) -> list[tuple[int, float]] | None:
    """``(tokens, repeat)`` per training source for the sampler (None without data.repeats)."""
    if config.data.repeats is None:
        return None
    missing = [spec for spec in config.data.sources if spec not in train_tokens]
    if missing or len(train_tokens) != len(config.data.sources):
        raise DataError(f"the prepared data does not record the train tokens of each source ({', '.join(missing)}); "
                        "prepare it again (delete data.prepared_dir) to use data.repeats")
    return [(train_tokens[spec], repeat) for spec, repeat in zip(config.data.sources, config.data.repeats)]


def describe_mix(sources: list[str], repeats: list[tuple[int, float]]) -> str:
    total = sum(tokens * repeat for tokens, repeat in repeats)
    return "[lmdistill] training mix per epoch: " + ", ".join(
        f"{spec} {tokens:,} tokens x {repeat:g} ({tokens * repeat / total:.0%})" for spec, (tokens, repeat) in zip(sources, repeats))


def tokens_per_step(sampler: BlockSampler, config: RunConfig, ranks: dist.DistInfo) -> int:
    """Tokens of one optimiser step on all ranks."""
    return sampler.tokens_per_batch * config.train.grad_accum * ranks.world_size


def step_until_done(loop: Loop, watch: ValidationWatch, stop_at_step: int | None, progress: bool) -> bool:
    """Train until the budget is spent; True when stopped early (Ctrl-C or ``stop_at_step``), checkpointed."""
    setup, done, budget, train = loop.setup, loop.done, loop.budget, loop.config.train
    train_tokens = setup.data.tokens("train")
    bar = tqdm(total=budget.estimated_total_steps(done.step, done.elapsed), initial=done.step,
               disable=not progress or not setup.ranks.is_main, unit="step", dynamic_ncols=True)
    with GracefulStop() as stop_request, bar:  # the bar closes (ends its line) on errors too
        while not budget.done(done.step, done.elapsed):
            started = time.perf_counter()
            lr = set_learning_rate(loop)
            batches = [next_micro_batch(setup, loop.sampler, train_tokens) for _ in range(train.grad_accum)]
            on_policy = is_on_policy_step(loop.config, done.step + 1)
            if on_policy:
                batches = on_policy_batches(setup, batches, done.step + 1)
            try:
                metrics = train_step(setup, loop.optimizer, batches)
            except NonFiniteError as err:
                raise non_finite_stop(loop.run, done.step + 1, err, loop.start_removed()) from None
            if loop.config.loss.on_policy_fraction > 0:
                metrics["on_policy"] = float(on_policy)
            seconds, stop_requested = agree(setup, time.perf_counter() - started, stop_request.requested)
            done.step += 1
            done.tokens_seen += int(metrics.pop("tokens"))
            done.elapsed += seconds
            log_step(loop, lr, metrics, seconds, bar)
            if budget.done(done.step, done.elapsed):
                break
            if train.eval_every and done.step % train.eval_every == 0:
                watch.see(done.step, validate_now(loop, bar.write)["val_ppl"])
            if train.checkpoint_every and done.step % train.checkpoint_every == 0:
                save(loop)
            if stop_requested or (stop_at_step is not None and done.step >= stop_at_step):
                save(loop)
                return True
    return False


def set_learning_rate(loop: Loop) -> float:
    """The scheduled learning rate of the next step, set on every parameter group."""
    train, done = loop.config.train, loop.done
    lr = train.lr * lr_factor(loop.budget.progress_after(done.step, done.elapsed), loop.warmup, train.schedule,
                              train.min_lr_ratio)
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    return lr


def agree(setup: Setup, seconds: float, stop_requested: bool) -> tuple[float, bool]:
    """Every rank takes the same decisions: the slowest rank's time drives the time budget
    and the schedule, and a stop asked of any rank stops all of them."""
    agreed = dist.max_across({"seconds": seconds, "stop": float(stop_requested)}, setup.ranks, setup.device)
    return agreed["seconds"], agreed["stop"] > 0


def log_step(loop: Loop, lr: float, metrics: dict[str, float], seconds: float, bar: tqdm) -> None:
    done, tokens_per_step = loop.done, loop.tokens_per_step
    if loop.tracker is not None:
        loop.tracker.log({
            "step": done.step, "tokens_seen": done.tokens_seen, "lr": lr,
            **{k: float(f"{v:.7g}") for k, v in metrics.items()},  # 7 significant digits
            "tokens_per_s": round(tokens_per_step / seconds, 1), "elapsed_s": round(done.elapsed, 2),
        })
    bar.total = loop.budget.estimated_total_steps(done.step, done.elapsed)
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_step / seconds:.0f}")


def validate_now(loop: Loop, say=print) -> dict[str, Any]:
    """Validate the student, log the row (rank 0) and return it."""
    setup, done = loop.setup, loop.done
    row = {"step": done.step, "tokens_seen": done.tokens_seen, **validate(setup, setup.data.tokens("validation"))}
    if loop.tracker is not None:
        loop.tracker.log(row)
        say(f"[lmdistill] step {done.step}: validation perplexity {row['val_ppl']:.2f}")
    return row


def write_config(run: RunDir, config: RunConfig, setup: Setup, resume: bool) -> None:
    """A new run's config.yaml, written only once the set-up succeeded (a failed start leaves
    no half-made run); every rank then checks that it sees it."""
    ranks = setup.ranks
    if not resume and ranks.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        with writing(run.config, "config", run):
            write_text_atomic(run.config, config.to_yaml())
    dist.barrier(ranks)
    if not run.config.is_file():
        raise RunDirError(f"rank {ranks.rank} cannot see {run.config}, which rank 0 wrote; {SHARED_RUN_DIR}")
    if ranks.enabled:
        print(f"[lmdistill] {ranks.world_size} process(es), student {config.train.distributed}, teacher "
              f"{config.train.teacher_sharding if setup.teacher is not None else 'not used'}, device {setup.device.type}, "
              f"{describe_precision(setup.autocast, setup.device)}")


def begin(loop: Loop) -> None:
    """Step 0 of a new run (or of a resumed one that never checkpointed): the initial student
    and its validation perplexity."""
    run, ranks = loop.run, loop.setup.ranks
    if loop.resumed:
        if ranks.is_main:
            truncate_metrics(run, -1)
        print(f"[lmdistill] {run.root} has no checkpoint yet; starting it from the beginning")
    torch.manual_seed(loop.config.train.seed + ranks.rank)  # rank 0 as one process; other ranks' dropout differs
    save_student(loop.setup, run, run.student_init, lambda: student_card(loop.setup, run, None))
    row = validate_now(loop, say=lambda line: None)
    print(f"[lmdistill] step 0: validation perplexity {row['val_ppl']:.2f}")


def restore(loop: Loop, checkpoint: Path) -> None:
    """Continue from ``checkpoint``: optimiser, sampler, scaler, counters and RNG as they were."""
    setup, ranks, done = loop.setup, loop.setup.ranks, loop.done
    state = load_trainer_state(checkpoint)
    check_resume_world_size(state, loop.config, ranks, loop.tokens_per_step)
    dist.load_optimizer_state(loop.optimizer, state["optimizer"])
    loop.sampler.load_state_dict(state["sampler"])
    if setup.scaler is not None and state.get("scaler"):
        setup.scaler.load_state_dict(state["scaler"])
    done.step, done.tokens_seen, done.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
    loop.saved_step = done.step
    restore_rng(state, ranks, loop.config.train.seed, done.step)
    if ranks.is_main:
        truncate_metrics(loop.run, done.step)
    print(f"[lmdistill] resuming {loop.run.root} from step {done.step} ({done.tokens_seen:,} tokens)")


def save(loop: Loop) -> None:
    """Checkpoint the current step, once. Every rank calls it: the state is gathered from all
    of them and written by rank 0 in the one-process format. A model holding a non-finite
    weight is never checkpointed."""
    setup, ranks, done = loop.setup, loop.setup.ranks, loop.done
    if loop.saved_step == done.step:
        return
    bad = non_finite_parameter(setup)
    if bad is not None:
        raise non_finite_stop(loop.run, done.step, optimiser_fault(bad, loop.config.train), loop.start_removed())
    student_state = (dist.full_model_state(setup.objective, ranks, prefix="student.")
                     if dist.is_sharded(setup.objective) else None)
    optimizer_state = dist.full_optimizer_state(loop.optimizer, ranks)
    rng_per_rank = dist.gather(rng_state(), ranks)
    if ranks.is_main:
        save_checkpoint(loop.run, done.step, setup.student, setup.tokenizer, {
            "optimizer": optimizer_state, "sampler": loop.sampler.state_dict(),
            "step": done.step, "tokens_seen": done.tokens_seen, "elapsed": done.elapsed,
            "world_size": ranks.world_size, "tokens_per_step": loop.tokens_per_step, "rng_ranks": rng_per_rank,
            **({"scaler": setup.scaler.state_dict()} if setup.scaler is not None else {}),
        }, student_state=student_state)
    dist.barrier(ranks)
    loop.saved_step = done.step


def finish(loop: Loop, watch: ValidationWatch) -> dict[str, Any]:
    """Final validation, checkpoint, student folder and ``summary.json`` (written last)."""
    run, setup, done = loop.run, loop.setup, loop.done
    ranks = setup.ranks
    final_val = validate_now(loop, say=lambda line: None)
    watch.see(done.step, final_val["val_ppl"])
    save(loop)
    summary = run_summary(run, done, finished=True, train_seconds=round(done.elapsed, 1),
                          val_ppl=final_val["val_ppl"], student_parameters=count_parameters(setup.student))
    if ranks.enabled:
        summary["world_size"] = ranks.world_size
    if watch.warnings:
        summary["warnings"] = watch.warnings
    save_student(setup, run, run.student, lambda: student_card(setup, run, summary))
    if ranks.is_main:
        with writing(run.root / "summary.json", "summary", run):
            write_text_atomic(run.root / "summary.json", json.dumps(summary, indent=2) + "\n")
    dist.barrier(ranks)
    print(f"[lmdistill] done: {done.step} steps, {done.tokens_seen:,} tokens, validation perplexity "
          f"{final_val['val_ppl']:.2f}{' (diverged: see the warning above)' if watch.warnings else ''}; student saved "
          f"to {run.student}")
    return summary


def run_summary(run: RunDir, done: Progress, finished: bool, **measured: Any) -> dict[str, Any]:
    """A run's summary (``summary.json`` once finished; what run_training returns): where the
    run is, how far it got, and, when finished, the final measurements."""
    return {"kind": "run", "version": 1, "run_dir": str(run.root), "step": done.step,
            "tokens_seen": done.tokens_seen, "finished": finished, **measured}


def save_student(setup: Setup, run: RunDir, out_dir: Path, card: Callable[[], CardFacts]) -> None:
    """The student as an HF folder with its model card, written by rank 0 (its full weights
    gathered first when FSDP2 shards it: every rank must call this); ``card`` gives the card's
    facts, asked on rank 0 only."""
    ranks = setup.ranks
    state = dist.full_model_state(setup.objective, ranks, prefix="student.") if dist.is_sharded(setup.objective) else None
    if ranks.is_main:
        with writing(out_dir, "student", run):
            save_model(setup.student, setup.tokenizer, out_dir, state_dict=state,
                       extra=lambda tmp: write_card(tmp, card(), card_name(out_dir)))
    dist.barrier(ranks)


def student_card(setup: Setup, run: RunDir, summary: dict[str, Any] | None) -> CardFacts:
    """The card facts of the run's student: as initialised (``summary`` None) or as distilled."""
    config = setup.config
    training = None
    if summary is not None:
        training = training_facts(config, summary, describe_hardware(setup.device, setup.ranks.world_size),
                                  describe_precision(setup.autocast, setup.device))
    command = current_command(f"lmdistill distill --config {shlex.quote(str(run.config))} --out RUN")
    return student_facts(config.model.teacher, setup.student, command, student_spec=config.model.student,
                         training=training, config=config.to_dict())


def check_resume_world_size(state: dict[str, Any], config: RunConfig, ranks: dist.DistInfo, tokens_per_step: int) -> None:
    """A checkpoint resumes with another number of processes only if the global batch (tokens
    per optimiser step) stays the same; the message says how to keep it."""
    saved = int(state.get("world_size", state["sampler"].get("world_size", 1)))
    if saved == ranks.world_size:
        return
    t = config.train
    per_rank = config.data.block_size * t.batch_size * t.grad_accum
    saved_tokens = int(state.get("tokens_per_step", per_rank * saved))
    if saved_tokens != tokens_per_step:
        sequences = saved_tokens // config.data.block_size
        fixes = []
        if sequences % (ranks.world_size * t.batch_size) == 0:
            fixes.append(f"train.grad_accum={sequences // (ranks.world_size * t.batch_size)}")
        if sequences % (ranks.world_size * t.grad_accum) == 0:
            fixes.append(f"train.batch_size={sequences // (ranks.world_size * t.grad_accum)}")
        how = (f"Set {' or '.join(fixes)} in the run's config.yaml to keep it, or resume" if fixes else "Resume")
        raise RunDirError(
            f"the checkpoint was written by {saved} process(es) with a global batch of {sequences} sequences per "
            f"step; {ranks.world_size} process(es) x train.batch_size={t.batch_size} x train.grad_accum={t.grad_accum} "
            f"would make {tokens_per_step // config.data.block_size}. {how} with {saved} process(es) in all "
            f"(torchrun --nproc-per-node ...)"
        )
    print(f"[lmdistill] resuming a run of {saved} process(es) with {ranks.world_size}: same global batch; the full "
          f"checkpoint is re-sharded")


def restore_rng(state: dict[str, Any], ranks: dist.DistInfo, seed: int, step: int) -> None:
    """Each rank's own RNG state when the world size is unchanged; else rank 0's for rank 0 and
    fresh seeds for the others (their dropout masks then differ from an uninterrupted run)."""
    per_rank = state.get("rng_ranks")
    if per_rank and len(per_rank) == ranks.world_size:
        set_rng_state(per_rank[ranks.rank])
    elif ranks.is_main:
        set_rng_state(state["rng"])
    else:
        torch.manual_seed(seed + 1000 * step + ranks.rank)


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

"""Models and runtime for a planned run: data, teacher, student, precision, the optimiser.

:func:`build_setup` turns a :class:`~lmdistill.train.plan.RunPlan` into loaded weights on a
device. Under torchrun local rank 0 of each node fills the caches first (token shards,
converted models), the student (inside its loss, :class:`~lmdistill.loss.objective.StudentObjective`)
is wrapped in DDP or sharded with FSDP2, and the teacher is placed on this rank's device,
replicated or with its layers sharded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import dist
from ..config import ConfigError, RunConfig, TrainConfig
from ..data.prepare import PreparedData, prepare
from ..loss.objective import StudentObjective, logit_path
from ..models.arch import architecture_of, decoder_layers
from ..models.device import cpu_computes_bf16, resolve_device
from ..models.fingerprint import model_fingerprint
from ..models.kernels import fuse_activations, set_dropout
from ..models.load import load_model
from ..models.malloc import ENV as MALLOC_ENV, reuse_freed_memory
from ..student.build import check_shared_vocabulary, student_layer_map
from ..student.cut import CALIBRATION_BLOCK_SIZE, cut_student
from ..teacher_cache.format import data_fingerprint
from ..teacher_cache.reader import TeacherCache
from .correct import corrected_teacher
from .plan import RunPlan, aligned_layers, plan_run


@dataclass
class Setup:
    """Everything a run needs, built before the first step."""

    config: RunConfig
    teacher: PreTrainedModel | None
    """The live teacher; None when no term needs it or its targets are stored."""
    student: PreTrainedModel
    objective: nn.Module
    """The student and its loss as one module (:class:`StudentObjective`), wrapped in DDP or
    sharded with FSDP2 under torchrun: every forward and backward goes through it; ``student``
    is the same weights, for saving, clipping and checks."""
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    device: torch.device
    fused: bool
    """The KL and CE terms come from the fused, chunked lm_head loss (no full logits)."""
    teacher_cache: TeacherCache | None
    ranks: dist.DistInfo
    autocast: torch.dtype | None
    """bf16 or fp16 autocast for the forward passes (None: float32)."""
    scaler: Any
    """A ``torch.amp.GradScaler`` under fp16 autocast, else None."""

    def autocast_context(self):
        """The forward passes' autocast (a no-op in float32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)


def build_setup(config: RunConfig, student_init: Path | None = None, ranks: dist.DistInfo = dist.SINGLE) -> Setup:
    """Plan the run, then load data, teacher and student; ``student_init`` overrides with a saved student."""
    first = lambda fn: dist.main_first(ranks, fn)  # noqa: E731
    plan = first(lambda: plan_run(config))
    train = config.train
    device = dist.rank_device(ranks, resolve_device(train.device))
    autocast = resolve_precision(train.precision, device)  # before any weights load
    if device.type == "cpu" and train.precision == "auto" and cpu_computes_bf16():
        print("[lmdistill] this CPU computes bf16 natively: train.precision=bf16 trains about twice as fast "
              "as float32 (auto keeps float32 on CPUs)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = train.tf32
        torch.backends.cudnn.allow_tf32 = train.tf32
    if train.threads:
        torch.set_num_threads(train.threads)
    if device.type == "cpu" and reuse_freed_memory() and ranks.is_main:
        print("[lmdistill] CPU memory: freed blocks are kept for reuse, not returned to the OS (faster steps; "
              f"{MALLOC_ENV}=system keeps glibc's defaults)")
    data = first(lambda: prepare(plan.tokenizer, config.data.sources, plan.prepared_dir,
                                 tokenizer_name=config.model.teacher))
    check_data(config, data)
    cache = plan.teacher_cache
    if cache is not None:
        cache.check(data_fingerprint=data_fingerprint(data, "train"), num_tokens=len(data.tokens("train")),
                    teacher=config.model.teacher)
        print(f"[lmdistill] teacher cache {cache.describe()}")
    teacher, student = load_models(plan, data, student_init, first)
    aligned = (aligned_layers(config, student_layer_map(student), len(decoder_layers(student)))
               if config.loss.needs_layers else None)
    if not config.loss.needs_teacher or cache is not None:
        teacher = None  # causal-LM-only training or stored targets: free the teacher's memory
    else:
        fuse_activations(teacher)
        place_teacher(teacher, config, ranks, device, autocast)
    logits = logit_path(config.loss, teacher, student)
    print(f"[lmdistill] logit terms: {logits.reason}")
    prepare_student(student, config, ranks)
    objective = StudentObjective(student, config.loss, aligned, logits.chunk_tokens,
                                 matmul_dtype=torch.bfloat16 if autocast == torch.bfloat16 else None)
    objective = dist.wrap_student(objective, ranks, train.distributed, device, decoder_layers(student))
    if train.compile:
        compile_layers(decoder_layers(student))
    scaler = torch.amp.GradScaler(device.type) if autocast == torch.float16 else None
    return Setup(config, teacher, student, objective, plan.tokenizer, data, device, logits.chunk_tokens > 0, cache,
                 ranks, autocast, scaler)


def check_data(config: RunConfig, data: PreparedData) -> None:
    for split in ("train", "validation"):
        if data.splits.get(split, 0) < config.data.block_size + 1:
            raise ConfigError(
                f"the {split} split of {config.data.sources} has {data.splits.get(split, 0)} tokens, fewer than one "
                f"block of data.block_size={config.data.block_size}; add data or lower data.block_size"
            )


def load_models(plan: RunPlan, data: PreparedData, student_init: Path | None,
                first) -> tuple[PreTrainedModel | None, PreTrainedModel]:
    """The teacher (None when stored targets make its weights unnecessary) and the student:
    the saved one, the configured pretrained one, or one cut from the teacher."""
    config, cache = plan.config, plan.teacher_cache
    teacher = None
    if cache is None or (student_init is None and config.model.student is None):
        teacher = first(lambda: load_model(config.model.teacher))
        if config.model.teacher_correction_tokens:  # local rank 0 corrects it (or finds it cached) first
            teacher = first(lambda: corrected_teacher(teacher, config, plan.tokenizer, data))
        if cache is not None:  # loaded anyway to cut the student: check that the cache is from these weights
            cache.check(teacher_fingerprint=model_fingerprint(teacher), teacher=config.model.teacher)
    if student_init is not None:
        student = load_model(student_init)
    else:
        torch.manual_seed(config.train.seed)
        if config.model.student is not None:
            student = first(lambda: make_student(config, teacher, data.tokens("train")))
        else:
            student = make_student(config, teacher, data.tokens("train"))
    if teacher is not None:
        check_shared_vocabulary(teacher, student)
    if cache is not None:
        cache.check(vocab_size=student.get_output_embeddings().weight.shape[0])
    return teacher, student


def make_student(config: RunConfig, teacher: PreTrainedModel, train_tokens: np.ndarray) -> PreTrainedModel:
    if config.model.student is not None:
        return load_model(config.model.student)
    cut = cut_student(teacher, config.model, lambda: train_tokens,
                      block_size=min(config.data.block_size, CALIBRATION_BLOCK_SIZE), seed=config.train.seed,
                      log=lambda line: print(f"[lmdistill] {line}"))
    print(f"[lmdistill] student keeps teacher layers {cut.layers}" + ("" if config.model.layers else f" ({cut.strategy})"))
    return cut.student


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None: float32).

    auto is bf16 on a CUDA device that supports it and float32 anywhere else. On the CPU,
    bf16 is accepted where the CPU computes it natively (AVX512-BF16 or AMX: about twice the
    float32 step rate) and refused elsewhere, where it is emulated and slower than float32;
    fp16 is for CUDA only. A refusal names the fix.
    """
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if precision == "auto":
            return None
        if precision == "bf16" and device.type == "cpu":
            if cpu_computes_bf16():
                return torch.bfloat16
            raise ConfigError(
                "config value train.precision: bf16 needs a CPU that computes bf16 natively (AVX512-BF16 or AMX); "
                "this one would emulate it, slower than float32. Set train.precision=fp32 (or auto)"
            )
        raise ConfigError(
            f"config value train.precision: {precision} autocast is for CUDA devices (and bf16 for CPUs with native "
            f"bf16); on {device.type} training runs in float32. Set train.precision=auto (or fp32), or train on a GPU "
            "(train.device=cuda)"
        )
    bf16_ok = torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if bf16_ok else None
    if precision == "bf16" and not bf16_ok:
        raise ConfigError(f"config value train.precision: {torch.cuda.get_device_name(device)} has no bf16 support; "
                          "set train.precision=fp16 (with a gradient scaler) or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def describe_precision(autocast: torch.dtype | None, device: torch.device) -> str:
    """How a run computes, in words: float32, or an autocast dtype over float32 master weights."""
    if autocast is None:
        return "float32"
    native = " (this CPU computes bf16 natively)" if device.type == "cpu" else ""
    name = "bf16" if autocast == torch.bfloat16 else "fp16"  # as train.precision names them
    return f"{name} autocast{native}, float32 master weights"


def place_teacher(teacher: PreTrainedModel, config: RunConfig, ranks: dist.DistInfo, device: torch.device,
                  autocast: torch.dtype | None) -> None:
    """Inference only: eval mode, no gradients, weights in bf16 under bf16 autocast (never
    trained, so no float32 master copy is needed), layers compiled with ``train.compile``,
    then on this rank's device, replicated or with its decoder layers sharded."""
    teacher.eval().requires_grad_(False)
    if autocast == torch.bfloat16:
        teacher.to(dtype=torch.bfloat16)
    if config.train.teacher_sharding == "fsdp" and ranks.enabled:
        dist.shard_teacher(teacher, decoder_layers(teacher), ranks, device)
    else:
        teacher.to(device)
    if config.train.compile:
        compile_layers(decoder_layers(teacher))


def prepare_student(student: PreTrainedModel, config: RunConfig, ranks: dist.DistInfo) -> None:
    """What must be settled before DDP or FSDP2 wraps the student: frozen parameters (DDP
    buckets the ones that need gradients when it is built), its modules (fused activations,
    the training dropout) and activation checkpointing; and, under torchrun, that every rank
    built the same student."""
    train = config.train
    trainable_parameters(student, train)  # freezes the embeddings the config keeps fixed
    fuse_activations(student)
    if train.dropout is not None:
        set_dropout(student, train.dropout)
    if train.activation_checkpointing:
        if not getattr(student, "supports_gradient_checkpointing", False):
            raise ConfigError(f"config value train.activation_checkpointing: {type(student).__name__} does not support "
                              "activation checkpointing; set train.activation_checkpointing=false")
        # Non-reentrant checkpointing: works under DDP and FSDP2, and restores the RNG so
        # that dropout masks (and so the results) are those of a run without it.
        kwargs = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if ranks.enabled and ranks.world_size > 1:
        with torch.no_grad():
            total = sum(p.double().sum().item() for p in student.parameters())
        dist.check_same(ranks, (student_layer_map(student), round(total, 6)),
                        "the student built on each rank (layer map, weight sum); set model.layers explicitly")


def compile_layers(layers: nn.ModuleList) -> None:
    """``torch.compile`` each layer's forward in place, after DDP or FSDP2 wrapped it: parameter
    names (and so checkpoints and saved folders) are unchanged, FSDP2's hooks stay outside the
    compiled code, and the compiled forward is the outermost one, so transformers' activation
    checkpointing (which wraps the class's forward, FSDP2's subclass included) still applies."""
    for layer in layers:
        layer.forward = torch.compile(layer.forward)


def trainable_parameters(student: PreTrainedModel, train: TrainConfig) -> list[nn.Parameter]:
    """The student's parameters that train; marks the frozen ones (train.freeze_*) first."""
    arch = architecture_of(student)
    if train.freeze_pos_embeddings and arch.pos_embed:
        student.get_submodule(arch.pos_embed).requires_grad_(False)
    if train.freeze_embeddings:
        # A tied LM head is the same tensor; an untied one trains (it reads the student's stream).
        student.get_input_embeddings().requires_grad_(False)
    return [p for p in student.parameters() if p.requires_grad]


def make_optimizer(config: RunConfig, student: PreTrainedModel) -> torch.optim.AdamW:
    params = trainable_parameters(student, config.train)
    # Biases and norm gains get no weight decay (standard practice; no-op at the recipe's 0).
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=tuple(config.train.betas), eps=config.train.adam_eps,
                             fused=can_fuse_adamw(params) or None)


def can_fuse_adamw(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW (one kernel over every tensor) takes these parameters.

    On the CPU it is about 6x faster than the default per-tensor loop (0.04 vs 0.23 s a step for
    82M parameters on 2 cores): about 4% of a float32 GPT-2 -> 6-layer step, 9% of the bf16 demo's.
    Plain float tensors on a CPU or CUDA device only; FSDP2's sharded parameters keep the default.
    """
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and type(p) is nn.Parameter for p in params)

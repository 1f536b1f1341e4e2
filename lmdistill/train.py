"""The distillation loop: set-up, one optimiser step, validation, checkpoints, resume.

The loop only combines weighted loss terms from :mod:`lmdistill.losses`; the maths lives
there. Gradient accumulation is normalised by the token count of the whole optimiser step
(each micro-batch's summed loss is divided by the step's token total), so 4 micro-batches
of 1 sequence give the same update as 1 batch of 4.

Under torchrun (:mod:`lmdistill.dist`) every rank runs this loop on its own blocks: each
micro-batch's summed loss is divided by the rank's step tokens and DDP (or FSDP2) averages
the gradients over the ranks, which equals dividing by the global token count because every
rank has the same number of tokens. Logged values are sums over all ranks divided by the
global token count; only rank 0 writes to the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .checkpoint import (
    RunDir,
    RunDirError,
    RunLock,
    append_metrics,
    load_trainer_state,
    read_metrics,
    remove_run_leftovers,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_metrics,
    writing,
)
from . import dist
from .atomic import nearest_existing, write_text_atomic
from .errors import NonFiniteError
from .config import ConfigError, RunConfig, check_teacher_cache_settings, load_config
from .data.prepare import PreparedData, prepare
from .data.sampler import BlockSampler
from .evaluate.perplexity import PerplexityProtocol, perplexity
from .layer_search import choose_layers
from .chunked_loss import chunked_logit_losses
from .losses import LossOutput, LossWeights, distillation_loss
from .sparse_kl import sparse_kl_divergence
from .teacher_cache import TeacherCache, TeacherTargets, data_fingerprint
from .schedule import Budget, lr_factor
from .models import (
    architecture_of,
    cache_dir,
    config_context_length,
    config_num_layers,
    count_parameters,
    decoder_layers,
    load_model,
    load_tokenizer,
    config_fingerprint,
    model_config,
    model_fingerprint,
    resolve_device,
    tokenizer_fingerprint,
)
from .student import (
    DATA_STRATEGIES,
    build_student,
    check_layer_request,
    check_shared_vocabulary,
    resolve_layer_map,
    resolve_strategy,
    save_model,
    student_depth,
    student_layer_map,
)


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
    aligned: list[tuple[int, int]] | None = None
    """(student layer, teacher layer) pairs for the align_* terms; None when they are off."""
    divergence: Callable[..., torch.Tensor] | None = None
    """The logit term's divergence (None: forward KL)."""
    chunk_tokens: int = 0
    """> 0: KL and CE come from the fused, chunked lm_head loss (lmdistill.chunked_loss)."""
    teacher_cache: TeacherCache | None = None
    """Stored teacher targets (model.teacher_cache): the KL term is the sparse KL against them."""
    objective: nn.Module | None = None
    """The student and its loss as one module (:class:`StudentObjective`), wrapped in DDP or
    sharded with FSDP2 under torchrun; built from the fields above when None."""
    ranks: dist.DistInfo = dist.SINGLE
    """This process's rank and world size (torchrun)."""
    autocast: torch.dtype | None = None
    """bf16 or fp16 autocast for the forward passes (None: float32)."""
    scaler: Any = None
    """A ``torch.amp.GradScaler`` under fp16 autocast."""

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective = StudentObjective(self.student, self.weights, self.aligned, self.divergence,
                                              self.chunk_tokens)

    def autocast_context(self):
        """The forward passes' autocast (a no-op in float32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)


def loss_weights(config: RunConfig) -> LossWeights:
    c = config.loss
    return LossWeights(kl=c.kl, ce=c.ce, cos=c.cos, mse=c.mse, temperature=c.temperature,
                       align_cos=c.align_cos, align_mse=c.align_mse)


def needs_teacher(weights: LossWeights) -> bool:
    return weights.kl > 0 or weights.needs_hidden or weights.needs_layers


def aligned_layers(config: RunConfig, layer_map: list[int] | None, num_student: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for intermediate-layer alignment.

    Student layer ``i`` is aligned with teacher layer ``layer_map[i]``, the one it was copied
    from. The last student layer is left to ``loss.cos``/``loss.mse``: its HF hidden state
    is after the final norm, and so is comparable only with the teacher's last.
    """
    if layer_map is None:
        raise ConfigError(
            "config values loss.align_cos/loss.align_mse need a student cut from the teacher (its config.json records "
            "lmdistill_layer_map, the teacher layer each student layer came from); set them to 0 for a pretrained "
            "or randomly initialised student"
        )
    chosen = config.loss.align_layers if config.loss.align_layers is not None else list(range(num_student - 1))
    bad = [i for i in chosen if not 0 <= i < num_student - 1]
    if bad:
        raise ConfigError(
            f"config value loss.align_layers: student layer {bad[0]} cannot be aligned; choose among 0..{num_student - 2} "
            f"(the student has {num_student} layers; the last one's output is aligned by loss.cos and loss.mse)"
        )
    if not chosen:
        raise ConfigError("config values loss.align_cos/loss.align_mse: a 1-layer student has no intermediate layer "
                          "to align; set them to 0")
    return [(i, layer_map[i]) for i in chosen]


def open_teacher_cache(config: RunConfig, teacher_cfg=None, tokenizer: PreTrainedTokenizerBase | None = None) -> TeacherCache:
    """The run's teacher cache, checked against the teacher's config and tokenizer, the block
    size and the temperature (all cheap: headers, configs, tokenizer files)."""
    assert config.model.teacher_cache is not None
    check_teacher_cache_settings(config)
    cache = TeacherCache(config.model.teacher_cache, split="train")
    teacher_cfg = teacher_cfg if teacher_cfg is not None else model_config(config.model.teacher)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model.teacher)
    cache.check(tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                teacher_config_fingerprint=config_fingerprint(teacher_cfg), block_size=config.data.block_size,
                temperature=config.loss.temperature, teacher=config.model.teacher)
    return cache


def check_config_against_models(config: RunConfig) -> None:
    """Cheap checks from the model configs and tokenizers, before any weights or data load."""
    teacher_cfg = model_config(config.model.teacher)
    if config.model.teacher_cache is not None:
        open_teacher_cache(config, teacher_cfg)
    contexts = {"teacher": config_context_length(teacher_cfg)}
    if config.model.student is not None:
        student_cfg = model_config(config.model.student)
        contexts["student"] = config_context_length(student_cfg)
        if getattr(teacher_cfg, "vocab_size", None) != getattr(student_cfg, "vocab_size", None):
            raise ConfigError(
                f"teacher {config.model.teacher} and student {config.model.student} have different vocabularies "
                f"({teacher_cfg.vocab_size} vs {student_cfg.vocab_size} tokens): logit distillation needs a shared "
                f"tokenizer. Cut a student from the teacher (leave model.student empty) or pick one that shares it."
            )
        if load_tokenizer(config.model.teacher).get_vocab() != load_tokenizer(config.model.student).get_vocab():
            raise ConfigError(
                f"teacher {config.model.teacher} and student {config.model.student} tokenizers map tokens to different "
                f"ids: logit distillation needs the same tokenizer. Pick a student trained with the teacher's tokenizer."
            )
    for role, context in contexts.items():
        if context is not None and config.data.block_size > context:
            raise ConfigError(
                f"config value data.block_size: {config.data.block_size} exceeds the {role}'s context of {context} "
                f"tokens; set data.block_size={context} or less"
            )
    if loss_weights(config).needs_layers:
        if config.model.student is not None:
            student_cfg = model_config(config.model.student)
            aligned_layers(config, getattr(student_cfg, "lmdistill_layer_map", None), config_num_layers(student_cfg))
        elif config.model.random_init:
            aligned_layers(config, None, 0)
        else:
            depth = (len(config.model.layers) if config.model.layers is not None
                     else student_depth(config_num_layers(teacher_cfg), config.model.num_layers))
            aligned_layers(config, list(range(depth)), depth)  # indices only: the real map comes later
    if config.model.student is None:
        try:
            # Range checks only: importance and search need the teacher's weights.
            check_layer_request(config_num_layers(teacher_cfg), config.model.layers, config.model.num_layers,
                                resolve_strategy(config.model.strategy, teacher_cfg))
        except ValueError as err:
            field = "model.layers" if config.model.layers is not None else "model.num_layers"
            raise ConfigError(f"config value {field}: {err}") from None


def prepared_dir(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Path:
    if config.data.prepared_dir:
        return Path(config.data.prepared_dir)
    return default_prepared_dir(config.data.sources, tokenizer)


def default_prepared_dir(sources: list[str], tokenizer: PreTrainedTokenizerBase) -> Path:
    """The cache folder that ``data.sources`` are prepared into when ``data.prepared_dir`` is unset."""
    key = hashlib.sha256(json.dumps([sources, tokenizer_fingerprint(tokenizer)]).encode()).hexdigest()[:16]
    return cache_dir() / "data" / key


def make_student(config: RunConfig, teacher: PreTrainedModel, train_tokens: np.ndarray) -> PreTrainedModel:
    if config.model.student is not None:
        return load_model(config.model.student)
    m = config.model
    num_teacher = len(decoder_layers(teacher))
    strategy = resolve_strategy(m.strategy, teacher.config)
    choice = None
    if strategy in DATA_STRATEGIES and m.layers is None:
        choice = choose_layers(teacher, train_tokens, student_depth(num_teacher, m.num_layers), strategy,
                               m.calibration_tokens, m.search_objective, block_size=min(config.data.block_size, 256),
                               log=lambda line: print(f"[lmdistill] {line}"))
        layers = choice.layers
    else:
        layers = resolve_layer_map(num_teacher, m.layers, m.num_layers, strategy)
    print(f"[lmdistill] student keeps teacher layers {layers}" + ("" if m.layers else f" ({strategy})"))
    student = build_student(teacher, layers, random_init=m.random_init, seed=config.train.seed)
    if choice is not None:
        student.config.lmdistill_layer_choice = choice.to_dict()  # saved in config.json with the student
    return student


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None: float32).

    auto is bf16 on a CUDA device that supports it and float32 anywhere else; bf16 and fp16
    are refused off CUDA (the CPU trains in float32) with a message that names the fix.
    """
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if precision == "auto":
            return None
        raise ConfigError(
            f"config value train.precision: {precision} autocast is for CUDA devices; on {device.type} training runs "
            f"in float32. Set train.precision=auto (or fp32), or train on a GPU (train.device=cuda)"
        )
    bf16_ok = torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if bf16_ok else None
    if precision == "bf16" and not bf16_ok:
        raise ConfigError(f"config value train.precision: {torch.cuda.get_device_name(device)} has no bf16 support; "
                          "set train.precision=fp16 (with a gradient scaler) or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def build_setup(config: RunConfig, student_init: Path | None = None, ranks: dist.DistInfo = dist.SINGLE) -> Setup:
    """Load tokenizer, data, teacher and student; ``student_init`` overrides with a saved student.

    Under torchrun (``ranks.enabled``) local rank 0 of each node fills the caches first (token
    shards, converted models), the student is wrapped in DDP or sharded with FSDP2 and the
    teacher placed on this rank's device, replicated or with its layers sharded
    (``train.distributed``, ``train.teacher_sharding``).
    """
    first = lambda fn: dist.main_first(ranks, fn)  # noqa: E731
    first(lambda: check_config_against_models(config))
    train = config.train
    device = dist.rank_device(ranks, resolve_device(train.device))
    autocast = resolve_precision(train.precision, device)  # before any weights load
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = train.tf32
        torch.backends.cudnn.allow_tf32 = train.tf32
    if train.threads:
        torch.set_num_threads(train.threads)
    weights = loss_weights(config)
    tokenizer = first(lambda: load_tokenizer(config.model.teacher))
    data = first(lambda: prepare(tokenizer, config.data.sources, prepared_dir(config, tokenizer),
                                 tokenizer_name=config.model.teacher))
    for split in ("train", "validation"):
        if data.splits.get(split, 0) < config.data.block_size + 1:
            raise ConfigError(
                f"the {split} split of {config.data.sources} has {data.splits.get(split, 0)} tokens, fewer than one "
                f"block of data.block_size={config.data.block_size}; add data or lower data.block_size"
            )
    cache = None
    if config.model.teacher_cache is not None:
        # Everything about the cache is checked here, before any weights load.
        cache = open_teacher_cache(config, tokenizer=tokenizer)
        train_tokens = data.tokens("train")
        cache.check(data_fingerprint=data_fingerprint(data, "train"), num_tokens=len(train_tokens),
                    teacher=config.model.teacher)
        print(f"[lmdistill] teacher cache {cache.describe()}")
    teacher = None
    if cache is not None and (student_init is not None or config.model.student is not None):
        pass  # the student loads on its own: the teacher's weights are never needed
    else:
        teacher = first(lambda: load_model(config.model.teacher))
        if cache is not None:  # loaded anyway to cut the student: check that the cache is from these weights
            cache.check(teacher_fingerprint=model_fingerprint(teacher), teacher=config.model.teacher)
    if student_init is not None:
        student = load_model(student_init)
    else:
        torch.manual_seed(train.seed)
        if config.model.student is not None:
            student = first(lambda: make_student(config, teacher, data.tokens("train")))
        else:
            student = make_student(config, teacher, data.tokens("train"))
    if teacher is not None:
        check_shared_vocabulary(teacher, student)
    if cache is not None:
        cache.check(vocab_size=student.get_output_embeddings().weight.shape[0])
    aligned = None
    if weights.needs_layers:
        aligned = aligned_layers(config, student_layer_map(student), len(decoder_layers(student)))
    if not needs_teacher(weights) or cache is not None:
        teacher = None  # causal-LM-only training or stored targets: free the teacher's memory
    else:
        place_teacher(teacher, config, ranks, device, autocast)
    chunk_tokens = fused_chunk_tokens(config, teacher, student)
    prepare_student(student, config, ranks)
    objective = StudentObjective(student, weights, aligned, config.loss.divergence_spec(), chunk_tokens,
                                 matmul_dtype=torch.bfloat16 if autocast == torch.bfloat16 else None)
    objective = dist.wrap_student(objective, ranks, train.distributed, device, decoder_layers(student))
    if train.compile:
        compile_layers(decoder_layers(student))
    scaler = torch.amp.GradScaler(device.type) if autocast == torch.float16 else None
    return Setup(config, teacher, student, tokenizer, data, device, weights, aligned, config.loss.divergence_spec(),
                 chunk_tokens, cache, objective=objective, ranks=ranks, autocast=autocast, scaler=scaler)


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
    buckets the ones that need gradients when it is built) and activation checkpointing;
    and, under torchrun, that every rank built the same student."""
    train = config.train
    trainable_parameters(student, train.freeze_pos_embeddings)  # freezes position embeddings
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


# Config fields of models whose logits are not just lm_head(last hidden state).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def fused_chunk_tokens(config: RunConfig, teacher: PreTrainedModel | None, student: PreTrainedModel) -> int:
    """``loss.chunk_tokens`` when the fused path computes this run's logit terms exactly, else 0."""
    c = config.loss
    if c.chunk_tokens == 0 or (c.kl == 0 and c.ce == 0):
        return 0
    reason = None
    if c.divergence != "forward_kl" and c.kl > 0:
        reason = f"loss.divergence={c.divergence} has no fused path (forward_kl only)"
    for role, model in (("teacher", teacher if c.kl > 0 else None), ("student", student)):
        if model is None:
            continue
        transforms = [k for k in _LOGIT_TRANSFORMS if getattr(model.config, k, None) not in (None, 1, 1.0)]
        head = model.get_output_embeddings()
        if transforms or not isinstance(head, nn.Linear):
            reason = f"the {role}'s logits are not a plain linear head ({', '.join(transforms) or type(head).__name__})"
    if reason:
        print(f"[lmdistill] {reason}: building full logits (loss.chunk_tokens ignored)")
        return 0
    return c.chunk_tokens


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


# ---------------------------------------------------------------------------------------
# One step


def forward_teacher(teacher: PreTrainedModel | None, input_ids: torch.Tensor, want_hidden: bool, fused: bool = False):
    """Teacher logits (None when ``fused``) and hidden states (all if asked, else the last when fused)."""
    if teacher is None:
        return None, None
    with torch.no_grad():
        return forward_model(teacher, input_ids, want_hidden, fused)


def forward_model(model: PreTrainedModel, input_ids: torch.Tensor, want_hidden: bool, fused: bool):
    """``(logits, hidden_states)``. Fused: no logits, only the body (the loss applies the lm_head
    chunk by chunk) and at least the last hidden state, after the final norm."""
    if not fused:
        out = model(input_ids=input_ids, output_hidden_states=want_hidden)
        return out.logits, (out.hidden_states if want_hidden else None)
    out = model.base_model(input_ids=input_ids, output_hidden_states=want_hidden)
    return None, (out.hidden_states if want_hidden else (out.last_hidden_state,))


class StudentObjective(nn.Module):
    """The student and its loss as one module: the unit that DDP wraps and FSDP2 shards.

    ``forward(input_ids, labels, teacher_logits=..., teacher_states=..., teacher_head=...)``
    runs the student on a micro-batch and returns ``(total, terms)``, the weighted loss and
    each term summed over tokens (a tuple, so that FSDP2 finds the output tensor and hooks its
    backward); ``cached=TeacherTargets`` scores against stored teacher targets instead;
    ``forward(input_ids, logits_only=True)`` returns the student's logits (validation).

    One forward call per micro-batch that covers the whole student, the loss included, is
    what makes the fused lm_head loss (``chunk_tokens > 0``, which runs only the body and reads
    the lm_head weight itself) correct under data parallelism: DDP's gradient hooks see every
    parameter the loss used and FSDP2's root unit has the embeddings and lm_head unsharded
    while the loss reads them. The teacher is not part of it: its outputs come in as inputs.
    """

    def __init__(self, student: PreTrainedModel, weights: LossWeights, aligned: list[tuple[int, int]] | None = None,
                 divergence: Callable[..., torch.Tensor] | None = None, chunk_tokens: int = 0,
                 matmul_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.student = student
        self.weights = weights
        self.aligned = aligned or []
        self.divergence = divergence
        self.chunk_tokens = chunk_tokens
        self.matmul_dtype = matmul_dtype
        """Dtype of the fused loss's vocab-sized matmuls (bf16 under bf16 autocast, like the lm_head's)."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, teacher_logits=None,
                teacher_states=None, teacher_head=None, cached: TeacherTargets | None = None, logits_only: bool = False):
        if logits_only:
            return self.student(input_ids=input_ids).logits
        if cached is not None:
            return self._cached_loss(input_ids, labels, cached)
        weights = self.weights
        fused = self.chunk_tokens > 0
        want_hidden = weights.needs_hidden or weights.needs_layers
        pairs = self.aligned  # hidden_states[0] is the embeddings: layer i's output is [i + 1]
        student_logits, student_states = forward_model(self.student, input_ids, want_hidden, fused)
        rest = weights
        terms: dict[str, torch.Tensor] = {}
        total = None
        if fused:
            head = self.student.get_output_embeddings()
            t_weight, t_bias = teacher_head if teacher_head is not None else (None, None)
            logit_terms = chunked_logit_losses(
                student_states[-1], head.weight, teacher_states[-1] if weights.kl > 0 else None, t_weight, labels,
                kl_weight=weights.kl, ce_weight=weights.ce, temperature=weights.temperature, reduction="sum",
                student_head_bias=head.bias, teacher_head_bias=t_bias, chunk_tokens=self.chunk_tokens,
                matmul_dtype=self.matmul_dtype)
            total, terms = logit_terms.total, dict(logit_terms.terms)
            if not (weights.needs_hidden or weights.needs_layers):
                return total, terms
            rest = dataclasses.replace(weights, kl=0.0, ce=0.0)
        out = distillation_loss(
            student_logits, teacher_logits, labels, rest,
            student_hidden=student_states[-1] if want_hidden else None,
            teacher_hidden=teacher_states[-1] if want_hidden else None, reduction="sum",
            student_layers=[student_states[i + 1] for i, _ in pairs] if pairs else None,
            teacher_layers=[teacher_states[j + 1] for _, j in pairs] if pairs else None,
            divergence=self.divergence,
        )
        return (out.total if total is None else total + out.total), {**terms, **out.terms}

    def _cached_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, cached: TeacherTargets):
        """The sparse KL against stored teacher targets (logged as ``kl``) plus the terms that
        need no teacher (CE), through the fused lm_head loss when ``chunk_tokens > 0``."""
        weights = self.weights
        if self.chunk_tokens > 0:  # the config refuses hidden-state terms with a cache: KL and CE are all
            _, states = forward_model(self.student, input_ids, False, fused=True)
            head = self.student.get_output_embeddings()
            out = chunked_logit_losses(
                states[-1], head.weight, None, None, labels, kl_weight=weights.kl, ce_weight=weights.ce,
                temperature=weights.temperature, reduction="sum", student_head_bias=head.bias,
                chunk_tokens=self.chunk_tokens, matmul_dtype=self.matmul_dtype, teacher_targets=cached)
            return out.total, dict(out.terms)
        student_logits = self.student(input_ids=input_ids).logits
        kl = sparse_kl_divergence(student_logits, cached.values, cached.indices, cached.lse,
                                  temperature=weights.temperature, reduction="sum",
                                  tail_indices=cached.tail_indices, tail_values=cached.tail_values)
        total, terms = weights.kl * kl, {"kl": kl}
        rest = dataclasses.replace(weights, kl=0.0) if any(t != "kl" for t in weights.active_terms()) else None
        if rest is not None:  # teacher-free terms only: the config refuses hidden-state terms with a cache
            out = distillation_loss(student_logits, None, labels, rest, reduction="sum")
            total, terms = total + out.total, {**terms, **out.terms}
        return total, terms


def step_loss(setup: Setup, input_ids: torch.Tensor, labels: torch.Tensor,
              cached: TeacherTargets | None = None) -> LossOutput:
    """The weighted loss of one micro-batch (summed over tokens), through the fused path when set;
    with ``cached`` teacher targets the ``kl`` term is the sparse KL against them. The teacher
    runs here (no gradients), the student and the loss in ``setup.objective``."""
    if cached is not None:
        total, terms = setup.objective(input_ids, labels, cached=cached)
        return LossOutput(total=total, terms=terms)
    weights = setup.weights
    fused = setup.chunk_tokens > 0
    want_hidden = weights.needs_hidden or weights.needs_layers
    teacher_logits, teacher_states = forward_teacher(setup.teacher, input_ids, want_hidden, fused)
    teacher_head = None
    if fused and weights.kl > 0:
        t_head = setup.teacher.get_output_embeddings()
        teacher_head = (t_head.weight, t_head.bias)
    total, terms = setup.objective(input_ids, labels, teacher_logits=teacher_logits, teacher_states=teacher_states,
                                   teacher_head=teacher_head)
    return LossOutput(total=total, terms=terms)


def next_micro_batch(setup: Setup, sampler: BlockSampler, tokens: np.ndarray) -> tuple:
    """``(input_ids, labels)``, plus the blocks' stored teacher targets when the run has a cache."""
    if setup.teacher_cache is None:
        return sampler.next_batch(tokens)
    input_ids, labels, blocks = sampler.next_indexed_batch(tokens)
    return input_ids, labels, setup.teacher_cache.targets(blocks, setup.weights.temperature)


def train_step(setup: Setup, optimizer: torch.optim.Optimizer, micro_batches: list[tuple]) -> dict[str, float]:
    """One optimiser step over ``micro_batches`` (``(input_ids, labels)`` or ``(input_ids, labels,
    TeacherTargets)``); returns per-token loss terms (over all ranks), the grad norm and the
    step's token count (all ranks).

    Under DDP the gradients are all-reduced once, in the backward pass of the last
    micro-batch; each rank divides by its own step tokens and DDP averages over the ranks,
    which is the global per-token mean since every rank has the same token count. Under fp16
    a gradient scaler scales the loss and skips steps whose gradients overflow.
    """
    objective, scaler = setup.objective, setup.scaler
    step_tokens = sum(batch[1].numel() for batch in micro_batches)  # this rank's
    sums: dict[str, torch.Tensor] = {}
    objective.train()
    optimizer.zero_grad(set_to_none=True)
    for i, (input_ids, labels, *extra) in enumerate(micro_batches):
        input_ids, labels = input_ids.to(setup.device), labels.to(setup.device)
        cached = extra[0].to(setup.device) if extra and extra[0] is not None else None
        with dist.grad_sync(objective, sync=i == len(micro_batches) - 1):
            with setup.autocast_context():
                loss = step_loss(setup, input_ids, labels, cached)
            scaled = loss.total / step_tokens
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        # float64 sums on the device: one host sync per step instead of one per micro-batch and term
        for name, value in (("loss", loss.total), *loss.terms.items()):
            sums[name] = sums.get(name, 0.0) + value.detach().double()
    names = list(sums)
    totals = dict(zip(names, torch.stack([sums[n] for n in names]).tolist())) if names else {}
    totals = dist.sum_across({**totals, "tokens": float(step_tokens)}, setup.ranks, setup.device)
    all_tokens = totals.pop("tokens")
    metrics = {name: total / all_tokens for name, total in totals.items()}
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in setup.student.parameters() if p.grad is not None]
    max_norm = setup.config.train.max_grad_norm
    grad_norm = dist.local_value(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
    grad_norm = grad_norm.item()
    # Checked before the weights change, so a fault never reaches them (or a checkpoint). Under
    # fp16 the scaler itself skips steps whose gradients overflowed.
    check_finite_step(setup, metrics, grad_norm if scaler is None else 0.0)
    if scaler is not None:
        scaler.step(optimizer)  # skipped (and the scale lowered) when the gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    metrics["grad_norm"] = grad_norm
    if scaler is not None:
        metrics["loss_scale"] = scaler.get_scale()
    metrics["tokens"] = int(all_tokens)
    return metrics


# The config field that most often makes each loss term non-finite (besides train.lr).
_TERM_CAUSES = {
    "kl": "loss.temperature and loss.kl", "ce": "loss.ce and the data", "cos": "loss.cos", "mse": "loss.mse",
    "align_cos": "loss.align_cos", "align_mse": "loss.align_mse",
}


def check_finite_step(setup: Setup, metrics: dict[str, float], grad_norm: float) -> None:
    """Raise :class:`NonFiniteError` naming the likely cause when a step's loss or gradient
    norm is NaN or infinite (every rank sees the same summed values, so all raise together)."""
    train = setup.config.train
    bad = {name: value for name, value in metrics.items() if not math.isfinite(value)}
    if not bad and math.isfinite(grad_norm):
        return
    weights = non_finite_parameter(setup)
    if weights is not None:
        cause = optimiser_fault(weights, train)
    elif bad:
        terms = [name for name in bad if name != "loss"]
        if terms:
            fields = "; ".join(f"{name}: check {_TERM_CAUSES.get(name, 'its weight')}" for name in terms)
        else:  # every term finite, their weighted sum not
            fields = f"the weighted sum overflowed: check the loss weights ({loss_weights_text(setup.config)})"
        cause = (f"the loss is non-finite ({', '.join(f'{k}={v}' for k, v in bad.items())}) with finite student "
                 f"weights ({fields}; or lower train.lr, now {train.lr:g})")
    else:
        cause = (f"the gradient norm is {grad_norm} with a finite loss: check the loss weights "
                 f"({loss_weights_text(setup.config)}) or lower train.lr ({train.lr:g})")
    raise NonFiniteError(cause)


def loss_weights_text(config: RunConfig) -> str:
    """The active loss weights as ``loss.kl=5, loss.ce=2, ...``."""
    return ", ".join(f"loss.{name}={getattr(config.loss, name):g}" for name in _TERM_CAUSES
                     if getattr(config.loss, name) > 0)


def optimiser_fault(parameter: str, train) -> str:
    eps32 = float(np.float32(train.adam_eps))
    return (f"the optimiser step made the student's weights non-finite ({parameter}) from finite gradients; check "
            f"train.adam_eps ({train.adam_eps:g}, {eps32:g} in float32) and train.lr ({train.lr:g})")


def non_finite_stop(run: RunDir, step: int, cause: object, start_removed: bool) -> NonFiniteError:
    """The error that ends a run at a non-finite step: the cause, and how to go on."""
    latest = run.latest_checkpoint()
    if start_removed:
        how = "nothing was kept; fix that value and start the run again"
    elif latest is not None:
        how = (f"nothing non-finite was checkpointed and {latest.name} is intact: fix that value in {run.config} and "
               f"continue with lmdistill distill --resume {run.root}")
    else:
        how = (f"no checkpoint was written yet: fix that value in {run.config} and lmdistill distill --resume "
               f"{run.root} starts the run again")
    return NonFiniteError(f"training stopped at step {step}: {cause}; {how}")


class ValidationWatch:
    """Warns when validation perplexity climbs an order of magnitude above its best so far:
    training is diverging (a learning rate too high, clipping off), and the run would
    otherwise end "done" with a useless student."""

    FACTOR = 10.0

    def __init__(self, config: RunConfig, rows: list[dict[str, Any]] = ()) -> None:
        self.train = config.train
        self.best, self.best_step = math.inf, 0
        self.warnings: list[str] = []
        for row in rows:
            if "val_ppl" in row:
                self.see(row["step"], row["val_ppl"], quiet=True)

    def see(self, step: int, ppl: float, quiet: bool = False) -> None:
        if ppl < self.best:
            self.best, self.best_step = ppl, step
        elif not ppl < self.FACTOR * self.best:  # NaN included
            fix = f"lower train.lr ({self.train.lr:g})"
            if self.train.max_grad_norm == 0:
                fix += " or turn gradient clipping back on (train.max_grad_norm, now 0)"
            warning = (f"validation perplexity {ppl:.4g} at step {step} is over {self.FACTOR:g}x its best "
                       f"({self.best:.4g} at step {self.best_step}): training is diverging; {fix}")
            self.warnings.append(warning)
            if not quiet:
                print(f"[lmdistill] warning: {warning}")


def non_finite_parameter(setup: Setup) -> str | None:
    """The name of a student parameter holding a NaN or an infinity (on any rank), or None."""
    found = next((name for name, param in setup.student.named_parameters()
                  if not torch.isfinite(dist.local_shard(param.detach())).all()), None)
    anywhere = dist.max_across({"bad": float(found is not None)}, setup.ranks, setup.device)["bad"] > 0
    if not anywhere:
        return None
    return found or "a parameter held by another process"


class _LogitsOnly(nn.Module):
    """The objective seen as a causal LM (``model(input_ids=...).logits``) for the perplexity code."""

    def __init__(self, objective: nn.Module, student: PreTrainedModel) -> None:
        super().__init__()
        self.objective = objective
        self.config = student.config
        self._embeddings = [student.get_input_embeddings()]  # a list: not registered twice

    def get_input_embeddings(self) -> nn.Module:
        return self._embeddings[0]

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        return SimpleNamespace(logits=self.objective(input_ids, logits_only=True))


def validate(setup: Setup, tokens: np.ndarray) -> dict[str, float]:
    """Student perplexity on the first ``train.eval_tokens`` validation tokens (disjoint windows).

    Under DDP the ranks share the batches of windows (the inner module runs, so no collective
    is involved in the forward passes) and sum their totals; under FSDP2 every rank computes
    all of it, since every rank must take part in each forward pass.
    """
    protocol = PerplexityProtocol(
        window=setup.config.data.block_size,
        max_tokens=min(len(tokens), setup.config.train.eval_tokens + 1),
        batch_size=setup.config.train.batch_size,
    )
    model = _LogitsOnly(dist.unwrap(setup.objective), setup.student)
    ranks = setup.ranks
    split = ranks.enabled and not dist.is_sharded(setup.objective)
    shard = (ranks.rank, ranks.world_size) if split else (0, 1)
    with setup.autocast_context():
        result = perplexity(model, tokens, protocol, device=setup.device, shard=shard)
    dist.reshard(setup.objective)
    totals = {"nll": result.nll_sum, "tokens": result.tokens_scored}
    if split:
        totals = dist.sum_across(totals, ranks, setup.device)
    val_loss = totals["nll"] / totals["tokens"]
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_tokens": int(totals["tokens"])}


# ---------------------------------------------------------------------------------------
# The run


SHARED_RUN_DIR = ("under torchrun every process reads RUN_DIR (only rank 0 writes it): on several nodes, put it on a "
                  "file system that all of them mount")


def check_run_dir(run: RunDir, config: RunConfig | None, resume: bool) -> None:
    """Refuse to mix two runs in one directory (checked before any model loads)."""
    if run.root.exists() and not run.root.is_dir():
        raise RunDirError(f"{run.root} is a file, not a run directory; choose another --out")
    if resume:
        if not run.config.is_file():
            hint = f" ({SHARED_RUN_DIR})" if dist.launched_by_torchrun() else ""
            raise RunDirError(f"{run.root} holds no run to resume (no config.yaml); start one with --out {run.root}{hint}")
        return
    assert config is not None
    if run.config.is_file():
        same = run.config.read_text() == config.to_yaml()
        what = "this run already" if same else "a different run"
        raise RunDirError(
            f"{run.root} holds {what}; continue it with `lmdistill distill --resume {run.root}` "
            f"or choose another --out"
        )
    if run.root.exists() and any(p != run.lock_file for p in run.root.iterdir()):
        raise RunDirError(f"{run.root} exists and is not empty; choose another --out")
    parent = nearest_existing(run.root)
    if not os.access(parent, os.W_OK):
        raise RunDirError(f"cannot write under {parent}; choose an --out you can write to")


@dataclass
class Progress:
    """The counters a checkpoint restores."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds spent in training steps


def run_training(config: RunConfig | None, out_dir: Path, resume: bool = False, stop_at_step: int | None = None,
                 progress: bool = True, setup: Setup | None = None) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) the run in ``out_dir``; returns a summary.

    ``config`` is None when resuming (the run's own config.yaml is used). ``stop_at_step``
    ends the run early after that step with a checkpoint, as Ctrl-C would. ``setup`` passes
    already-loaded models (new runs in one process only).

    Launched by torchrun, every process calls this: it joins the process group, trains its
    share of each batch, and rank 0 alone prints, logs and writes the run directory (the
    others wait for it at barriers); every rank reads the checkpoint on resume.
    """
    run = RunDir(Path(out_dir))
    ranks = dist.from_environment()
    if resume and setup is not None:
        raise ValueError("a resumed run loads its student from the checkpoint; do not pass setup")
    lock = RunLock(run) if ranks.is_main else None  # rank 0 alone writes the run directory
    made, done = None, Progress()
    new_start = False  # True once this process holds the folder, checked new or empty, for a new run
    with dist.quiet_unless_main(ranks):
        try:
            if lock is not None and (run.config.is_file() or run.lock_file.is_file()):
                lock.acquire()  # a live run in the folder is named before anything else is said of it
            check_run_dir(run, config, resume)
            if lock is not None and not lock.held:
                made = make_folder(run.root)
                lock.acquire()
                check_run_dir(run, config, resume)  # again: a run may have started and ended there meanwhile
            new_start = lock is not None and lock.held and not resume
            summary = _resume_or_train(run, config, resume, stop_at_step, progress, setup, ranks, done)
        except BaseException:
            if new_start and done.step == 0:  # a start that failed leaves nothing behind
                remove_failed_start(run, made)
            raise
        finally:
            if lock is not None:
                lock.release()
    return summary


def remove_failed_start(run: RunDir, made: Path | None) -> None:
    """Undo a new run that failed before its first step: the folders it created, or what it
    wrote into the (then empty) folder it was given."""
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for entry in run.root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def make_folder(path: Path) -> Path | None:
    """Create ``path`` and its missing parents; return the topmost folder created (None if none)."""
    existing = nearest_existing(path)
    top = None if existing == path else path.relative_to(existing).parts[0]
    path.mkdir(parents=True, exist_ok=True)
    return None if top is None else existing / top


def _resume_or_train(run: RunDir, config: RunConfig | None, resume: bool, stop_at_step: int | None, progress: bool,
                     setup: Setup | None, ranks: dist.DistInfo, done: Progress) -> dict[str, Any]:
    if resume:
        config = load_config(run.config)
        if (run.root / "summary.json").is_file():
            print(f"[lmdistill] {run.root} already finished; nothing to resume")
            return json.loads((run.root / "summary.json").read_text())
        if ranks.is_main:
            removed = remove_run_leftovers(run)
            if removed:
                print(f"[lmdistill] removed what an interrupted write left: {', '.join(removed)}")
    assert config is not None
    ranks, created = dist.init(config.train.device)
    if setup is not None and ranks.enabled:
        raise ValueError("setup can only be passed in a single process; under torchrun each rank builds its own")
    summary = _train(run, config, resume, stop_at_step, progress, setup, ranks, done)
    dist.shutdown(ranks, created)
    return summary


def _train(run: RunDir, config: RunConfig, resume: bool, stop_at_step: int | None, progress: bool,
           setup: Setup | None, ranks: dist.DistInfo, done: Progress) -> dict[str, Any]:
    checkpoint = resume_checkpoint(run) if resume else None
    if resume and checkpoint is None and (run.checkpoints).is_dir() and any(run.checkpoints.glob("step_*")):
        raise RunDirError(f"{run.checkpoints} holds no intact checkpoint; start a new run with another --out")
    if setup is None:
        setup = build_setup(config, student_init=checkpoint / "student" if checkpoint else None, ranks=ranks)
    if not resume and ranks.is_main:
        # Written only once the set-up succeeded, so a failed start leaves no half-made run.
        run.root.mkdir(parents=True, exist_ok=True)
        with writing(run.config, "config", run):
            write_text_atomic(run.config, config.to_yaml())
    dist.barrier(ranks)
    if not run.config.is_file():
        raise RunDirError(f"rank {ranks.rank} cannot see {run.config}, which rank 0 wrote; {SHARED_RUN_DIR}")
    if ranks.enabled:
        print(f"[lmdistill] {ranks.world_size} process(es), student {config.train.distributed}, teacher "
              f"{config.train.teacher_sharding if setup.teacher is not None else 'not used'}, device {setup.device.type}, "
              f"{'float32' if setup.autocast is None else str(setup.autocast).removeprefix('torch.') + ' autocast'}")

    optimizer = make_optimizer(config, setup.student)
    train_tokens, val_tokens = setup.data.tokens("train"), setup.data.tokens("validation")
    sampler = BlockSampler(len(train_tokens), config.data.block_size, config.train.batch_size, seed=config.train.seed,
                           rank=ranks.rank, world_size=ranks.world_size)
    tokens_per_step = sampler.tokens_per_batch * config.train.grad_accum * ranks.world_size  # all ranks
    budget = Budget.from_config(config.train.max_steps, config.train.max_tokens, config.train.max_minutes, tokens_per_step)
    warmup = budget.warmup_fraction(config.train.warmup)

    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        check_resume_world_size(state, config, ranks, tokens_per_step)
        dist.load_optimizer_state(optimizer, state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        if setup.scaler is not None and state.get("scaler"):
            setup.scaler.load_state_dict(state["scaler"])
        done.step, done.tokens_seen, done.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        restore_rng(state, ranks, config.train.seed, done.step)
        if ranks.is_main:
            truncate_metrics(run, done.step)
        print(f"[lmdistill] resuming {run.root} from step {done.step} ({done.tokens_seen:,} tokens)")
    else:
        if resume:
            if ranks.is_main:
                truncate_metrics(run, -1)
            print(f"[lmdistill] {run.root} has no checkpoint yet; starting it from the beginning")
        torch.manual_seed(config.train.seed + ranks.rank)  # rank 0 as one process; other ranks' dropout differs
        save_student(setup, run, run.student_init)
        row = {"step": 0, "tokens_seen": 0, **validate(setup, val_tokens)}
        if ranks.is_main:
            append_metrics(run, row)
        print(f"[lmdistill] step 0: validation perplexity {row['val_ppl']:.2f}")
    watch = ValidationWatch(config, read_metrics(run.metrics) if ranks.is_main else [])

    saved_step = done.step if checkpoint is not None else -1
    start_removed = lambda: not resume and done.step == 0  # noqa: E731  (run_training removes a failed start)

    def checkpoint_now() -> None:
        nonlocal saved_step
        if saved_step == done.step:
            return
        bad = non_finite_parameter(setup)  # never checkpoint a broken model
        if bad is not None:
            raise non_finite_stop(run, done.step, optimiser_fault(bad, config.train), start_removed())
        # Gathered from every rank (collectives), written by rank 0 in the one-process format.
        student_state = (dist.full_model_state(setup.objective, ranks, prefix="student.")
                         if dist.is_sharded(setup.objective) else None)
        optimizer_state = dist.full_optimizer_state(optimizer, ranks)
        rng_per_rank = dist.gather(rng_state(), ranks)
        if ranks.is_main:
            save_checkpoint(run, done.step, setup.student, setup.tokenizer, {
                "optimizer": optimizer_state, "sampler": sampler.state_dict(),
                "step": done.step, "tokens_seen": done.tokens_seen, "elapsed": done.elapsed,
                "world_size": ranks.world_size, "tokens_per_step": tokens_per_step, "rng_ranks": rng_per_rank,
                **({"scaler": setup.scaler.state_dict()} if setup.scaler is not None else {}),
            }, student_state=student_state)
        dist.barrier(ranks)
        saved_step = done.step

    bar = tqdm(total=budget.estimated_total_steps(done.step, done.elapsed), initial=done.step,
               disable=not progress or not ranks.is_main, unit="step", dynamic_ncols=True)
    stopped_early = False
    with GracefulStop() as stop_request, bar:  # the bar closes (ends its line) on errors too
        while not budget.done(done.step, done.elapsed):
            started = time.perf_counter()
            lr = config.train.lr * lr_factor(budget.progress_after(done.step, done.elapsed), warmup,
                                             config.train.schedule, config.train.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [next_micro_batch(setup, sampler, train_tokens) for _ in range(config.train.grad_accum)]
            try:
                metrics = train_step(setup, optimizer, batches)
            except NonFiniteError as err:
                raise non_finite_stop(run, done.step + 1, err, start_removed()) from None
            # Every rank takes the same decisions: the slowest rank's time drives the time
            # budget and the schedule, and a stop asked of any rank stops all of them.
            agreed = dist.max_across({"seconds": time.perf_counter() - started,
                                      "stop": float(stop_request.requested)}, ranks, setup.device)
            seconds, stop_requested = agreed["seconds"], agreed["stop"] > 0
            done.step += 1
            done.tokens_seen += int(metrics.pop("tokens"))
            done.elapsed += seconds
            if ranks.is_main:
                append_metrics(run, {
                    "step": done.step, "tokens_seen": done.tokens_seen, "lr": lr,
                    **{k: float(f"{v:.7g}") for k, v in metrics.items()},  # 7 significant digits
                    "tokens_per_s": round(tokens_per_step / seconds, 1), "elapsed_s": round(done.elapsed, 2),
                })
            bar.total = budget.estimated_total_steps(done.step, done.elapsed)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_step / seconds:.0f}")
            if budget.done(done.step, done.elapsed):
                break
            if config.train.eval_every and done.step % config.train.eval_every == 0:
                val = {"step": done.step, "tokens_seen": done.tokens_seen, **validate(setup, val_tokens)}
                if ranks.is_main:
                    append_metrics(run, val)
                    bar.write(f"[lmdistill] step {done.step}: validation perplexity {val['val_ppl']:.2f}")
                watch.see(done.step, val["val_ppl"])
            if config.train.checkpoint_every and done.step % config.train.checkpoint_every == 0:
                checkpoint_now()
            if stop_requested or (stop_at_step is not None and done.step >= stop_at_step):
                checkpoint_now()
                stopped_early = True
                break
    if stopped_early:
        print(f"[lmdistill] stopped at step {done.step}; checkpoint written. "
              f"Continue with: lmdistill distill --resume {run.root}"
              + (" (under torchrun, with the same launch command)" if ranks.enabled else ""))
        return {"run_dir": str(run.root), "step": done.step, "tokens_seen": done.tokens_seen, "finished": False}
    return finish_run(run, setup, val_tokens, done, checkpoint_now, watch)


def save_student(setup: Setup, run: RunDir, out_dir: Path) -> None:
    """The student as an HF folder, written by rank 0 (its full weights gathered first when
    FSDP2 shards it: every rank must call this)."""
    ranks = setup.ranks
    state = dist.full_model_state(setup.objective, ranks, prefix="student.") if dist.is_sharded(setup.objective) else None
    if ranks.is_main:
        with writing(out_dir, "student", run):
            save_model(setup.student, setup.tokenizer, out_dir, state_dict=state)
    dist.barrier(ranks)


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


def finish_run(run: RunDir, setup: Setup, val_tokens: np.ndarray, done: Progress, checkpoint_now,
               watch: ValidationWatch) -> dict[str, Any]:
    """Final validation, checkpoint, student folder and ``summary.json`` (written last)."""
    ranks = setup.ranks
    final_val = {"step": done.step, "tokens_seen": done.tokens_seen, **validate(setup, val_tokens)}
    if ranks.is_main:
        append_metrics(run, final_val)
    watch.see(done.step, final_val["val_ppl"])
    checkpoint_now()
    save_student(setup, run, run.student)
    summary = {
        "run_dir": str(run.root), "step": done.step, "tokens_seen": done.tokens_seen, "finished": True,
        "train_seconds": round(done.elapsed, 1), "val_ppl": final_val["val_ppl"],
        "student_parameters": count_parameters(setup.student),
    }
    if ranks.enabled:
        summary["world_size"] = ranks.world_size
    if watch.warnings:
        summary["warnings"] = watch.warnings
    if ranks.is_main:
        with writing(run.root / "summary.json", "summary", run):
            write_text_atomic(run.root / "summary.json", json.dumps(summary, indent=2) + "\n")
    dist.barrier(ranks)
    print(f"[lmdistill] done: {done.step} steps, {done.tokens_seen:,} tokens, validation perplexity "
          f"{final_val['val_ppl']:.2f}{' (diverged: see the warning above)' if watch.warnings else ''}; student saved "
          f"to {run.student}")
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

"""Typed run configuration: one source for YAML recipes, CLI overrides and the Python API.

A recipe is a YAML file with the sections below; any field can be overridden on the command
line as ``section.field=value`` (``train.max_steps=200``). Every value is checked in
``__post_init__`` so a bad recipe fails before a model is loaded.
"""

from __future__ import annotations

import math
import numbers
import re
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, get_type_hints

import yaml

from .config_values import build_section, coerce_value
from .errors import ConfigError


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config value {name}: {message}")


# Training computes in float32: master weights, optimizer state and the loss terms stay float32
# even under bf16/fp16 autocast (which lowers only the matmuls). A float setting that float32
# rounds to 0 or to infinity silently switches something off or makes NaN (train.adam_eps=1e-300
# is 0 in float32, so Adam divides 0 by 0 where a gradient is 0), and one below float32's
# smallest normal number is a subnormal that some hardware flushes to 0. So every positive float
# setting must lie in float32's normal range.
FLOAT32_TINY = 2.0**-126  # smallest normal float32, about 1.18e-38
FLOAT32_MAX = (2 - 2.0**-23) * 2.0**127  # about 3.40e38


def _check_float32(value: float, name: str, example: str, zero: str | None = None) -> None:
    """A positive float setting float32 keeps as it is; ``zero`` says what 0 means where 0 is allowed."""
    if value == 0 and zero is not None:
        return
    if FLOAT32_TINY <= value <= FLOAT32_MAX:
        return
    fate = "0" if value < FLOAT32_TINY else "infinity"
    off = f", or 0 {zero}" if zero is not None else ""
    raise ConfigError(f"config value {name}: {value:g} becomes {fate} in float32, the dtype training computes this "
                      f"in; use a value between 1.2e-38 and 3.4e38 such as {example}{off}")


def _float32(value: float) -> float:
    """``value`` rounded to float32 (for values within float32's range)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


# loss.temperature's bounds. The KL term is T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), computed
# in float32 (loss/terms.py, loss/fused.py).
# - Lower: below 2^-63 (about 1.1e-19) T^2 falls under float32's smallest normal number and the
#   term and its gradient round to 0 (T=1e-30 trains with a KL of exactly 0).
# - Upper: the KL of two distributions softened by T is about Var(z_t - z_s) / (2 T^2), while the
#   float32 rounding of each log-probability is about ln(vocabulary) * 2^-24 (~7e-7 for 50k
#   tokens); multiplied by T^2 that error grows as T^2. Measured against float64 on a
#   GPT-2-sized vocabulary: 0.2% at T=100, 8% at 1000, and pure noise (even negative) from 10^4
#   (tests/test_config.py checks the two ends). Distillation uses T of 1 to 10.
TEMPERATURE_MIN = 2.0**-63
TEMPERATURE_MAX = 100.0


# How a student's layers are chosen (model.strategy; lmdistill/student/ implements them). Static
# strategies need only the two depths; data strategies measure the teacher on calibration tokens;
# auto picks one for the teacher's family.
STATIC_STRATEGIES = ("every-other", "uniform", "first")
DATA_STRATEGIES = ("importance", "search")
LAYER_STRATEGIES = ("auto", *STATIC_STRATEGIES, *DATA_STRATEGIES)
SEARCH_OBJECTIVES = ("kl", "ce")

# The logit divergences (loss.divergence; lmdistill/loss/divergences.py implements them) and,
# for those that take one, their parameter and its default (range [0, 1]).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")
DIVERGENCE_PARAMS: dict[str, tuple[str, float]] = {"jsd": ("beta", 0.5), "skew_kl": ("alpha", 0.1),
                                                   "skew_reverse_kl": ("alpha", 0.1)}


_PARAM_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


def parse_param_count(text: str) -> int | None:
    """``81.4M``, ``500K``, ``1.2B`` or ``81400000`` (underscores allowed) as a positive count; None if unreadable."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmb]?)", str(text).replace("_", "").strip().lower())
    if match is None:
        return None
    count = round(float(match[1]) * _PARAM_UNITS[match[2]])
    return count if count >= 1 else None


@dataclass
class ModelConfig:
    teacher: str = "gpt2"
    """Teacher MODEL: alias, .gguf file, HF folder or hub id."""
    student: str | None = None
    """A pretrained student (HF folder or hub id) sharing the teacher's tokenizer; if None the student is cut from the teacher."""
    layers: list[int] | None = None
    """Teacher layers the student keeps, in order (e.g. [0, 2, 4, 7, 9, 11]); None means use num_layers and strategy."""
    num_layers: int | None = None
    """Student depth when layers is None (default: half the teacher's)."""
    strategy: str = "auto"
    """Layer map when layers is None: auto (importance for Llama-family teachers, every-other otherwise), every-other, uniform, first, importance (largest block influence on training tokens) or search (greedy removal of the layer that costs least)."""
    calibration_tokens: int = 2048
    """Training tokens on which importance, search and width pruning measure the teacher (blocks spread over the training stream)."""
    search_objective: str = "kl"
    """What the search keeps low when it removes a layer: kl (to the teacher) or ce (on the calibration tokens)."""
    # Width pruning (lmdistill/student/width.py), applied after the depth cut; all None: the teacher's widths.
    intermediate_size: int | None = None
    """MLP neurons each student layer keeps (its own largest mean |activation| on the calibration tokens); None: the teacher's."""
    num_attention_heads: int | None = None
    """Query heads each student layer keeps (largest mean output norm), the same number in every key/value group; a multiple of num_key_value_heads; Llama family only. None: num_key_value_heads times the teacher's heads per group."""
    num_key_value_heads: int | None = None
    """Key/value groups each student layer keeps (largest summed head importance); None: the teacher's."""
    params: str | None = None
    """Target student size (e.g. 81.4M, 500K, 81400000): picks the largest intermediate_size whose student, at this depth and these heads, has at most this many parameters."""
    random_init: bool = False
    """Random student weights with the cut architecture, instead of copied teacher weights."""
    teacher_cache: str | None = None
    """Folder of stored teacher soft targets (lmdistill cache-teacher): the KL term reads them instead of running the teacher, whose weights then load only to cut a new student. Needs loss.divergence=forward_kl, loss.kl > 0, loss.cos/mse/align_cos/align_mse = 0, and the cache's block size, data, tokenizer and a temperature it holds."""
    # Teacher correction (Minitron, arXiv 2408.11796; lmdistill/train/correct.py).
    teacher_correction_tokens: int = 0
    """Fine-tune a copy of the teacher on this many training-split tokens (causal-LM loss) before distilling; the student is then cut from the corrected teacher, which also gives the soft targets. 0: off. Cached in the user cache by (teacher weights, training tokens, settings). Not with model.teacher_cache."""
    teacher_correction_lr: float = 1e-4
    """Peak learning rate of the teacher correction (AdamW, no weight decay, 5% warm-up then linear decay to 0, gradient norm clipped at 1, float32, batches of train.batch_size x data.block_size tokens seeded by train.seed)."""

    def __post_init__(self) -> None:
        _check(self.strategy in LAYER_STRATEGIES, "model.strategy",
               f"{self.strategy!r} is not one of {', '.join(LAYER_STRATEGIES)}")
        _check(self.calibration_tokens >= 8, "model.calibration_tokens", f"{self.calibration_tokens} must be at least 8")
        _check(self.search_objective in SEARCH_OBJECTIVES, "model.search_objective",
               f"{self.search_objective!r} is not one of {', '.join(SEARCH_OBJECTIVES)}")
        self._check_width()
        if self.layers is not None:
            _check(len(self.layers) > 0, "model.layers", "must list at least one teacher layer")
            _check(all(isinstance(i, int) and i >= 0 for i in self.layers), "model.layers", "must be non-negative integers")
        if self.num_layers is not None:
            _check(self.num_layers >= 1, "model.num_layers", f"{self.num_layers} must be at least 1")
        self._check_teacher_correction()

    def _check_teacher_correction(self) -> None:
        tokens, lr = self.teacher_correction_tokens, self.teacher_correction_lr
        _check(isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0,
               "model.teacher_correction_tokens", f"{tokens!r} must be a whole number >= 0 (0: no correction)")
        _check(math.isfinite(lr) and 0 < lr < 1, "model.teacher_correction_lr", f"{lr} must be in (0, 1), e.g. 1e-4")
        _check_float32(lr, "model.teacher_correction_lr", "1e-4")
        # A cache holds the targets of the teacher it was built from, and the corrected teacher
        # exists only once the data is prepared: build the cache from the corrected folder instead.
        _check(tokens == 0 or self.teacher_cache is None, "model.teacher_correction_tokens",
               "a teacher cache stores the targets of the uncorrected teacher; run once with the correction to get "
               "the corrected teacher's folder (printed), build the cache from it (lmdistill cache-teacher), then "
               "distill with model.teacher=THAT_FOLDER, model.teacher_cache=CACHE and model.teacher_correction_tokens=0")

    def _check_width(self) -> None:
        for name in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"model.{name}",
                   f"{value} must be at least 1 (or null for the teacher's)")
        if self.params is not None:
            _check(parse_param_count(self.params) is not None, "model.params",
                   f"cannot read {self.params!r} as a parameter count; give one such as 81.4M, 500K or 81400000")
            _check(self.intermediate_size is None, "model.params",
                   "picks model.intermediate_size itself; give one of model.params and model.intermediate_size")
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if heads is not None and kv is not None:
            _check(heads % kv == 0, "model.num_attention_heads",
                   f"{heads} is not a multiple of model.num_key_value_heads={kv} (every key/value group keeps the same "
                   f"number of query heads); choose a multiple of {kv}")

    @property
    def params_target(self) -> int | None:
        """model.params as a number of parameters."""
        return None if self.params is None else parse_param_count(self.params)

    @classmethod
    def read_field(cls, name: str, value: Any) -> Any:
        """``value`` (command-line text, or a list of them) as field ``name``, converted and checked
        as in a recipe's model section; ``init-student``'s options are these fields."""
        value = coerce_value(value, get_type_hints(cls)[name], f"model.{name}")
        cls(**{name: value})  # the section's checks; none of them depends on another field
        return value


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["corpus:all"])
    """Text sources for `lmdistill prepare` (corpus:NAME, local files, hf:NAME)."""
    prepared_dir: str | None = None
    """Where token shards live; default: a folder in the cache keyed by sources and tokenizer."""
    block_size: int = 256
    """Tokens per training sequence (at most the model's context length; DistilGPT2 used 1024)."""
    repeats: list[float] | None = None
    """Times each source's training blocks appear per epoch, one number per data.sources entry (a
    fraction draws that share afresh each epoch); default: every block once, a source weighing its size."""

    def __post_init__(self) -> None:
        _check(len(self.sources) > 0, "data.sources", "must name at least one source")
        if self.repeats is not None:
            _check(len(self.repeats) == len(self.sources), "data.repeats",
                   f"has {len(self.repeats)} numbers for {len(self.sources)} data.sources; give one per source")
            _check(all(math.isfinite(r) and r > 0 for r in self.repeats), "data.repeats",
                   f"{self.repeats}: every repeat must be a finite number > 0")
            _check(len(set(self.sources)) == len(self.sources), "data.repeats",
                   "needs each source listed once in data.sources")
        _check(8 <= self.block_size <= 1 << 20, "data.block_size", f"{self.block_size} must be between 8 and 1048576")


@dataclass
class LossConfig:
    kl: float = 5.0
    """Weight of the logit term: the divergence below between teacher and student on softened logits (times T^2)."""
    divergence: str = "forward_kl"
    """Logit divergence: forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl or tv (docs/divergences.md); metrics.jsonl logs the term under its name (forward_kl's as kl)."""
    jsd_beta: float | None = None
    """jsd only: weight of the teacher in the mixture, in [0, 1] (default 0.5; 0 = forward KL, 1 = reverse KL)."""
    skew_alpha: float | None = None
    """skew_kl and skew_reverse_kl only: skew in [0, 1] (default 0.1; 0 = plain KL)."""
    ce: float = 2.0
    """Weight of the causal-LM cross-entropy on the data."""
    cos: float = 1.0
    """Weight of the cosine loss between last hidden states."""
    mse: float = 0.0
    """Weight of the MSE loss between last hidden states."""
    temperature: float = 2.0
    """Softmax temperature for the KL term."""
    align_cos: float = 0.0
    """Weight of the cosine loss between each intermediate student layer and the teacher's stream its next layer reads (train/plan.aligned_layers)."""
    align_mse: float = 0.0
    """Weight of the MSE loss between each intermediate student layer and the teacher's stream its next layer reads (train/plan.aligned_layers)."""
    align_layers: list[int] | None = None
    """Student layers aligned by align_cos/align_mse (default: all but the last, whose output cos/mse cover)."""
    chunk_tokens: int = 256
    """Positions per chunk of the fused lm_head + KL/CE (no batch x seq x vocab logits are built); 0 builds the full logits. A bound on the loss's transient memory (a few chunk x vocab float32 tensors: about 50 MB each at a 50k vocabulary), not tied to the batch: 256 runs as fast as one chunk of 1,024 and saves 0.6 GiB of peak RSS at batch 4 x 256 (benchmarks/peers.py). Only forward_kl has the fused path; other divergences build full logits."""

    on_policy_fraction: float = 0.0
    """Share of optimiser steps trained on the student's own samples (GKD's lambda, Agarwal et al. 2024): each block keeps its first on_policy_prompt_tokens, the student samples the rest (KV cache, on_policy_temperature), and only the logit divergence on the sampled tokens counts on those steps (no CE or hidden-state terms: the student's samples are not ground truth). Which steps is seeded by (train.seed, step). 0: off."""
    on_policy_prompt_tokens: int = 64
    on_policy_temperature: float = 1.0

    WEIGHTS: ClassVar[tuple[str, ...]] = ("kl", "ce", "cos", "mse", "align_cos", "align_mse")
    """The weight fields, one per loss term (``kl`` weighs the logit term, whatever its divergence)."""

    def __post_init__(self) -> None:
        for name in (*self.WEIGHTS, "temperature"):
            value = getattr(self, name)
            _check(isinstance(value, numbers.Real) and not isinstance(value, bool), f"loss.{name}",
                   f"{value!r} is not a number; give a number such as 1.0")
        for name in self.WEIGHTS:
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"loss.{name}", f"{value} must be a finite number >= 0")
            _check_float32(value, f"loss.{name}", "1.0", zero="to leave the term out")
        _check(bool(self.active_terms()), "loss", f"at least one of {', '.join(self.WEIGHTS)} must be > 0")
        _check(self.chunk_tokens >= 0, "loss.chunk_tokens", f"{self.chunk_tokens} must be >= 0 (0: full logits)")
        _check(self.jsd_beta is None or self.divergence == "jsd", "loss.jsd_beta",
               f"applies to loss.divergence=jsd only (it is {self.divergence}); remove it")
        _check(self.skew_alpha is None or self.divergence in ("skew_kl", "skew_reverse_kl"), "loss.skew_alpha",
               f"applies to loss.divergence=skew_kl or skew_reverse_kl only (it is {self.divergence}); remove it")
        _check(self.divergence in DIVERGENCES, "loss.divergence",
               f"{self.divergence!r} is not one of {', '.join(DIVERGENCES)}")
        _check(0 <= self.on_policy_fraction <= 1, "loss.on_policy_fraction", f"{self.on_policy_fraction} must be in [0, 1]")
        _check(self.on_policy_prompt_tokens >= 1, "loss.on_policy_prompt_tokens", "must be at least 1")
        _check(math.isfinite(self.on_policy_temperature) and self.on_policy_temperature > 0,
               "loss.on_policy_temperature", f"{self.on_policy_temperature} must be a finite number > 0")
        for name in ("jsd_beta", "skew_alpha"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool)
                                     and 0.0 <= value <= 1.0), f"loss.{name}", f"{value!r} must be a number in [0, 1]")
        if self.align_layers is not None:
            _check(len(self.align_layers) > 0 and all(i >= 0 for i in self.align_layers), "loss.align_layers",
                   "must list student layer indices >= 0 (or be empty: null for the default)")
        _check(math.isfinite(self.temperature) and self.temperature > 0, "loss.temperature", f"{self.temperature} must be > 0")
        _check(TEMPERATURE_MIN <= self.temperature <= TEMPERATURE_MAX, "loss.temperature",
               f"{self.temperature:g} is outside [1.1e-19, {TEMPERATURE_MAX:g}]: the KL term (scaled by T^2) would "
               f"{'round to 0' if self.temperature < TEMPERATURE_MIN else 'be float32 rounding noise'}; "
               f"use a temperature such as 2 (DistilGPT2's)")
        _check(self.kl * self.temperature**2 <= FLOAT32_MAX, "loss.kl",
               f"loss.kl * loss.temperature^2 = {self.kl * self.temperature**2:g} overflows float32; lower loss.kl")

    def active_terms(self) -> list[str]:
        """The weight fields > 0, in the order of :attr:`WEIGHTS`."""
        return [name for name in self.WEIGHTS if getattr(self, name) > 0]

    @property
    def needs_hidden(self) -> bool:
        """Whether the last hidden states are compared (cos or mse)."""
        return self.cos > 0 or self.mse > 0

    @property
    def needs_layers(self) -> bool:
        """Whether intermediate layer outputs are aligned (align_cos or align_mse)."""
        return self.align_cos > 0 or self.align_mse > 0

    @property
    def needs_teacher(self) -> bool:
        """Whether any term reads the teacher (else causal-LM-only training)."""
        return self.kl > 0 or self.needs_hidden or self.needs_layers


DISTRIBUTED = ("ddp", "fsdp")
TEACHER_SHARDING = ("replicate", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


LOG_TO = ("jsonl", "tensorboard")


@dataclass
class TrainConfig:
    batch_size: int = 4
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimiser step; the loss is normalised by the tokens of the whole step."""
    lr: float = 2.5e-4
    """Peak learning rate (AdamW)."""
    adam_eps: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: float = 0.05
    """Warm-up length: a fraction of the total steps if < 1, else a number of steps."""
    schedule: str = "linear"
    """Decay after warm-up: linear, cosine or constant."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr."""
    max_grad_norm: float = 5.0
    """Gradient-norm clipping threshold (0 disables)."""
    freeze_pos_embeddings: bool = True
    """Keep learned position embeddings fixed (DistilGPT2 recipe); no effect for RoPE models."""
    freeze_embeddings: bool = False
    """Keep the token embeddings (and the LM head when tied to them) as the teacher's."""
    max_steps: int | None = None
    """Budget in optimiser steps."""
    max_tokens: int | None = None
    """Budget in training tokens (converted to steps)."""
    max_minutes: float | None = None
    """Budget in minutes of training steps (validation and checkpoints not counted); the schedule follows the time used."""
    eval_every: int = 50
    """Validate every N steps (0: only at the end)."""
    eval_tokens: int = 8192
    """Validation tokens per evaluation (from the start of the validation split)."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    seed: int = 0
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    distributed: str = "ddp"
    """Under torchrun: ddp (the student replicated on every process, gradients averaged) or fsdp (FSDP2 fully_shard: parameters, gradients and optimizer state sharded per decoder layer, for students too big to replicate). No effect in a single process (docs/distributed.md)."""
    teacher_sharding: str = "replicate"
    """Under torchrun: replicate (a full inference-only teacher on every process) or fsdp (its decoder layers sharded with FSDP2 and gathered one at a time for the forward pass; embeddings, final norm and lm_head stay replicated)."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA devices that support it, else float32), fp32, bf16 or fp16 (autocast with a gradient scaler). Master weights and optimizer state stay float32. On the CPU, bf16 is for CPUs that compute it natively (AVX512-BF16 or AMX; about twice the float32 step rate) and fp16 is refused; auto stays float32."""
    tf32: bool = True
    """Allow TF32 for float32 matmuls and convolutions on CUDA (no effect on the CPU)."""
    compile: bool = False
    """torch.compile each decoder layer of the student and the teacher (in place; compile time is spent in the first steps)."""
    activation_checkpointing: bool = False
    """Recompute each student decoder layer's activations in the backward pass instead of storing them (less memory, about a third more compute)."""
    dropout: float | None = None
    """The student's dropout rate while it trains (dropout modules and attention dropout); None: its config's. With 0, attention on a CPU runs its fused kernel (dropout makes it store every attention matrix)."""
    log_to: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where the metrics go: jsonl (RUN/metrics.jsonl, which resume and the report read: always on) and tensorboard (RUN/tensorboard/, event files with the same scalars and the config; needs the tensorboard package)."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "train.batch_size", "must be at least 1")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be at least 1")
        _check(math.isfinite(self.lr) and 0 < self.lr < 1, "train.lr", f"{self.lr} must be in (0, 1)")
        _check_float32(self.lr, "train.lr", "2.5e-4")
        _check(math.isfinite(self.adam_eps) and self.adam_eps > 0, "train.adam_eps", f"{self.adam_eps} must be a finite number > 0")
        _check_float32(self.adam_eps, "train.adam_eps", "1e-6")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "train.weight_decay", f"{self.weight_decay} must be a finite number >= 0")
        _check_float32(self.weight_decay, "train.weight_decay", "0.01", zero="for no weight decay")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", "must be two numbers in [0, 1)")
        # Adam divides by 1 - beta^step; a beta that float32 rounds up to 1 makes that 0.
        _check(all(_float32(b) < 1 for b in self.betas), "train.betas",
               f"{self.betas} holds a value float32 rounds to 1 (Adam's bias correction 1 - beta^step would be 0); "
               "use at most 0.99999, e.g. [0.9, 0.999]")
        _check(math.isfinite(self.warmup) and self.warmup >= 0, "train.warmup", f"{self.warmup} must be a finite number >= 0")
        _check(self.schedule in ("linear", "cosine", "constant"), "train.schedule", f"{self.schedule!r} is not one of linear, cosine, constant")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
        _check_float32(self.max_grad_norm, "train.max_grad_norm", "1.0", zero="to disable clipping")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be at least 1")
        _check(self.max_tokens is None or self.max_tokens >= 1, "train.max_tokens", "must be at least 1")
        _check(self.max_minutes is None or (math.isfinite(self.max_minutes) and self.max_minutes > 0), "train.max_minutes", "must be a finite number > 0")
        _check(any(v is not None for v in (self.max_steps, self.max_tokens, self.max_minutes)), "train",
               "set a budget: max_steps, max_tokens or max_minutes")
        _check(
            self.warmup < 1 or self.max_steps is not None or self.max_tokens is not None, "train.warmup",
            "with only a time budget (max_minutes) give warm-up as a fraction of the budget, e.g. 0.05",
        )
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _check(self.eval_tokens >= 1, "train.eval_tokens", "must be at least 1")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        _check(self.threads is None or self.threads >= 1, "train.threads", "must be at least 1")
        _check(self.dropout is None or 0 <= self.dropout < 1, "train.dropout", f"{self.dropout} must be in [0, 1), or null for the student's own")
        _check(self.seed >= 0, "train.seed", f"{self.seed} must be >= 0")
        _check(
            self.device in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", self.device) is not None,
            "train.device", f"{self.device!r} is not one of auto, cpu, cuda, cuda:N, mps",
        )
        _check(self.distributed in DISTRIBUTED, "train.distributed",
               f"{self.distributed!r} is not one of {', '.join(DISTRIBUTED)}")
        _check(self.teacher_sharding in TEACHER_SHARDING, "train.teacher_sharding",
               f"{self.teacher_sharding!r} is not one of {', '.join(TEACHER_SHARDING)}")
        _check(self.precision in PRECISIONS, "train.precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        _check(set(self.log_to) <= set(LOG_TO) and "jsonl" in self.log_to, "train.log_to",
               f"{self.log_to} must list jsonl (resume and the report read metrics.jsonl) and may add tensorboard, "
               "e.g. [jsonl, tensorboard]")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))

    def __post_init__(self) -> None:
        check_teacher_cache_settings(self)
        # Here, not in LossConfig: the objective derives loss configs without the logit term.
        _check(self.loss.on_policy_fraction == 0 or self.loss.kl > 0, "loss.on_policy_fraction",
               "on-policy steps train the logit divergence alone, so loss.kl must be > 0")
        _check(self.loss.on_policy_fraction == 0 or self.model.teacher_cache is None, "loss.on_policy_fraction",
               "the student's samples need the live teacher to score them; set model.teacher_cache=null or "
               "loss.on_policy_fraction=0")
        _check(self.loss.on_policy_fraction == 0 or self.loss.on_policy_prompt_tokens < self.data.block_size,
               "loss.on_policy_prompt_tokens", f"{self.loss.on_policy_prompt_tokens} leaves nothing to sample in "
               f"blocks of {self.data.block_size} tokens; use fewer than data.block_size")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; valid sections: model, data, loss, train")
        sections = {}
        for f in fields(cls):
            section_cls = get_type_hints(cls)[f.name]
            sections[f.name] = build_section(section_cls, data.get(f.name) or {}, f.name)
        return cls(**sections)


def check_teacher_cache_settings(config: RunConfig) -> None:
    """Loss settings a teacher cache cannot serve (it holds top-k logits, no hidden states)."""
    if config.model.teacher_cache is None:
        return
    loss = config.loss
    hidden = [f"loss.{name}" for name in ("cos", "mse", "align_cos", "align_mse") if getattr(loss, name) > 0]
    _check(not hidden, "model.teacher_cache",
           f"a teacher cache stores logits, not hidden states, so {', '.join(hidden)} cannot be computed from it; "
           f"set {', '.join(f'{name}=0' for name in hidden)}, or train with the live teacher (model.teacher_cache=null)")
    _check(loss.divergence == "forward_kl", "model.teacher_cache",
           f"the stored top-k logits and tail samples give the forward KL only, not loss.divergence="
           f"{loss.divergence}; set loss.divergence=forward_kl, or train with the live teacher")
    _check(loss.kl > 0, "model.teacher_cache",
           "loss.kl is 0, so the cache would never be read; set loss.kl > 0 or model.teacher_cache=null")

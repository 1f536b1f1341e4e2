"""Width pruning: fewer MLP neurons and attention heads per layer, ranked by activation importance.

Minitron-style (Muralidharan et al. 2024, arXiv 2407.14679) importance, measured on the teacher
with forward pre-hooks over calibration tokens:

- an MLP neuron scores the mean |activation| of the MLP's hidden activation, the input of its
  output projection (Llama: ``act_fn(gate_proj(x)) * up_proj(x)``, the input of ``down_proj``;
  GPT-2: ``act(c_fc(x))``, the input of ``c_proj``);
- an attention head scores the mean L2 norm of its output, the input of ``o_proj`` split by head.

The pruned student is a model of the same class with a smaller config (one ``intermediate_size``
for every layer, each layer keeping its own top neurons). Heads are pruned GQA-aware: every
key/value group keeps the same number of query heads (ranked within the group), and whole groups
are dropped by the sum of their heads' scores, so ``num_attention_heads`` stays a multiple of
``num_key_value_heads``; ``head_dim`` is written explicitly because transformers would otherwise
derive it from ``hidden_size // num_attention_heads``. Hidden (embedding) channels are not pruned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..config import ConfigError, ModelConfig
from ..models.arch import ARCHITECTURES, architecture_of, count_parameters, decoder_layers
from ..models.errors import ModelError
from .build import cut_per_layer_fields
from .importance import calibration_blocks, forward_blocks


@dataclass(frozen=True)
class WidthLayout:
    """Where a decoder layer's prunable parts live, as attribute paths inside the layer."""

    mlp_in: tuple[str, ...]
    """The projections whose outputs are the MLP's neurons."""
    mlp_out: str
    """The projection that reads them: its input is the hidden activation that is measured."""
    size_key: str
    """The config field holding the MLP width."""
    attention: str | None
    """The attention module with q_proj, k_proj, v_proj and o_proj; None: its heads cannot be pruned."""
    no_heads: str = ""
    """Why heads cannot be pruned, for the error."""


_LLAMA = WidthLayout(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size", "self_attn")
_DERIVED = ("derives each head's size from {hidden} / {heads}, so a normal {name} folder with fewer heads would have "
            "wider heads, not fewer; keep its heads and prune its MLP with model.intermediate_size "
            "(--intermediate-size, written as {size})")
WIDTH_LAYOUTS: dict[str, WidthLayout] = {
    "gpt2": WidthLayout(("mlp.c_fc",), "mlp.c_proj", "n_inner", None,
                        _DERIVED.format(hidden="n_embd", heads="n_head", name="GPT-2", size="n_inner")),
    "gpt_neo": WidthLayout(("mlp.c_fc",), "mlp.c_proj", "intermediate_size", None,
                           _DERIVED.format(hidden="hidden_size", heads="num_heads", name="GPT-Neo",
                                           size="intermediate_size")),
    **{model_type: _LLAMA for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma")},
}


@dataclass(frozen=True)
class WidthShape:
    """The per-layer widths of a model: MLP neurons, query heads, key/value heads, head size."""

    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> WidthShape:
        layout = width_layout(config)
        heads = config.num_attention_heads
        return cls(intermediate_size=getattr(config, layout.size_key, None) or 4 * config.hidden_size,
                   num_attention_heads=heads,
                   num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)

    def to_dict(self) -> dict:
        return {"intermediate_size": self.intermediate_size, "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim}


def width_layout(config) -> WidthLayout:
    model_type = getattr(config, "model_type", "?")
    if model_type not in WIDTH_LAYOUTS:
        raise ModelError(f"width pruning (model.intermediate_size, model.num_attention_heads, "
                         f"model.num_key_value_heads) does not know model type {model_type!r}; it supports "
                         f"{', '.join(WIDTH_LAYOUTS)}. Cut this teacher by depth only, or add a WidthLayout for it "
                         f"in lmdistill/student/width.py")
    return WIDTH_LAYOUTS[model_type]


def width_requested(model: ModelConfig) -> bool:
    return any(value is not None for value in (model.intermediate_size, model.num_attention_heads,
                                                model.num_key_value_heads, model.params))


def resolve_width(teacher_config, model: ModelConfig, depth: int) -> WidthShape | None:
    """The widths that ``model`` asks for in a student of ``depth`` layers, checked against the
    teacher's config (no weights needed); None when no width is asked for. With ``model.params``
    the intermediate size is the largest that keeps the student within that many parameters."""
    if not width_requested(model):
        return None
    shape = _requested_shape(teacher_config, model)
    return shape if model.params is None else fit_intermediate_size(teacher_config, depth, shape, model.params_target)


def _requested_shape(teacher_config, model: ModelConfig) -> WidthShape:
    layout = width_layout(teacher_config)
    teacher = WidthShape.of(teacher_config)
    if layout.attention is None and (model.num_attention_heads, model.num_key_value_heads) != (None, None):
        raise ModelError(f"model.num_attention_heads / model.num_key_value_heads: {teacher_config.model_type} "
                         f"{layout.no_heads}")
    neurons = model.intermediate_size or teacher.intermediate_size
    _check_at_most(neurons, teacher.intermediate_size, "intermediate_size", "MLP neurons per layer")
    kv = model.num_key_value_heads or teacher.num_key_value_heads
    _check_at_most(kv, teacher.num_key_value_heads, "num_key_value_heads", "key/value heads")
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    heads = model.num_attention_heads or kv * group
    _check_at_most(heads, teacher.num_attention_heads, "num_attention_heads", "attention heads")
    if heads % kv or heads // kv > group:
        raise ConfigError(
            f"config value model.num_attention_heads (--num-attention-heads): {heads} query heads cannot share "
            f"{kv} key/value heads evenly with at most the teacher's {group} per group; choose a multiple of {kv} "
            f"up to {kv * group} (or change model.num_key_value_heads)")
    return WidthShape(neurons, heads, kv, teacher.head_dim)


def student_parameters(teacher_config, depth: int, shape: WidthShape) -> int:
    """Parameters of a student of ``depth`` layers with ``shape``'s widths, counted without weights."""
    config = width_config(teacher_config, shape)
    setattr(config, ARCHITECTURES[config.model_type].num_layers_key, depth)
    cut_per_layer_fields(config, list(range(depth)))
    if hasattr(config, "quantization_config"):  # a GGUF teacher's config: the student is plain weights
        delattr(config, "quantization_config")
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        return count_parameters(AutoModelForCausalLM.from_config(config))


def fit_intermediate_size(teacher_config, depth: int, shape: WidthShape, target: int) -> WidthShape:
    """``shape`` with the largest intermediate size whose student has at most ``target`` parameters
    (the count grows linearly with the intermediate size)."""
    widest = WidthShape.of(teacher_config).intermediate_size
    smallest = student_parameters(teacher_config, depth, replace(shape, intermediate_size=1))
    largest = student_parameters(teacher_config, depth, replace(shape, intermediate_size=widest))
    if not smallest <= target <= largest:
        raise ConfigError(f"config value model.params (--params): {target:,} parameters is out of reach at {depth} "
                          f"layers of {shape.num_attention_heads} heads, which hold {smallest:,} (1 MLP neuron) to "
                          f"{largest:,} ({widest} neurons, the teacher's); ask for a size in that range or change "
                          f"model.num_layers")
    per_neuron = (largest - smallest) // max(widest - 1, 1)
    return replace(shape, intermediate_size=1 + (target - smallest) // per_neuron if per_neuron else widest)


def _check_at_most(value: int, teacher: int, field: str, what: str) -> None:
    if value > teacher:
        flag = "--" + field.replace("_", "-")
        raise ConfigError(f"config value model.{field} ({flag}): {value} is more than the teacher's {teacher} {what}; "
                          f"choose at most {teacher}")


@dataclass
class WidthImportance:
    """Per measured layer: mean |activation| per MLP neuron and mean output norm per attention head."""

    neurons: list[torch.Tensor]
    heads: list[torch.Tensor] | None
    tokens: int


@torch.no_grad()
def width_importance(model: PreTrainedModel, tokens: np.ndarray, layers: list[int], *, block_size: int = 256,
                     max_tokens: int = 4096, batch_size: int = 4) -> WidthImportance:
    """Neuron and head importance of decoder ``layers`` over ``max_tokens`` calibration tokens spread over ``tokens``
    (float64 sums; heads only where the family's heads can be pruned)."""
    layout = width_layout(model.config)
    head_dim = WidthShape.of(model.config).head_dim
    blocks = calibration_blocks(model, tokens, block_size, max_tokens, "width importance")
    decoder = decoder_layers(model)
    neurons: dict[int, torch.Tensor] = {}
    heads: dict[int, torch.Tensor] = {}

    def accumulate(store: dict[int, torch.Tensor], k: int, per_head: bool):
        def measure(module, args):
            x = args[0].detach().double()
            x = x.unflatten(-1, (-1, head_dim)).norm(dim=-1) if per_head else x.abs()
            total = x.flatten(0, -2).sum(dim=0).cpu()
            store[k] = store[k] + total if k in store else total
        return measure

    handles = []
    for k, index in enumerate(layers):
        layer = decoder[index]
        handles.append(layer.get_submodule(layout.mlp_out).register_forward_pre_hook(accumulate(neurons, k, False)))
        if layout.attention is not None:
            o_proj = layer.get_submodule(f"{layout.attention}.o_proj")
            handles.append(o_proj.register_forward_pre_hook(accumulate(heads, k, True)))
    forward_blocks(model, blocks, batch_size, handles)
    count = blocks.numel()
    return WidthImportance([neurons[k] / count for k in range(len(layers))],
                           [heads[k] / count for k in range(len(layers))] if heads else None, count)


def top_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` largest scores, in their original order (ties keep the lower index)."""
    return torch.argsort(-scores, stable=True)[:keep].sort().values


def select_heads(scores: torch.Tensor, num_kv_heads: int, keep_kv: int,
                 keep_per_group: int) -> tuple[list[int], list[int]]:
    """(query heads, key/value heads) kept: the ``keep_kv`` groups of largest summed score, and in each
    the ``keep_per_group`` query heads of largest score. Query head h reads key/value head
    ``h // group`` (transformers' repeat_kv), which the kept lists preserve."""
    groups = scores.view(num_kv_heads, -1)
    group = groups.shape[1]
    kept_groups = top_units(groups.sum(dim=1), keep_kv).tolist()
    queries = [g * group + j for g in kept_groups for j in top_units(groups[g], keep_per_group).tolist()]
    return queries, kept_groups


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def _slice(state: dict[str, torch.Tensor], name: str, module: torch.nn.Module, index: torch.Tensor,
           outputs: bool) -> None:
    """Keep ``index`` among the outputs (or inputs) of a linear layer (``nn.Linear`` stores weights as
    (out, in), GPT-2's ``Conv1D`` as (in, out)); an output projection's bias is per output, so kept."""
    conv = isinstance(module, Conv1D)
    dim = int(conv) if outputs else int(not conv)
    state[f"{name}.weight"] = state[f"{name}.weight"].index_select(dim, index)
    if outputs and getattr(module, "bias", None) is not None:
        state[f"{name}.bias"] = state[f"{name}.bias"].index_select(0, index)


@dataclass
class LayerWidth:
    """What one student layer kept."""

    teacher_layer: int
    neurons: torch.Tensor
    heads: list[int] | None
    kv_heads: list[int] | None
    mlp_importance_kept: float

    def to_dict(self) -> dict:
        return {"teacher_layer": self.teacher_layer, "mlp_importance_kept": round(self.mlp_importance_kept, 6),
                "heads": self.heads, "kv_heads": self.kv_heads}


def choose_width(importance: WidthImportance, layers: list[int], teacher: WidthShape,
                 shape: WidthShape) -> list[LayerWidth]:
    """Each layer's own top neurons and heads for the requested ``shape``."""
    heads_pruned = (shape.num_attention_heads, shape.num_key_value_heads) != (teacher.num_attention_heads,
                                                                             teacher.num_key_value_heads)
    chosen = []
    for k, teacher_layer in enumerate(layers):
        scores = importance.neurons[k]
        neurons = top_units(scores, shape.intermediate_size)
        heads = kv_heads = None
        if heads_pruned:
            heads, kv_heads = select_heads(importance.heads[k], teacher.num_key_value_heads, shape.num_key_value_heads,
                                           shape.num_attention_heads // shape.num_key_value_heads)
        kept = float(scores[neurons].sum() / scores.sum()) if scores.sum() > 0 else 1.0
        chosen.append(LayerWidth(teacher_layer, neurons, heads, kv_heads, kept))
    return chosen


def width_config(config, shape: WidthShape):
    """A copy of ``config`` with the widths of ``shape`` (head_dim explicit where heads can change)."""
    layout = width_layout(config)
    config = copy.deepcopy(config)
    setattr(config, layout.size_key, shape.intermediate_size)
    if layout.attention is not None:
        config.head_dim = shape.head_dim
        config.num_attention_heads = shape.num_attention_heads
        config.num_key_value_heads = shape.num_key_value_heads
    return config


def prune_width(model: PreTrainedModel, chosen: list[LayerWidth], shape: WidthShape) -> PreTrainedModel:
    """A model of ``model``'s class keeping, in decoder layer ``k``, what ``chosen[k]`` lists."""
    layout = width_layout(model.config)
    state = dict(model.state_dict())
    prefix = architecture_of(model).layers
    for k, (layer, keep) in enumerate(zip(decoder_layers(model), chosen, strict=True)):
        def cut(path: str, index: torch.Tensor, outputs: bool) -> None:
            _slice(state, f"{prefix}.{k}.{path}", layer.get_submodule(path), index, outputs)

        for path in layout.mlp_in:
            cut(path, keep.neurons, True)
        cut(layout.mlp_out, keep.neurons, False)
        if keep.heads is not None:
            queries, kv = _head_rows(keep.heads, shape.head_dim), _head_rows(keep.kv_heads, shape.head_dim)
            cut(f"{layout.attention}.q_proj", queries, True)
            cut(f"{layout.attention}.k_proj", kv, True)
            cut(f"{layout.attention}.v_proj", kv, True)
            cut(f"{layout.attention}.o_proj", queries, False)
    pruned = type(model)(width_config(model.config, shape)).to(dtype=next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=True)
    if getattr(pruned.config, "tie_word_embeddings", False):
        pruned.tie_weights()
    return pruned.eval()


def apply_width(teacher: PreTrainedModel, student: PreTrainedModel, layers: list[int], shape: WidthShape,
                calibration: Callable[[], np.ndarray], *, calibration_tokens: int, block_size: int,
                random_init: bool, seed: int, params_target: int | None,
                log: Callable[[str], None]) -> PreTrainedModel:
    """``student`` (cut from ``teacher``'s ``layers``) narrowed to ``shape``: its neurons and heads ranked
    on the teacher's kept layers over the calibration tokens, or fresh weights with ``random_init``.
    What was kept is recorded in the student's config as ``lmdistill_width_choice`` (with the
    ``model.params`` target that chose the shape, if any)."""
    teacher_shape = WidthShape.of(teacher.config)
    record = {"teacher": teacher_shape.to_dict(), "student": shape.to_dict()}
    if random_init:
        torch.manual_seed(seed)
        pruned = type(student)(width_config(student.config, shape)).to(dtype=next(student.parameters()).dtype).eval()
        record["random_init"] = True
    else:
        importance = width_importance(teacher, calibration(), layers, block_size=block_size,
                                      max_tokens=calibration_tokens)
        chosen = choose_width(importance, layers, teacher_shape, shape)
        pruned = prune_width(student, chosen, shape)
        record.update(calibration_tokens=importance.tokens, layers=[keep.to_dict() for keep in chosen])
        log(f"width: {format_shape(teacher_shape)} -> {format_shape(shape)} per layer, ranked on "
            f"{importance.tokens:,} calibration tokens; share of MLP activation kept per layer: "
            + ", ".join(f"{keep.teacher_layer}: {keep.mlp_importance_kept:.3f}" for keep in chosen))
    if params_target is not None:
        record.update(params_target=params_target, params=count_parameters(pruned))
        log(f"model.params {params_target:,}: {len(layers)} layers of {format_shape(shape)} hold "
            f"{record['params']:,} parameters")
    pruned.config.lmdistill_width_choice = record
    return pruned


def format_shape(shape: WidthShape) -> str:
    return (f"{shape.intermediate_size} MLP neurons, {shape.num_attention_heads} heads "
            f"({shape.num_key_value_heads} key/value) of {shape.head_dim}")

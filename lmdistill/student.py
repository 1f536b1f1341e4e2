"""Build a student from a teacher: same width, fewer layers, chosen teacher layers copied.

The student is a model of the teacher's own class whose config differs only in its layer
count; embeddings, position embeddings, final norm and lm_head are copied (tied where the
teacher ties) and decoder layer ``i`` of the student is a copy of teacher layer
``layer_map[i]``. The map is written into the student's ``config.json``
(``lmdistill_layer_map``) so later steps know which teacher layer each student layer came from.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .importance import most_influential
from .models.arch import ARCHITECTURES, architecture_of, decoder_layers
from .models.errors import ModelError

STRATEGIES = ("every-other", "uniform", "first")
# Strategies that need the teacher and calibration data, not just layer counts
# (lmdistill.layer_search.choose_layers runs them).
DATA_STRATEGIES = ("importance", "search")
ALL_STRATEGIES = STRATEGIES + DATA_STRATEGIES

# DistilGPT2 kept these layers of GPT-2's 12 (HF transformers-research-projects/distillation).
DISTILGPT2_MAP = [0, 2, 4, 7, 9, 11]


def layer_map(num_teacher_layers: int, num_student_layers: int, strategy: str = "every-other") -> list[int]:
    """Which teacher layers the student keeps, in order.

    - ``every-other``: 0, 2, 4, ... when the student has exactly half the depth (except
      12 → 6, which gives DistilGPT2's 0, 2, 4, 7, 9, 11); evenly spread like ``uniform``
      for any other depth.
    - ``uniform``: evenly spaced from the first to the last layer (both kept).
    - ``first``: the bottom N layers.
    """
    if strategy not in STRATEGIES:
        raise ModelError(f"unknown layer strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise ModelError(
            f"a student of {num_student_layers} layers cannot be cut from a teacher of {num_teacher_layers}; "
            f"choose between 1 and {num_teacher_layers}"
        )
    n, k = num_teacher_layers, num_student_layers
    if strategy == "first":
        return list(range(k))
    if strategy == "every-other":
        if (n, k) == (12, 6):
            return list(DISTILGPT2_MAP)
        if 2 * k == n:
            return list(range(0, n, 2))
    if k == 1:
        return [0]
    # Evenly spaced, first and last kept: round(i * (n-1) / (k-1)).
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def resolve_layer_map(num_teacher_layers: int, layers: list[int] | None = None, num_layers: int | None = None,
                      strategy: str = "every-other", influence: list[float] | None = None) -> list[int]:
    """The student's layer map from an explicit list, or a depth (default half) and a strategy.

    ``importance`` keeps the layers with the largest block influence and needs the teacher's
    scores (:func:`lmdistill.importance.block_influence`) as ``influence``.
    """
    if layers is not None:
        return validate_layer_map(layers, num_teacher_layers)
    depth = student_depth(num_teacher_layers, num_layers)
    if strategy == "importance":
        if influence is None or len(influence) != num_teacher_layers:
            raise ValueError("the importance strategy needs the block influence of every teacher layer "
                             "(lmdistill.importance.block_influence on calibration tokens)")
        layer_map(num_teacher_layers, depth, "first")  # the same range check as the other strategies
        return most_influential(influence, depth)
    return layer_map(num_teacher_layers, depth, strategy)


def resolve_strategy(strategy: str | None, teacher_config) -> str:
    """``auto`` (or None): the best measured strategy for the teacher's family.

    Llama-family teachers (SmolLM2, Llama, Mistral, Qwen...): ``importance``. On SmolLM2-135M
    it starts a 15-layer student orders of magnitude closer to the teacher than every other
    layer, for a few seconds of calibration (README, "Choosing the layers").
    Others (GPT-2, GPT-Neo): ``every-other``, DistilGPT2's published map.
    """
    if strategy not in (None, "auto"):
        return strategy
    family = ARCHITECTURES.get(getattr(teacher_config, "model_type", ""))
    return "importance" if family is not None and family.family == "llama" else "every-other"


def student_depth(num_teacher_layers: int, num_layers: int | None) -> int:
    """The student's depth: ``num_layers``, or half the teacher's by default."""
    return num_layers if num_layers is not None else max(1, num_teacher_layers // 2)


def check_layer_request(num_teacher_layers: int, layers: list[int] | None, num_layers: int | None,
                        strategy: str) -> None:
    """Range checks of a layer request for any strategy, from the teacher's depth alone."""
    if strategy not in ALL_STRATEGIES:
        raise ModelError(f"unknown layer strategy {strategy!r}; choose one of {', '.join(ALL_STRATEGIES)}")
    static = "first" if strategy in DATA_STRATEGIES else strategy
    resolve_layer_map(num_teacher_layers, layers, num_layers, static)


def validate_layer_map(layers: list[int], num_teacher_layers: int) -> list[int]:
    """Check an explicit layer map against the teacher; errors name the valid range."""
    if not layers:
        raise ModelError("the layer map is empty; pass at least one teacher layer, e.g. --layers 0,2,4")
    bad = [i for i in layers if not 0 <= i < num_teacher_layers]
    if bad:
        raise ModelError(
            f"layer index {bad[0]} is out of range: the teacher has {num_teacher_layers} layers "
            f"(valid indices 0..{num_teacher_layers - 1})"
        )
    if len(set(layers)) != len(layers):
        raise ModelError(f"the layer map {layers} repeats a layer; list each teacher layer once")
    if list(layers) != sorted(layers):
        raise ModelError(f"the layer map {layers} is not in increasing order; keep the teacher's order")
    return list(layers)


def build_student(teacher: PreTrainedModel, layers: list[int], random_init: bool = False, seed: int = 0) -> PreTrainedModel:
    """A student of the teacher's class with ``len(layers)`` decoder layers.

    With ``random_init`` the student keeps the cut architecture but gets fresh weights
    (the model's own initialiser, seeded).
    """
    arch = architecture_of(teacher)
    num_teacher = len(decoder_layers(teacher))
    layers = validate_layer_map(layers, num_teacher)
    config = copy.deepcopy(teacher.config)
    if hasattr(config, "quantization_config"):
        # A teacher read from a GGUF file is dequantised in memory; its student is plain weights.
        delattr(config, "quantization_config")
    setattr(config, arch.num_layers_key, len(layers))
    _cut_per_layer_fields(config, layers)
    config.lmdistill_layer_map = None if random_init else list(layers)
    config.lmdistill_teacher_layers = num_teacher
    torch.manual_seed(seed)
    student = type(teacher)(config).to(dtype=next(teacher.parameters()).dtype)
    if random_init:
        return student.eval()

    teacher_state = teacher.state_dict()
    layers_prefix = arch.layers + "."
    new_state = {}
    for name in student.state_dict():
        if name.startswith(layers_prefix):
            index, rest = name[len(layers_prefix):].split(".", 1)
            source = f"{layers_prefix}{layers[int(index)]}.{rest}"
        else:
            source = name
        if source not in teacher_state:
            raise ModelError(f"student tensor {name} has no counterpart {source} in the teacher; report this model type")
        new_state[name] = teacher_state[source]  # load_state_dict copies
    student.load_state_dict(new_state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    return student.eval()


def _cut_per_layer_fields(config, layers: list[int]) -> None:
    # Some configs describe each layer (GPT-Neo's attention_types, Qwen's layer_types);
    # they must follow the layer map or the student would get the wrong attention kind.
    if hasattr(config, "attention_layers") and isinstance(config.attention_layers, list):
        config.attention_layers = [config.attention_layers[i] for i in layers]
        if hasattr(config, "attention_types"):
            config.attention_types = [[[kind], 1] for kind in config.attention_layers]
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]


def student_layer_map(student: PreTrainedModel) -> list[int] | None:
    """The teacher layers a student was cut from, as recorded in its config."""
    return getattr(student.config, "lmdistill_layer_map", None)


def check_shared_vocabulary(teacher: PreTrainedModel, student: PreTrainedModel,
                            teacher_tokenizer: PreTrainedTokenizerBase | None = None,
                            student_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Refuse a teacher/student pair whose logits do not index the same tokens."""
    t_vocab = teacher.get_output_embeddings().weight.shape[0]
    s_vocab = student.get_output_embeddings().weight.shape[0]
    if t_vocab != s_vocab:
        raise ModelError(
            f"teacher and student vocabularies differ ({t_vocab} vs {s_vocab} output tokens): logit "
            f"distillation needs the same tokenizer. Use a student built from this teacher "
            f"(lmdistill init-student) or a pretrained student that shares its tokenizer."
        )
    if teacher_tokenizer is not None and student_tokenizer is not None:
        if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise ModelError(
                "teacher and student tokenizers map tokens to different ids: logit distillation needs "
                "the same tokenizer. Pick a student that was trained with the teacher's tokenizer."
            )

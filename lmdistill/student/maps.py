"""Layer maps: which teacher layers a student keeps, from the two depths and a strategy.

The strategies are listed once, in :mod:`lmdistill.config` (``model.strategy``). The static
ones (``every-other``, ``uniform``, ``first``) are computed here from the depths alone; the
data ones (``importance``, ``search``) measure the teacher on calibration tokens
(:func:`lmdistill.student.cut.choose_layers`); ``auto`` picks one for the teacher's family.
"""

from __future__ import annotations

from ..config import DATA_STRATEGIES, STATIC_STRATEGIES
from ..models.arch import ARCHITECTURES
from ..models.errors import ModelError

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
    if strategy not in STATIC_STRATEGIES:
        raise ModelError(f"unknown layer strategy {strategy!r}; choose one of {', '.join(STATIC_STRATEGIES)}")
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
                      strategy: str = "every-other") -> list[int]:
    """The student's layer map from an explicit list, or a depth (default half) and a static strategy."""
    if layers is not None:
        return validate_layer_map(layers, num_teacher_layers)
    return layer_map(num_teacher_layers, student_depth(num_teacher_layers, num_layers), strategy)


def resolve_strategy(strategy: str | None, teacher_config) -> str:
    """``auto`` (or None): the best measured strategy for the teacher's family.

    Llama-family teachers (SmolLM2, Llama, Mistral, Qwen...): ``importance``. On SmolLM2-135M
    it starts a 15-layer student orders of magnitude closer to the teacher than every other
    layer, for a few seconds of calibration (README, "Choosing the student's shape and recipe").
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
    """Range checks of a layer request for any resolved strategy, from the teacher's depth alone."""
    known = STATIC_STRATEGIES + DATA_STRATEGIES
    if strategy not in known:
        raise ModelError(f"unknown layer strategy {strategy!r}; choose one of {', '.join(known)}")
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

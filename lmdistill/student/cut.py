"""Cut a student from a teacher: resolve the strategy, choose the layers, copy them.

:func:`cut_student` is the one cut that ``lmdistill distill`` (calibrating on its training
tokens) and ``lmdistill init-student`` (on ``--calibration`` text) both run. A static strategy
maps the depths; a data strategy (:func:`choose_layers`) measures the teacher on calibration
tokens, and its record (:class:`LayerChoice`) is saved in the student's ``config.json`` as
``lmdistill_layer_choice``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
from transformers import PreTrainedModel

from ..config import DATA_STRATEGIES, ModelConfig
from ..models.arch import decoder_layers
from .build import build_student
from .importance import block_influence, most_influential
from .maps import layer_map, resolve_layer_map, resolve_strategy, student_depth
from .search import CutScore, SearchResult, SearchStep, format_cut_table, greedy_search, make_calibration, score_cut
from .width import apply_width, resolve_width

# Calibration blocks are at most this many tokens (distill's are its data.block_size when shorter).
CALIBRATION_BLOCK_SIZE = 256


@dataclass
class StudentCut:
    """A student cut from a teacher, and how its layers were chosen."""

    student: PreTrainedModel
    layers: list[int]
    """The teacher layers kept (the student's weights are fresh with ``model.random_init``)."""
    strategy: str
    """The strategy, ``auto`` resolved for the teacher."""
    choice: LayerChoice | None
    """What a data strategy measured; None for an explicit or static map."""


def cut_student(teacher: PreTrainedModel, model: ModelConfig, calibration: Callable[[], np.ndarray], *,
                block_size: int, seed: int, log: Callable[[str], None]) -> StudentCut:
    """The student ``model`` asks for (``layers``, or ``num_layers`` and ``strategy``; the widths;
    ``random_init``).

    ``calibration`` gives the calibration tokens, and is called (once) only when a data strategy or
    width pruning measures the teacher on them, in blocks of ``block_size``; ``seed`` seeds a
    random initialisation; ``log`` gets what the measurements print.
    """
    num_teacher = len(decoder_layers(teacher))
    strategy = resolve_strategy(model.strategy, teacher.config)
    depth = len(model.layers) if model.layers is not None else student_depth(num_teacher, model.num_layers)
    width = resolve_width(teacher.config, model, depth)  # checked before anything is measured
    calibration = functools.cache(calibration)
    choice = None
    if strategy in DATA_STRATEGIES and model.layers is None:
        choice = choose_layers(teacher, calibration(), depth, strategy,
                               calibration_tokens=model.calibration_tokens, objective=model.search_objective,
                               block_size=block_size, log=log)
        layers = choice.layers
    else:
        layers = resolve_layer_map(num_teacher, model.layers, model.num_layers, strategy)
    student = build_student(teacher, layers, random_init=model.random_init, seed=seed)
    if width is not None:
        student = apply_width(teacher, student, layers, width, calibration, calibration_tokens=model.calibration_tokens,
                              block_size=block_size, random_init=model.random_init, seed=seed,
                              params_target=model.params_target, log=log)
    if choice is not None:
        student.config.lmdistill_layer_choice = choice.to_dict()  # saved in config.json with the student
    return StudentCut(student, layers, strategy, choice)


@dataclass
class LayerChoice:
    """How a data-driven strategy chose a student's layers, kept with the student."""

    strategy: str
    layers: list[int]
    calibration_tokens: int
    cuts: dict[str, CutScore]
    """The chosen cut beside the every-other and uniform cuts of the same depth."""
    influence: list[float] | None = None
    search: SearchResult | None = None

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "layers": self.layers, "calibration_tokens": self.calibration_tokens,
                "cuts": {name: score.to_dict() for name, score in self.cuts.items()},
                "influence": self.influence, "search": self.search.to_dict() if self.search else None}


def choose_layers(teacher: PreTrainedModel, tokens: np.ndarray, num_layers: int, strategy: str, *,
                  calibration_tokens: int, objective: str, block_size: int,
                  log: Callable[[str], None]) -> LayerChoice:
    """Pick ``num_layers`` teacher layers by ``importance`` or ``search`` on calibration tokens.

    Prints what it measures (block influence, or each search step) and a table of the chosen
    cut beside the every-other and uniform cuts, all scored on the same calibration tokens.
    """
    num_teacher = len(decoder_layers(teacher))
    layer_map(num_teacher, num_layers, "first")  # range check before any forward pass
    calibration = make_calibration(teacher, tokens, block_size=block_size, max_tokens=calibration_tokens)
    influence, search = None, None
    if strategy == "importance":
        influence = block_influence(teacher, tokens, block_size=calibration.blocks.shape[1],
                                    max_tokens=calibration_tokens)
        log("block influence per teacher layer (1 - cos(input, output)): "
            + ", ".join(f"{i}: {x:.3f}" for i, x in enumerate(influence)))
        layers = most_influential(influence, num_layers)
    elif strategy == "search":
        log(f"greedy layer search ({objective}): {num_teacher} -> {num_layers} layers, "
            f"{num_teacher - num_layers} steps on {calibration.tokens_scored:,} calibration tokens")

        def report(step: SearchStep) -> None:
            log(f"  removed layer {step.removed:>3}: {len(step.score.layers)} left, calibration ppl "
                f"{step.score.perplexity:,.2f}, KL to teacher {step.score.kl:.4f}")

        search = greedy_search(teacher, calibration, num_layers, objective, on_step=report)
        layers = search.layers
    else:
        raise ValueError(f"strategy {strategy!r} does not choose layers from data; use importance or search")
    cuts = {name: score_cut(teacher, calibration, layer_map(num_teacher, num_layers, name))
            for name in ("every-other", "uniform")}
    cuts[strategy] = search.steps[-1].score if search and search.steps else score_cut(teacher, calibration, layers)
    log(format_cut_table(cuts, calibration.tokens_scored))
    return LayerChoice(strategy, layers, calibration.tokens_scored + calibration.blocks.shape[0], cuts, influence, search)

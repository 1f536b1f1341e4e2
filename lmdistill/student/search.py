"""Score cuts of a teacher on calibration tokens, and search for the cut that costs least.

A *cut* is the list of teacher layers a student keeps. :func:`keep_only` runs the teacher
as if it were cut (the same module objects, no copy), so scoring a cut costs one forward
pass of the cut model and no weights are built. :func:`score_cut` measures the cut on a
:class:`Calibration` set: cross-entropy on the next tokens and KL(teacher || cut) per
token. :func:`greedy_search` removes one layer at a time, each time the layer whose removal
raises the chosen objective least (the layer-pruning baseline of Gromov et al. 2024 and
ShortGPT's comparisons), and records every step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..config import SEARCH_OBJECTIVES
from ..models.arch import architecture_of, decoder_layers
from ..models.device import eval_mode, model_device
from ..models.errors import ModelError
from .importance import calibration_blocks
from .maps import validate_layer_map


@contextlib.contextmanager
def keep_only(model: PreTrainedModel, layers: list[int],
              modules: list[nn.Module] | None = None) -> Iterator[PreTrainedModel]:
    """Within the block, ``model`` runs only the decoder ``layers`` (in order); restored after.

    Only for forward passes without a KV cache: attention modules keep their original
    ``layer_idx``. The per-layer attention kind (GPT-Neo local/global, sliding windows)
    lives in each layer module, so it follows the layer. ``modules`` (one per layer) runs
    in their place: stand-ins that replay recorded outputs (:class:`_Recording`).
    """
    arch = architecture_of(model)
    full = decoder_layers(model)
    layers = validate_layer_map(layers, len(full))
    parent_path, _, name = arch.layers.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    count_before = getattr(model.config, arch.num_layers_key)
    assert modules is None or len(modules) == len(layers)
    setattr(parent, name, nn.ModuleList(modules if modules is not None else [full[i] for i in layers]))
    setattr(model.config, arch.num_layers_key, len(layers))  # Llama slices layers by this count
    try:
        yield model
    finally:
        setattr(parent, name, full)
        setattr(model.config, arch.num_layers_key, count_before)


@dataclass
class Calibration:
    """Disjoint blocks of calibration tokens with the full teacher's log-probabilities.

    ``blocks``: ``(n_blocks, block_size)`` token ids. ``teacher_logprobs``: per batch of
    blocks, ``(batch, block_size - 1, vocab)`` float32 log-softmax of the teacher's logits
    at each position that has a next token (None if only CE is needed).
    """

    blocks: torch.Tensor
    batch_size: int
    teacher_logprobs: list[torch.Tensor] | None

    @property
    def tokens_scored(self) -> int:
        return self.blocks.shape[0] * (self.blocks.shape[1] - 1)

    def batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        for index, start in enumerate(range(0, self.blocks.shape[0], self.batch_size)):
            yield index, self.blocks[start : start + self.batch_size]


@torch.no_grad()
def make_calibration(teacher: PreTrainedModel, tokens: np.ndarray, block_size: int = 256, max_tokens: int = 2048,
                     batch_size: int = 4, with_teacher: bool = True) -> Calibration:
    """``max_tokens`` of a 1-D token stream as blocks spread over it; run the teacher once."""
    blocks = calibration_blocks(teacher, tokens, block_size, max_tokens, "scoring layer cuts")
    calibration = Calibration(blocks, batch_size, None)
    if with_teacher:
        device = model_device(teacher)
        with eval_mode(teacher):
            calibration.teacher_logprobs = [
                F.log_softmax(teacher(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float(), dim=-1).cpu()
                for _, batch in calibration.batches()
            ]
    return calibration


@dataclass(frozen=True)
class CutScore:
    """A cut measured on calibration tokens (nats per token)."""

    layers: list[int]
    ce: float
    """Cross-entropy of the cut model on the next calibration token."""
    kl: float | None
    """KL(full teacher || cut model) per token, temperature 1 (None without teacher targets)."""

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.ce, 700.0))

    def objective(self, name: str) -> float:
        value = self.kl if name == "kl" else self.ce
        if value is None:
            raise ValueError("the kl objective needs a calibration set made with the teacher's targets")
        return value

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity}


@torch.no_grad()
def score_cut(model: PreTrainedModel, calibration: Calibration, layers: list[int],
              recording: _Recording | None = None) -> CutScore:
    """CE and KL to the full model of ``model`` cut to ``layers``, on the calibration blocks.

    With a ``recording`` of a larger cut, the layers this cut starts with in common with it
    are not run: their recorded outputs are replayed (same layers, same inputs, same values).
    """
    ce_sum, kl_sum = 0.0, 0.0
    device = model_device(model)
    modules = recording.modules_for(model, layers) if recording is not None else None
    with keep_only(model, layers, modules), eval_mode(model):
        for index, batch in calibration.batches():
            if recording is not None:
                recording.batch = index
            batch = batch.to(device)
            logprobs = F.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
            ce_sum += -logprobs.gather(-1, batch[:, 1:].unsqueeze(-1)).double().sum().item()
            if calibration.teacher_logprobs is not None:
                target = calibration.teacher_logprobs[index].to(device)
                kl_sum += (target.exp() * (target - logprobs)).double().sum().item()
    n = calibration.tokens_scored
    return CutScore(list(layers), ce_sum / n, kl_sum / n if calibration.teacher_logprobs is not None else None)


class _Recording:
    """Each layer's output on each calibration batch, recorded while a cut is scored, so that
    a smaller cut that starts with the same layers replays them instead of running them. A
    greedy step scores every cut that drops one layer: dropping the ``m``-th runs only the
    layers after it, which halves the search's forward passes on average."""

    def __init__(self, model: PreTrainedModel, calibration: Calibration, layers: list[int]) -> None:
        self.layers = list(layers)
        self.outputs: dict[int, list] = {layer: [] for layer in self.layers}
        self.batch = 0
        full = decoder_layers(model)
        hooks = [full[layer].register_forward_hook(lambda _m, _in, out, layer=layer: self.outputs[layer].append(out))
                 for layer in self.layers]
        try:
            self.score = score_cut(model, calibration, self.layers)
        finally:
            for hook in hooks:
                hook.remove()

    def modules_for(self, model: PreTrainedModel, layers: list[int]) -> list[nn.Module]:
        full = decoder_layers(model)
        shared = 0
        while shared < min(len(layers), len(self.layers)) and layers[shared] == self.layers[shared]:
            shared += 1
        return [_Replay(self, layer) for layer in layers[:shared]] + [full[layer] for layer in layers[shared:]]


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns its recorded output for the batch being scored."""

    def __init__(self, recording: _Recording, layer: int) -> None:
        super().__init__()
        self.recording, self.layer = recording, layer

    def forward(self, *args, **kwargs):
        return self.recording.outputs[self.layer][self.recording.batch]


@dataclass
class SearchStep:
    """One greedy step: the layer removed and the score of the cut left."""

    removed: int
    score: CutScore
    candidates: dict[int, float] = field(default_factory=dict)
    """Objective of the cut without each candidate layer, for every layer tried at this step."""

    def to_dict(self) -> dict:
        return {"removed": self.removed, **self.score.to_dict(),
                "candidates": {str(k): v for k, v in self.candidates.items()}}


@dataclass
class SearchResult:
    objective: str
    start: CutScore
    steps: list[SearchStep]

    @property
    def layers(self) -> list[int]:
        return self.steps[-1].score.layers if self.steps else self.start.layers

    def to_dict(self) -> dict:
        return {"objective": self.objective, "layers": self.layers, "start": self.start.to_dict(),
                "steps": [step.to_dict() for step in self.steps]}


def greedy_search(model: PreTrainedModel, calibration: Calibration, keep: int, objective: str = "kl",
                  on_step: Callable[[SearchStep], None] | None = None) -> SearchResult:
    """Remove layers one at a time until ``keep`` remain, each time the cheapest to remove.

    The cheapest is the one whose removal gives the lowest ``objective`` (``kl`` to the full
    model or calibration ``ce``); ties go to the lower layer. ``on_step`` sees each step as
    it is made (for printing progress).
    """
    if objective not in SEARCH_OBJECTIVES:
        raise ModelError(f"unknown search objective {objective!r}; choose one of {', '.join(SEARCH_OBJECTIVES)}")
    num_layers = len(decoder_layers(model))
    if not 1 <= keep <= num_layers:
        raise ModelError(f"cannot keep {keep} of {num_layers} layers; choose between 1 and {num_layers}")
    current = list(range(num_layers))
    start = score_cut(model, calibration, current)
    start.objective(objective)  # fails now, not after the first step, when KL targets are missing
    steps: list[SearchStep] = []
    while len(current) > keep:
        recording = _Recording(model, calibration, current)
        scores = {layer: score_cut(model, calibration, [i for i in current if i != layer], recording)
                  for layer in current}
        del recording  # frees the recorded hidden states
        candidates = {layer: score.objective(objective) for layer, score in scores.items()}
        removed = min(current, key=lambda layer: (candidates[layer], layer))
        current.remove(removed)
        step = SearchStep(removed, scores[removed], candidates)
        steps.append(step)
        if on_step is not None:
            on_step(step)
    return SearchResult(objective, start, steps)


def format_cut_table(rows: dict[str, CutScore], tokens: int) -> str:
    """A Markdown table of named cuts (strategy -> score) with their calibration protocol."""
    lines = [f"calibration: {tokens:,} next-token predictions; CE and KL(teacher || cut) in nats per token",
             "", "| cut | layers | calibration ppl | CE | KL to teacher |", "|---|---|---:|---:|---:|"]
    for name, score in rows.items():
        kl = f"{score.kl:.4f}" if score.kl is not None else "-"
        lines.append(f"| {name} | {','.join(map(str, score.layers))} | {score.perplexity:,.2f} | {score.ce:.4f} | {kl} |")
    return "\n".join(lines)

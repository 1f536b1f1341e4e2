"""Which teacher layers matter: block influence measured on calibration tokens.

Block influence (ShortGPT, Men et al. 2024) of decoder layer ``i`` is
``1 - mean_t cos(x_t, y_t)`` where ``x_t`` is the hidden state entering the layer at token
``t`` and ``y_t`` the one leaving it: a layer that barely turns its input scores near 0 and
is the cheapest to drop. The states are caught with forward hooks on the decoder layers
themselves, so the last layer is measured before the final norm.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel

from ..data.errors import DataError
from ..models.arch import config_context_length, decoder_layers
from ..models.device import eval_mode, model_device
from ..models.errors import ModelError


def calibration_blocks(model: PreTrainedModel, tokens: np.ndarray, block_size: int, max_tokens: int,
                       purpose: str) -> torch.Tensor:
    """``max_tokens`` (at most) of a 1-D token stream as disjoint blocks ``(n, block_size)``,
    spread evenly over the whole stream.

    Spread, not the first ones: a training stream is its sources one after another, and its
    opening is one source's opening (Austen's, in ``corpus:all``), so layers and neurons
    ranked on it would be ranked for one author. ``block_size`` is capped at the model's
    context; ``purpose`` names the caller in the error.
    """
    context = config_context_length(model.config)
    block_size = min(block_size, context) if context else block_size
    n_blocks = min(len(tokens), max_tokens) // block_size
    if n_blocks < 1:
        raise DataError(f"{purpose} needs at least {block_size} calibration tokens, got {len(tokens)}; give a "
                        "longer calibration text (--calibration of init-student, data.sources of distill)")
    stride = len(tokens) // n_blocks  # at least block_size, so the blocks never overlap
    rows = [np.asarray(tokens[i * stride:i * stride + block_size], dtype=np.int64) for i in range(n_blocks)]
    return torch.as_tensor(np.stack(rows))


@torch.no_grad()
def block_influence(model: PreTrainedModel, tokens: np.ndarray, block_size: int = 256, max_tokens: int = 4096,
                    batch_size: int = 4) -> list[float]:
    """Block influence of every decoder layer, averaged over ``max_tokens`` tokens.

    ``tokens`` is a 1-D token stream; :func:`calibration_blocks` takes disjoint blocks of
    ``block_size`` tokens (at most the model's context) spread over it.
    """
    blocks = calibration_blocks(model, tokens, block_size, max_tokens, "block influence")
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)

    def hook(index: int):
        def capture(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            sums[index] += (1.0 - cos).sum().cpu()
        return capture

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    forward_blocks(model, blocks, batch_size, handles)
    return (sums / blocks.numel()).tolist()


@torch.no_grad()
def forward_blocks(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int,
                   handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """Run ``model`` over ``blocks`` in batches for its measuring hooks, then remove the hooks' ``handles``."""
    try:
        with eval_mode(model):
            for start in range(0, blocks.shape[0], batch_size):
                model(input_ids=blocks[start : start + batch_size].to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()


def most_influential(scores: list[float], keep: int) -> list[int]:
    """The ``keep`` layers with the largest block influence, in their original order."""
    if not 1 <= keep <= len(scores):
        raise ModelError(f"cannot keep {keep} of {len(scores)} layers; choose between 1 and {len(scores)}")
    # Stable: ties keep the lower layer.
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])

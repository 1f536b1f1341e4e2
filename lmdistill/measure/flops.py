"""Analytic matmul FLOPs of one distillation step, for MFU (nanoGPT / PaLM convention).

One step is: teacher forward (no grad) + student forward + student backward, over
``batch_tokens`` tokens in sequences of ``seq_len``. Only matrix multiplications count
(2 FLOPs per multiply-add); norms, activations, softmax, the losses and the optimiser are
left out, as in nanoGPT's ``estimate_mfu`` and PaLM's appendix B.

Per token, a forward pass costs

    2 * N_matmul  +  2 * 2 * L * (H * d_head) * seq_len

- ``N_matmul`` (:func:`matmul_params`) is the sum of the weight sizes of every ``nn.Linear``
  and HF ``Conv1D`` module, read from the model's actual modules, so any architecture is
  covered (GPT-2's fused c_attn, Llama's three MLP matrices, GQA's narrow k/v projections).
  It includes the lm_head: a tied lm_head is one Linear module that *uses* the embedding
  matrix, so it is counted once, for its one use per token. Embedding lookups (token and
  position) are gathers, not matmuls, and are not counted.
- The second term is attention: Q·K^T and A·V, each ``2 * seq_len * (H * d_head)`` FLOPs per
  token per layer, with ``H`` query heads (GQA shares K/V across heads but every query head
  still does its own products). **Causal halving is not applied**: every query is counted
  against all ``seq_len`` keys, as nanoGPT and PaLM do, and as dense SDPA kernels compute.
  Sliding-window / local attention (GPT-Neo's local layers, Mistral) is counted as full.

The student's backward pass is counted as twice its forward (the gradients with respect to
the inputs and to the weights of each matmul), so the student costs 3x its forward, i.e.
``6 * N`` per token plus 3x its attention. The teacher runs forward only.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..models.errors import ModelError

__all__ = ["matmul_params", "attention_flops_per_token", "forward_flops_per_token", "step_flops", "matmul_peak"]


def _as_model(model_or_config: Any) -> nn.Module:
    """A module to walk: the model itself, or one built from a config on the meta device (no memory)."""
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_or_config)


def _config_of(model_or_config: Any) -> Any:
    return model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers without Conv1D
        return None
    return Conv1D


def matmul_params(model_or_config: Any) -> int:
    """Multiply-adds per token of one forward pass through every Linear/Conv1D module.

    Each module counts once per use (a weight shared by two modules, like a tied lm_head and
    embedding, counts for the one module that multiplies with it). Embeddings are not counted.
    """
    model = _as_model(model_or_config)
    conv1d = _conv1d_class()
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
            total += module.weight.shape[0] * module.weight.shape[1]
    return total


def _attention_shape(config: Any) -> tuple[int, int]:
    """(layers, query heads x head_dim) from a config, whatever the family calls the fields."""
    layers = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if getattr(config, k, None)), None)
    heads = next((getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if getattr(config, k, None)), None)
    hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if getattr(config, k, None)), None)
    if layers is None or heads is None or hidden is None:
        raise ModelError(f"cannot read layers, heads and width from a {getattr(config, 'model_type', '?')} config: it "
                         f"has none of num_hidden_layers/n_layer/num_layers, num_attention_heads/n_head/num_heads or "
                         f"hidden_size/n_embd/d_model; add them to the model's config.json to count its FLOPs")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(layers), int(heads) * int(head_dim)


def attention_flops_per_token(model_or_config: Any, seq_len: int) -> int:
    """Q·K^T + A·V FLOPs per token of one forward pass: ``2 * 2 * L * (H * d_head) * seq_len`` (no causal halving)."""
    layers, width = _attention_shape(_config_of(model_or_config))
    return 2 * 2 * layers * width * seq_len


def forward_flops_per_token(model_or_config: Any, seq_len: int) -> int:
    """Matmul FLOPs per token of one forward pass: ``2 * N_matmul + attention``."""
    return 2 * matmul_params(model_or_config) + attention_flops_per_token(model_or_config, seq_len)


def step_flops(teacher: Any, student: Any, seq_len: int, batch_tokens: int, backward_factor: float = 2.0) -> dict[str, float]:
    """Matmul FLOPs of one distillation step over ``batch_tokens`` tokens (all micro-batches).

    ``teacher`` and ``student`` are models or HF configs (a config is instantiated on the
    meta device to read its weight shapes); ``teacher=None`` means no teacher forward
    (causal-LM-only training). ``backward_factor`` is the student's backward cost relative
    to its forward (2 by convention). Returns ``teacher_forward``, ``student_forward``,
    ``student_backward``, ``total`` and ``per_token`` (``total / batch_tokens``).
    """
    if seq_len < 1 or batch_tokens < 1:
        raise ValueError(f"seq_len and batch_tokens must be >= 1, got {seq_len} and {batch_tokens}")
    teacher_forward = 0 if teacher is None else forward_flops_per_token(teacher, seq_len) * batch_tokens
    student_forward = forward_flops_per_token(student, seq_len) * batch_tokens
    student_backward = int(round(backward_factor * student_forward))
    total = teacher_forward + student_forward + student_backward
    return {
        "teacher_forward": teacher_forward,
        "student_forward": student_forward,
        "student_backward": student_backward,
        "total": total,
        "per_token": total / batch_tokens,
    }


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> dict[str, Any]:
    """The best FLOP/s of ``repeats`` square ``size`` x ``size`` matmuls after two warm-ups: the
    machine's achievable peak that MFU is stated against (measured, not a datasheet figure)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    for _ in range(2):
        timed()
    times = [timed() for _ in range(repeats)]
    return {"size": size, "seconds": times, "flops_per_s": 2 * size**3 / min(times)}

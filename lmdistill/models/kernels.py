"""Training-time changes to a loaded model that keep its function: fused kernels for modules
written as chains of small operations, and the student's dropout rate.

Neither touches the model's config, so a saved folder reads exactly as the loaded one did.
"""

from __future__ import annotations

from torch import nn
from transformers.activations import GELUTanh, NewGELUActivation


def fuse_activations(model: nn.Module) -> int:
    """Replace each ``gelu_new`` activation (GPT-2, GPT-Neo: ``0.5 x (1 + tanh(sqrt(2/pi) (x +
    0.044715 x^3)))`` as five elementwise operations, each stored for the backward pass) by
    PyTorch's one-kernel tanh GELU, the same function. Returns how many were replaced.

    On a 2-core CPU this takes about 3% off a GPT-2 distillation step and a fifth of the
    student's stored MLP activations; results differ from the chain's only by float rounding.
    """
    replaced = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                replaced += 1
    return replaced


def set_dropout(model: nn.Module, rate: float) -> int:
    """Every dropout of ``model`` at ``rate`` while it trains: ``nn.Dropout`` modules and the
    float ``*dropout*`` attributes attention modules pass to their kernels (Llama's
    ``attention_dropout``). Returns how many were set."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
            changed += 1
            continue
        for attr, value in vars(module).items():
            if "dropout" in attr and isinstance(value, float):
                setattr(module, attr, rate)
                changed += 1
    return changed

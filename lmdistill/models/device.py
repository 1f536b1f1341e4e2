"""Devices: the one a name asks for, the one a model's inputs go to, whether a CPU computes bf16,
the hardware in words; eval mode for a block."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when visible; an unavailable device is refused with the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {name} asked for but no CUDA device is visible; use cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device mps asked for but not available; use cpu or auto")
    return torch.device(name)


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), where bf16
    autocast trains about twice as fast as float32; elsewhere PyTorch emulates bf16, slower
    than float32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def describe_hardware(device: torch.device, processes: int = 1) -> str:
    """The hardware a run used, in words: ``2 x NVIDIA H200`` or ``AMD EPYC 9554 (x86_64), 2 threads``."""
    if device.type == "cuda":
        return f"{processes} x {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":
        return f"{processes} x {device.type}"
    threads = torch.get_num_threads()
    return (f"{cpu_name()}, {threads} thread{'s' if threads > 1 else ''}"
            + (f" x {processes} processes" if processes > 1 else ""))


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what the platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def model_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its input embeddings' device (with a device_map, they decide)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block; afterwards every submodule's own flag comes back."""
    modes = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode

"""Size and speed of teacher and student, measured the same way.

Speed is batch-1 greedy decoding through ``model.generate`` with the KV cache, the way a
user runs the model: warm up (first calls pay for allocation, kernel selection and any
compilation), synchronise, then time whole calls, as gpt-fast's ``generate.py`` does. Each
timed call includes the prompt's prefill, so tokens/s is "new tokens per second of
``generate``", comparable across models given the same prompt.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig

from lmdistill.generate import check_length, model_eos_token_id
from lmdistill.models import count_parameters, eval_mode, model_device

__all__ = ["GenerationSpeed", "generation_speed", "generation_speeds", "parameter_counts", "size_on_disk"]


@dataclass
class GenerationSpeed:
    """Decoding speed of one model; medians over the timed repeats."""

    tokens_per_second: float  # new_tokens / median seconds over repeats
    seconds_per_token: float  # median seconds / new_tokens
    spread: float  # (max - min) / median of tokens/s over repeats: the run-to-run noise
    prompt_tokens: int
    new_tokens: int
    repeats: int
    threads: int  # torch.get_num_threads() when measured; CPU speed depends on it
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def _check_prompt(prompt_ids: torch.Tensor) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must have shape (1, P) with P >= 1, got {tuple(prompt_ids.shape)}")


def _greedy_exact(model, new_tokens: int) -> GenerationConfig:
    eos = model_eos_token_id(model)
    pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    # min_new_tokens == max_new_tokens masks EOS, so every model does exactly the same work.
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else 0,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_once(model, input_ids: torch.Tensor, config: GenerationConfig, new_tokens: int) -> float:
    """Seconds for one ``generate`` call; checks it produced exactly ``new_tokens``."""
    device = input_ids.device
    _synchronize(device)  # earlier queued work must not land inside this measurement
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    _synchronize(device)
    seconds = time.perf_counter() - start
    produced = out.shape[1] - input_ids.shape[1]
    if produced != new_tokens:
        raise RuntimeError(f"generate produced {produced} tokens instead of {new_tokens}; the speed would be wrong")
    return seconds


@torch.no_grad()
def generation_speeds(
    models: dict[str, nn.Module],
    prompt_ids: torch.Tensor,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, GenerationSpeed]:
    """Speeds of several models, timed round-robin (m1, m2, m1, m2, ...).

    Interleaving spreads machine noise (thermal throttling, a busy neighbour) over all
    models alike instead of penalising whichever ran during the bad moment. Every model is
    warmed up before the first timed call. Models are in eval mode for the measurement and
    restored afterwards.
    """
    if not models:
        raise ValueError("generation_speeds needs at least one model")
    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need new_tokens >= 1, repeats >= 1, warmup >= 0; got {new_tokens}, {repeats}, {warmup}")
    _check_prompt(prompt_ids)
    prompt_tokens = prompt_ids.shape[1]
    for model in models.values():
        check_length(model, prompt_tokens, new_tokens)  # fail before any model has run
    configs = {name: _greedy_exact(m, new_tokens) for name, m in models.items()}
    inputs = {name: prompt_ids.to(model_device(m)) for name, m in models.items()}
    seconds: dict[str, list[float]] = {name: [] for name in models}

    with eval_mode(*models.values()):
        for name, model in models.items():
            for _ in range(warmup):
                _run_once(model, inputs[name], configs[name], new_tokens)
        for _ in range(repeats):
            for name, model in models.items():
                seconds[name].append(_run_once(model, inputs[name], configs[name], new_tokens))

    threads = torch.get_num_threads()
    return {
        name: _summarise(seconds[name], prompt_tokens, new_tokens, threads, str(model_device(models[name])))
        for name in models
    }


def _summarise(seconds: list[float], prompt_tokens: int, new_tokens: int, threads: int, device: str) -> GenerationSpeed:
    # Both speeds come from the one median time, so they are exact inverses.
    median_seconds = statistics.median(seconds)
    rates = [new_tokens / s for s in seconds]
    return GenerationSpeed(
        tokens_per_second=new_tokens / median_seconds,
        seconds_per_token=median_seconds / new_tokens,
        spread=(max(rates) - min(rates)) / (new_tokens / median_seconds),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=len(seconds),
        threads=threads,
        device=device,
    )


@torch.no_grad()
def generation_speed(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
) -> GenerationSpeed:
    """Batch-1 greedy decoding speed with the KV cache, exactly ``new_tokens`` per call.

    ``prompt_ids``: ``(1, P)``. ``warmup`` untimed calls, then ``repeats`` timed ones.
    """
    return generation_speeds({"model": model}, prompt_ids, new_tokens, repeats, warmup)["model"]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``total``: unique parameters, tied weights once; ``non_embedding``: without token and
    learned position embeddings (the count the scaling-law papers and DistilGPT2 compare)."""
    return {
        "total": count_parameters(model),
        "non_embedding": count_parameters(model, exclude_embeddings=True),
    }


# Written by the HF Trainer next to the weights, but not weights.
_NOT_WEIGHTS = {"training_args.bin"}


def size_on_disk(folder: Path) -> int:
    """Bytes of the weight files in a saved Hugging Face folder.

    Counts ``*.safetensors`` (all shards); only when there are none, ``*.bin``. A folder saved
    in both formats holds the same weights twice, and ``from_pretrained`` reads the
    safetensors, so counting both would double the size.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the folder that save_pretrained wrote")
    for pattern in ("*.safetensors", "*.bin"):
        files = [f for f in folder.glob(pattern) if f.is_file() and f.name not in _NOT_WEIGHTS]
        if files:
            return sum(f.stat().st_size for f in files)
    raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {folder}; save the model there with save_pretrained")

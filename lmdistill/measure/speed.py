"""The one generation-speed measurement: bench, the demo and ``generate --compare`` all use it.

Protocol (:func:`generation_protocol` words it; each caller prints it next to its numbers):

- batch 1, greedy (argmax), the model's own KV cache, fp32 as loaded;
- prefill: one forward of the ``(1, P)`` prompt that fills the cache and yields the first
  new token (only the last position's logits, as ``generate`` computes them), timed apart;
- decode: ``N`` single-token forwards through the cache, each feeding back the previous
  argmax; EOS is ignored (as ``min_new_tokens = max_new_tokens``), so every model does the
  same work; ``ms/token`` = decode time / ``N``, decode tokens/s = ``N`` / decode time;
- ``warmup`` untimed runs per model (first calls pay for allocation, kernel selection and
  any compilation), then ``repeats`` timed runs interleaved round-robin across models, so
  machine noise hits all of them alike; synchronised before each timed region and timed with
  ``time.perf_counter`` (CUDA events on a GPU), as gpt-fast's ``generate.py`` does;
- reported: the median over repeats, and spread = (max - min) / median of the per-repeat
  rates (the run-to-run noise).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..generate import check_length
from ..models.device import eval_mode, model_device

__all__ = ["REPEATS", "WARMUP", "Clock", "GenerationPhase", "GenerationSpeed", "generation_protocol", "generation_speeds",
           "rate", "round_robin", "time_forward", "time_generation"]


# Timed and untimed runs per model for loaded models (the demo, generate --compare); bench has its own options.
REPEATS, WARMUP = 3, 1


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Clock:
    """Marks on a timeline: ``perf_counter`` on CPU, CUDA events on a GPU.

    CUDA events are recorded on the stream between kernels, so a mark does not stall the
    GPU; :meth:`seconds` synchronises once, after the whole measurement.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    @property
    def timer(self) -> str:
        return "CUDA events (torch.cuda.Event) with synchronize" if self.cuda else "time.perf_counter"

    def start(self):
        _synchronize(self.device)  # earlier queued work must not land inside the measurement
        return self.mark()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        _synchronize(self.device)  # a no-op on CPU; MPS queues work like CUDA
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


def cache_kwarg(model) -> str:
    # transformers 5.x renamed forward(past_key_values=) to forward(cache=).
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def last_logits_only(model) -> dict[str, int]:
    # A prefill needs the next-token logits of the last position only; skip the rest where the model allows.
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def returned_cache(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


@dataclass(frozen=True)
class GenerationTiming:
    """One timed generation: prefill and decode seconds, and the token ids it produced."""

    prefill_seconds: float
    decode_seconds: float
    new_ids: torch.Tensor  # (N + 1,): the prefill's token, then one per decode step


@torch.no_grad()
def time_generation(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, clock: Clock) -> GenerationTiming:
    """The one timing loop: prefill, then ``new_tokens`` greedy decode steps with the KV cache.

    The ids equal what ``model.generate`` returns greedily with ``min_new_tokens`` pinned to
    ``new_tokens + 1`` (the last one is produced but never fed back). The token choice stays
    on the device, so there is no host sync inside the loop.
    """
    cache_kw = cache_kwarg(model)
    start = clock.start()
    out = model(prompt_ids, use_cache=True, **last_logits_only(model))
    token = out.logits[:, -1:].argmax(-1)
    cache = returned_cache(out)
    produced = [token]
    prefilled = clock.mark()
    for _ in range(new_tokens):
        out = model(token, use_cache=True, **{cache_kw: cache})
        cache = returned_cache(out)
        token = out.logits[:, -1:].argmax(-1)
        produced.append(token)
    end = clock.mark()
    return GenerationTiming(clock.seconds(start, prefilled), clock.seconds(prefilled, end), torch.cat(produced, dim=1)[0])


@torch.no_grad()
def time_forward(model: nn.Module, batch_ids: torch.Tensor, clock: Clock) -> float:
    """Seconds of one no-grad forward of a ``(B, T)`` batch, full logits, no cache (scoring)."""
    start = clock.start()
    model(batch_ids, use_cache=False)
    end = clock.mark()
    return clock.seconds(start, end)


def rate(seconds: Sequence[float], tokens: int) -> dict[str, float]:
    """tokens/s from the median time, and spread = (max - min) / median of the per-run rates."""
    median = statistics.median(seconds)
    rates = [tokens / s for s in seconds]
    return {"tokens_per_second": tokens / median, "spread": (max(rates) - min(rates)) / (tokens / median)}


def round_robin(count: int, phases: Sequence[Callable[[int, bool], None]], repeats: int, warmup: int,
                on_repeat: Callable[[int], None] | None = None) -> None:
    """Run each phase on models ``0 .. count-1``: ``phase(i, timed)``.

    First ``warmup`` untimed runs of every phase per model (model by model), then ``repeats``
    rounds, each running the first phase on every model, then the next phase on every model.
    """
    for i in range(count):
        for _ in range(warmup):
            for phase in phases:
                phase(i, False)
    for r in range(repeats):
        if on_repeat is not None:
            on_repeat(r)
        for phase in phases:
            for i in range(count):
                phase(i, True)


@dataclass
class GenerationSpeed:
    """Timed runs of one model: prefill and decode seconds per repeat."""

    prompt_tokens: int
    new_tokens: int
    prefill_seconds: list[float]
    decode_seconds: list[float]

    @property
    def tokens_per_second(self) -> float:
        """Decode tokens per second: ``new_tokens`` / median decode seconds."""
        return self.generation()["tokens_per_second"]

    def generation(self) -> dict[str, float]:
        """The bench schema's ``generation`` section (decode only)."""
        ms = 1000.0 * statistics.median(self.decode_seconds) / self.new_tokens
        return {"ms_per_token": ms, **rate(self.decode_seconds, self.new_tokens)}

    def prefill(self) -> dict[str, float]:
        """The bench schema's ``prefill`` section."""
        return rate(self.prefill_seconds, self.prompt_tokens)


class GenerationPhase:
    """The generation phase of a :func:`round_robin`: :func:`time_generation` on model ``i``,
    its timed runs collected into one :class:`GenerationSpeed` per model."""

    def __init__(self, models: Sequence[nn.Module], prompts: Sequence[torch.Tensor], new_tokens: int,
                 clock: Clock) -> None:
        if new_tokens < 1:
            raise ValueError(f"need new_tokens >= 1, got {new_tokens}")
        for model, prompt in zip(models, prompts, strict=True):
            if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
                raise ValueError(f"a prompt must have shape (1, P) with P >= 1, got {tuple(prompt.shape)}")
            check_length(model, prompt.shape[1], new_tokens)  # fail before any model has run
        self.models = list(models)
        self.prompts = [p.to(model_device(m)) for m, p in zip(models, prompts)]
        self.clock = clock
        self.speeds = [GenerationSpeed(p.shape[1], new_tokens, [], []) for p in self.prompts]

    def __call__(self, i: int, timed: bool) -> None:
        speed = self.speeds[i]
        run = time_generation(self.models[i], self.prompts[i], speed.new_tokens, self.clock)
        if timed:
            speed.prefill_seconds.append(run.prefill_seconds)
            speed.decode_seconds.append(run.decode_seconds)


def generation_speeds(models: Sequence[nn.Module], prompts: Sequence[torch.Tensor], new_tokens: int,
                      repeats: int = REPEATS, warmup: int = WARMUP) -> list[GenerationSpeed]:
    """Generation speed of several loaded models by the one protocol, interleaved.

    ``prompts``: one ``(1, P)`` id tensor per model (the same ids when they share a tokenizer).
    Models are in eval mode for the measurement and restored afterwards.
    """
    if not models:
        raise ValueError("generation_speeds needs at least one model")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0; got {repeats}, {warmup}")
    phase = GenerationPhase(models, prompts, new_tokens, Clock(model_device(models[0])))
    with eval_mode(*models):
        round_robin(len(models), [phase], repeats, warmup)
    return phase.speeds


def generation_protocol(new_tokens: int, repeats: int, warmup: int, device: torch.device | str, threads: int,
                        prompt: str | None = None, dtype: torch.dtype = torch.float32) -> str:
    """The protocol of :func:`time_generation` under :func:`round_robin`, in words."""
    timer = Clock(torch.device(device)).timer
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    return (
        f"batch 1, greedy (argmax), KV cache, {precision} on {device} ({threads} threads); "
        + (f"prompt: {prompt}; " if prompt else "")
        + f"prefill is one forward of the prompt, timed apart; decode is {new_tokens} single-token forwards "
        f"through the cache with EOS ignored (as min_new_tokens = max_new_tokens), so every model does the same "
        f"work; ms/token = decode time / {new_tokens}; {warmup} untimed warm-up run(s) per model, then "
        f"{repeats} timed repeats interleaved round-robin across models, so machine noise hits all alike; timed "
        f"with {timer}; median over repeats, spread = (max - min) / median of the per-repeat rates"
    )

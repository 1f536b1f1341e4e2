"""Size and speed of teacher and student, measured the same way: the bench result and its table.

- :func:`bench_models` (the ``bench`` command) loads MODEL arguments and measures parameters,
  size on disk, peak memory, and prefill, per-token decode and batched forward speed, each
  phase timed explicitly with the model's own forward and KV cache (:mod:`.speed`).
- :func:`bench_generation` measures generation alone on models already loaded (the demo).
- :func:`format_bench` is the one renderer of a bench result (CLI, demo and report).

The bench result, the only shape these write and read (a JSON object)::

    kind: "bench", version: 2         (results from before version 2 lack both; same shape)
    protocol: str                      how every number below was measured
    device: str, threads: int, torch: str
    config: {prompt_tokens, new_tokens, repeats, warmup, batch_size, seq_len, device}  (bench)
    memory_method: str                 (bench)
    models: one object per model, in order:
        model: str                     the MODEL argument, or the caller's label
        parameters: {total, non_embedding}
        size_on_disk_bytes: int | None, size_on_disk_kind: str | None   (bench; None: a hub id)
        peak_memory_bytes: int, weights_bytes: int                       (bench)
        generation: {tokens_per_second, ms_per_token, spread}            decode only
        prefill: {tokens_per_second, spread}
        forward: {tokens_per_second, spread}                             (bench)
        speedup: {phase: tokens/s over the first model's}, for each phase above

Entries marked (bench) are absent from :func:`bench_generation`'s result.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LmdistillError
from ..markdown import MISSING, column_table, finite, get, number, protocol_text
from ..models.arch import config_context_length, count_parameters
from ..models.device import eval_mode, model_device, resolve_device
from ..models.errors import ModelError
from ..models.fingerprint import tokenizer_fingerprint
from ..models.load import classify_model_spec, load_model, load_tokenizer, model_config, weight_files
from . import speed
from .memory import PeakMemory, weights_bytes

__all__ = ["BenchConfig", "BenchError", "WeightFilesError", "bench_generation", "bench_models", "format_bench",
           "parameter_counts", "size_on_disk"]

KIND, VERSION = "bench", 2
PHASES = ("generation", "prefill", "forward")
_DEVICE_NAMES = ("auto", "cpu", "mps")
_MB = 1_000_000


class BenchError(LmdistillError):
    """Benchmark settings or models that cannot be measured together; the message names the fix."""


class WeightFilesError(BenchError, FileNotFoundError):
    """A folder without weight files. Also a FileNotFoundError, which it was before the tool had its
    own error classes, so callers catching that keep working."""


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``total``: unique parameters, tied weights once; ``non_embedding``: without token and
    learned position embeddings (the count the scaling-law papers and DistilGPT2 compare)."""
    return {
        "total": count_parameters(model),
        "non_embedding": count_parameters(model, exclude_embeddings=True),
    }


def size_on_disk(folder: Path) -> int:
    """Bytes of the weight files in a saved Hugging Face folder.

    Counts ``*.safetensors`` (all shards); only when there are none, ``*.bin``. A folder saved
    in both formats holds the same weights twice, and ``from_pretrained`` reads the
    safetensors, so counting both would double the size.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightFilesError(f"{folder} is not a folder; pass the folder that save_pretrained wrote")
    files = weight_files(folder)
    if files:
        return sum(f.stat().st_size for f in files)
    raise WeightFilesError(f"no weight files (*.safetensors, *.bin) in {folder}; save the model there with save_pretrained")


def _size_on_disk_of(spec: str) -> tuple[int | None, str | None]:
    kind, location = classify_model_spec(spec)
    if kind == "folder":
        return size_on_disk(Path(location)), "hf folder (weight files)"
    if kind == "gguf":
        return Path(location).stat().st_size, "gguf file (may be quantised)"
    return None, None  # a hub id: the weights live in the HF cache, not a folder we own


def _at_least(minimum: int, default: int):
    """An integer field and its least allowed value, checked by ``BenchConfig.__post_init__``."""
    return field(default=default, metadata={"minimum": minimum})


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`bench_models` measures.

    ``prompt_tokens``: length of the prompt (batch 1) for prefill and generation.
    ``new_tokens``: decode steps timed per generation; prompt + new must fit every model.
    ``repeats``: timed measurements of each phase per model (median reported).
    ``warmup``: untimed runs of each phase per model before timing starts.
    ``batch_size``, ``seq_len``: shape of the batched forward-throughput phase.
    ``device``: ``auto`` (CUDA when visible), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    """

    prompt_tokens: int = _at_least(1, 128)
    new_tokens: int = _at_least(1, 128)
    repeats: int = _at_least(1, 5)
    warmup: int = _at_least(0, 1)
    batch_size: int = _at_least(1, 8)
    seq_len: int = _at_least(1, 256)
    device: str = "auto"

    def __post_init__(self) -> None:
        for f in fields(self):
            minimum = f.metadata.get("minimum")
            value = getattr(self, f.name)
            if minimum is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise BenchError(f"{f.name} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.device, str) or not (
            self.device in _DEVICE_NAMES or re.fullmatch(r"cuda(:\d+)?", self.device)
        ):
            raise BenchError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


def _text_ids(tokenizer, count: int) -> list[int]:
    """The first ``count`` token ids of the Austen test text (repeated if it is too short)."""
    from ..data.corpora import corpus_documents

    text = "\n\n".join(doc.text for doc in corpus_documents("austen", "test"))
    ids: list[int] = []
    chars = max(count * 8, 4096)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > count or chars >= len(text):
            break
        chars *= 2
    if not ids:
        raise ModelError("the benchmark text tokenised to nothing; check the models' tokenizer")
    while len(ids) < count:
        ids = ids + ids
    return ids[:count]


def _check_specs(specs: list[str], config: BenchConfig):
    """Shared tokenizer and lengths, checked from configs and tokenizer files before any weights load."""
    tokenizers = {spec: load_tokenizer(spec) for spec in specs}
    groups: dict[str, list[str]] = {}
    for spec, tok in tokenizers.items():
        groups.setdefault(tokenizer_fingerprint(tok), []).append(spec)
    if len(groups) > 1:
        listing = "; ".join(" = ".join(group) for group in groups.values())
        raise BenchError(
            "bench feeds every model the same token ids, so all models must share one tokenizer; "
            f"these differ ({listing}). Benchmark models with different tokenizers in separate calls."
        )
    for spec in specs:
        limit = config_context_length(model_config(spec))
        if limit is None:
            continue
        if config.prompt_tokens + config.new_tokens > limit:
            raise BenchError(
                f"model {spec}: prompt_tokens + new_tokens = {config.prompt_tokens} + {config.new_tokens} "
                f"exceeds its context of {limit} positions; lower prompt_tokens or new_tokens (--prompt-tokens, "
                f"--new-tokens)"
            )
        if config.seq_len > limit:
            raise BenchError(f"model {spec}: seq_len {config.seq_len} exceeds its context of {limit} positions; lower "
                             f"seq_len (--seq-len)")
    return tokenizers[specs[0]]


def _load_models(specs: list[str], device: torch.device, ids: list[int], say: Callable[[str], None]) -> list[nn.Module]:
    models = []
    for spec in specs:
        say(f"loading {spec} on {device}")
        model = load_model(spec, dtype=torch.float32, device=device)
        vocab = model.get_input_embeddings().num_embeddings
        if max(ids) >= vocab:
            raise ModelError(f"model {spec}: the tokenizer produced id {max(ids)} but the model has only {vocab} "
                             f"embeddings; its tokenizer files do not belong to its weights")
        models.append(model)
    return models


class _ForwardPhase:
    """The batched-forward phase of a :func:`speed.round_robin`: seconds per model."""

    def __init__(self, models: list[nn.Module], batch: torch.Tensor, clock: speed.Clock) -> None:
        self.models, self.clock = models, clock
        self.batches = [batch.to(model_device(m)) for m in models]
        self.seconds: list[list[float]] = [[] for _ in models]

    def __call__(self, i: int, timed: bool) -> None:
        seconds = speed.time_forward(self.models[i], self.batches[i], self.clock)
        if timed:
            self.seconds[i].append(seconds)


def _protocol(config: BenchConfig, device: torch.device, threads: int, memory_method: str) -> str:
    generation = speed.generation_protocol(
        config.new_tokens, config.repeats, config.warmup, device, threads,
        prompt=f"the first {config.prompt_tokens} tokens of the Austen test text, the same ids for every model")
    return (
        f"Generation: {generation}. Forward: batch {config.batch_size} x {config.seq_len} tokens, no grad, full "
        f"logits, no cache, with the same warm-up and repeats (per repeat: generation of every model, then forward "
        f"of every model). Speed-ups relative to the first model. Peak memory: weights (parameters + buffers) + "
        f"peak extra during one untimed generation and forward, measured per model after timing, as {memory_method}"
        + ("" if device.type == "cuda" else "; process-level, so approximate")
        + "."
    )


def _with_speedups(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each entry's tokens/s per phase over the first entry's (1.0 for the first)."""
    first = entries[0]
    for entry in entries:
        entry["speedup"] = {phase: entry[phase]["tokens_per_second"] / first[phase]["tokens_per_second"]
                            for phase in PHASES if phase in entry and phase in first}
    return entries


def _result(protocol: str, device: torch.device, entries: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"kind": KIND, "version": VERSION, "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, **extra, "protocol": protocol, "models": _with_speedups(entries)}


def bench_models(specs: list[str], config: BenchConfig = BenchConfig(), progress: bool = True) -> dict[str, Any]:
    """Size, memory and speed of several models, measured by one harness, interleaved.

    ``specs``: MODEL arguments (alias, folder, .gguf file or hub id), loaded in fp32 on the
    resolved device. All models must share a tokenizer (they get the same token ids) and fit
    ``prompt_tokens + new_tokens`` and ``seq_len`` in their context; both are checked from
    tokenizer and config files before any weights load. All models are resident at once,
    because interleaving needs them together (a 7B teacher and its student need the memory of
    both). Returns a bench result (module docstring).
    """
    specs = [str(s) for s in specs]
    if not specs:
        raise ValueError("bench_models needs at least one model")
    device = resolve_device(config.device)

    def say(msg: str) -> None:
        if progress:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    tokenizer = _check_specs(specs, config)
    ids = _text_ids(tokenizer, max(config.prompt_tokens, config.batch_size * config.seq_len))
    prompt = torch.tensor([ids[: config.prompt_tokens]], dtype=torch.long)
    batch = torch.tensor(ids[: config.batch_size * config.seq_len], dtype=torch.long).view(config.batch_size, config.seq_len)
    models = _load_models(specs, device, ids, say)

    clock = speed.Clock(device)
    generation = speed.GenerationPhase(models, [prompt] * len(models), config.new_tokens, clock)
    forward = _ForwardPhase(models, batch, clock)
    memory = PeakMemory(device)
    with eval_mode(*models):
        if config.warmup:
            say(f"warming up ({config.warmup} run(s) per phase per model)")
        speed.round_robin(len(models), [generation, forward], config.repeats, config.warmup,
                          on_repeat=lambda r: say(f"repeat {r + 1}/{config.repeats}"))
        peaks = []
        for i, model in enumerate(models):
            say(f"peak memory of {specs[i]}")

            def run(i: int = i) -> None:  # one untimed generation and forward
                generation(i, False)
                forward(i, False)

            peaks.append(weights_bytes(model) + memory.measure(run))

    entries = []
    for i, (spec, model) in enumerate(zip(specs, models)):
        size, size_kind = _size_on_disk_of(spec)
        entries.append({
            "model": spec, "parameters": parameter_counts(model), "size_on_disk_bytes": size,
            "size_on_disk_kind": size_kind, "peak_memory_bytes": peaks[i], "weights_bytes": weights_bytes(model),
            "generation": generation.speeds[i].generation(), "prefill": generation.speeds[i].prefill(),
            "forward": speed.rate(forward.seconds[i], config.batch_size * config.seq_len),
        })
    threads = torch.get_num_threads()
    return _result(_protocol(config, device, threads, memory.method), device, entries, config=asdict(config),
                   memory_method=memory.method)


def bench_generation(models: dict[str, nn.Module], prompt_ids: torch.Tensor, prompt: str, new_tokens: int,
                     repeats: int = speed.REPEATS, warmup: int = speed.WARMUP) -> dict[str, Any]:
    """Parameters and generation speed (:func:`speed.generation_speeds`) of loaded models that
    share a tokenizer, as a bench result; ``prompt`` describes ``prompt_ids`` in the protocol."""
    loaded = list(models.values())
    speeds = speed.generation_speeds(loaded, [prompt_ids] * len(loaded), new_tokens, repeats, warmup)
    device = model_device(loaded[0])
    protocol = speed.generation_protocol(new_tokens, repeats, warmup, device, torch.get_num_threads(), prompt=prompt,
                                         dtype=next(loaded[0].parameters()).dtype)
    entries = [{"model": label, "parameters": parameter_counts(model), "generation": s.generation(),
                "prefill": s.prefill()} for (label, model), s in zip(models.items(), speeds)]
    return _result(f"Generation: {protocol}. Speed-ups relative to the first model.", device, entries)


# ---------------------------------------------------------------------------------------
# The one renderer


def _count(n: Any) -> str:
    if not isinstance(n, int):
        return MISSING
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _megabytes(n: Any) -> str:
    return number(n / _MB, ",.1f") if finite(n) else MISSING


def _with_speedup(model: dict[str, Any], phase: str) -> str | None:
    """``tokens/s (speed-up)``, or tokens/s alone when there is no speed-up."""
    tps, ratio = get(model, phase, "tokens_per_second"), get(model, "speedup", phase)
    if tps is None:
        return None
    return number(tps, ",.1f") + (f" ({number(ratio, '.2f')}x)" if ratio is not None else "")


_COLUMNS: Sequence = (
    ("model", lambda m: m.get("model", "?"), str),
    ("params (total / non-emb)", lambda m: m.get("parameters"),
     lambda p: f"{_count(get(p, 'total'))} / {_count(get(p, 'non_embedding'))}"),
    ("size MB", lambda m: m.get("size_on_disk_bytes"), _megabytes),
    ("peak mem MB", lambda m: m.get("peak_memory_bytes"), _megabytes),
    ("gen tok/s (speed-up)", lambda m: _with_speedup(m, "generation"), str),
    ("ms/token", lambda m: get(m, "generation", "ms_per_token"), lambda v: number(v, ",.2f")),
    ("prefill tok/s", lambda m: get(m, "prefill", "tokens_per_second"), lambda v: number(v, ",.1f")),
    ("forward tok/s (speed-up)", lambda m: _with_speedup(m, "forward"), str),
)


def format_bench(results: dict[str, Any]) -> list[str]:
    """Markdown lines of a bench result: the protocol, one row per model, the largest spread.

    MB are 10^6 bytes; speed-ups in parentheses are against the first row. Missing values
    show as ``-``, and a column no model has is left out (the demo measures generation only).
    """
    models = [m for m in results.get("models") or [] if isinstance(m, dict)]
    if not models:
        return ["(benchmark results hold no models)"]
    protocol = protocol_text(results.get("protocol"))
    lines = [f"Protocol: {protocol}.", ""] if protocol else []
    lines += column_table(models, _COLUMNS)
    spreads = [s for m in models for phase in PHASES if finite(s := get(m, phase, "spread"))]
    if spreads:
        where = ", ".join(f"{v}" if k == "device" else f"{v} threads" for k in ("device", "threads")
                          if (v := results.get(k)) is not None)
        lines += ["", f"Largest run-to-run spread: {100 * max(spreads):.0f}%" + (f" ({where})." if where else ".")]
    return lines

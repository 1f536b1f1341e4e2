"""Size and speed of teacher and student, measured the same way.

Benchmark loops warm up (first calls pay for allocation, kernel selection and any
compilation), synchronise, then time, as gpt-fast's ``generate.py`` does, and interleave
models round-robin so that machine noise hits all of them alike.

- :func:`bench_models` (the ``bench`` command): loads MODEL arguments and reports
  parameters, size on disk, peak memory, and prefill, per-token decode and batched forward
  speed, each phase timed explicitly with the model's own forward and KV cache.
- :func:`generation_speeds` / :func:`generation_speed`: batch-1 greedy decoding of loaded
  models through ``model.generate``; each timed call includes the prompt's prefill, so
  tokens/s is "new tokens per second of ``generate``", comparable across models given the
  same prompt.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig

from lmdistill.errors import LmdistillError
from lmdistill.generate import check_length, model_eos_token_id
from lmdistill.models.arch import config_context_length, count_parameters
from lmdistill.models.device import eval_mode, model_device, resolve_device
from lmdistill.models.errors import ModelError
from lmdistill.models.fingerprint import tokenizer_fingerprint
from lmdistill.models.load import classify_model_spec, load_model, load_tokenizer, model_config, weight_files

__all__ = [
    "BenchConfig",
    "BenchError",
    "GenerationSpeed",
    "bench_models",
    "format_bench",
    "generation_speed",
    "generation_speeds",
    "measure_forward",
    "measure_generation",
    "parameter_counts",
    "size_on_disk",
]


class BenchError(LmdistillError):
    """Benchmark settings or models that cannot be measured together; the message names the fix."""


class WeightFilesError(BenchError, FileNotFoundError):
    """A folder without weight files. Also a FileNotFoundError, which it was before the tool had its
    own error classes, so callers catching that keep working."""


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
    elif device.type == "mps":
        torch.mps.synchronize()


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


# =========================================================================== bench_models
#
# The `bench` command: several models measured by one harness, interleaved, with size and
# memory. Each phase is timed explicitly with the model's own forward (no ``generate``), so
# prefill and per-token decode cost are separate numbers rather than one being inferred by
# subtracting the other.

_DEVICE_NAMES = ("auto", "cpu", "mps")
_MB = 1_000_000


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

    prompt_tokens: int = 128
    new_tokens: int = 128
    repeats: int = 5
    warmup: int = 1
    batch_size: int = 8
    seq_len: int = 256
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "repeats", "batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BenchError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise BenchError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not isinstance(self.device, str) or not (
            self.device in _DEVICE_NAMES or re.fullmatch(r"cuda(:\d+)?", self.device)
        ):
            raise BenchError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


class _Clock:
    """Marks on a timeline: ``perf_counter`` on CPU, CUDA events on a GPU.

    CUDA events are recorded on the stream between kernels, so a mark does not stall the
    GPU; :meth:`seconds` synchronises once, after the whole measurement.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

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


def _cache_kwarg(model) -> str:
    # transformers 5.x renamed forward(past_key_values=) to forward(cache=).
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def measure_generation(model, prompt_ids: torch.Tensor, new_tokens: int, clock: _Clock) -> tuple[float, float, torch.Tensor]:
    """``(prefill_seconds, decode_seconds, new_ids)`` of one greedy generation with the KV cache.

    Prefill: one forward of the ``(1, P)`` prompt that fills the cache and yields the first
    new token (only the last position's logits are computed, as ``generate`` does). Decode:
    ``new_tokens`` single-token forwards through the cache, each taking the argmax as the next
    token. EOS is not checked, so every model does exactly the same work. ``new_ids`` has
    ``new_tokens + 1`` tokens (the last is produced but never fed back); they equal what
    ``model.generate`` returns greedily with ``min_new_tokens`` pinned. The token choice stays
    on the device, so there is no host sync inside the loop.
    """
    cache_kw = _cache_kwarg(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    start = clock.start()
    out = model(prompt_ids, use_cache=True, **keep)
    token = out.logits[:, -1:].argmax(-1)
    cache = _returned_cache(out)
    produced = [token]
    prefilled = clock.mark()
    for _ in range(new_tokens):
        out = model(token, use_cache=True, **{cache_kw: cache})
        cache = _returned_cache(out)
        token = out.logits[:, -1:].argmax(-1)
        produced.append(token)
    end = clock.mark()
    return clock.seconds(start, prefilled), clock.seconds(prefilled, end), torch.cat(produced, dim=1)[0]


@torch.no_grad()
def measure_forward(model, batch_ids: torch.Tensor, clock: _Clock) -> float:
    """Seconds of one no-grad forward of a ``(B, T)`` batch, full logits, no cache (scoring)."""
    start = clock.start()
    model(batch_ids, use_cache=False)
    end = clock.mark()
    return clock.seconds(start, end)


def _rate_stats(seconds: list[float], tokens: int) -> dict:
    """tokens/s from the median time, and spread = (max - min) / median of the per-run rates."""
    median = statistics.median(seconds)
    rates = [tokens / s for s in seconds]
    return {"tokens_per_second": tokens / median, "spread": (max(rates) - min(rates)) / (tokens / median)}


def _text_ids(tokenizer, count: int) -> list[int]:
    """The first ``count`` token ids of the Austen test text (repeated if it is too short)."""
    from lmdistill.data.corpora import corpus_documents

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
        cfg = model_config(spec)
        limit = config_context_length(cfg)
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


def _size_on_disk_of(spec: str) -> tuple[int | None, str | None]:
    kind, location = classify_model_spec(spec)
    if kind == "folder":
        return size_on_disk(Path(location)), "hf folder (weight files)"
    if kind == "gguf":
        return Path(location).stat().st_size, "gguf file (may be quantised)"
    return None, None  # a hub id: the weights live in the HF cache, not a folder we own


def _weights_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class _PeakMemory:
    """Peak memory that running one model adds on top of what was resident before.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
    allocated bytes before (tensor memory only, exact). CPU: process resident set size, so it
    also counts any allocator or interpreter growth in between. On Linux the kernel's RSS
    high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` and read back,
    which is exact for the process; otherwise psutil samples RSS every 0.5 ms from a thread;
    otherwise ``resource.getrusage`` ``ru_maxrss`` growth (a lifetime high-water mark, so it
    reads 0 whenever an earlier model already reached higher).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = "cuda max_memory_allocated"
        elif _can_reset_hwm():
            self.method = "process peak RSS (Linux VmHWM, reset per model)"
        elif importlib.util.find_spec("psutil") is not None:
            self.method = "process RSS sampled by psutil every 0.5 ms"
        else:
            self.method = "process ru_maxrss growth (lifetime high-water mark)"

    def measure(self, run) -> int:
        """Bytes above the starting level while ``run()`` executes."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            run()
            torch.cuda.synchronize(self.device)
            return max(torch.cuda.max_memory_allocated(self.device) - base, 0)
        if self.method.startswith("process peak RSS"):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            # Read back right after the reset (not before it) so memory freed by another
            # thread in between cannot lower the high-water mark below the base.
            base = _proc_status_bytes("VmHWM")
            run()
            return max(_proc_status_bytes("VmHWM") - base, 0)
        if "psutil" in self.method:
            return _sampled_rss_growth(run)
        base = _ru_maxrss_bytes()
        run()
        return max(_ru_maxrss_bytes() - base, 0)


def _can_reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_bytes("VmHWM") > 0
    except (OSError, ValueError):
        return False


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise ValueError(f"{key} not in /proc/self/status")


def _sampled_rss_growth(run) -> int:
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return max(max(peak[0], proc.memory_info().rss) - base, 0)


def _ru_maxrss_bytes() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB on Linux


def _protocol(config: BenchConfig, device: torch.device, threads: int, memory_method: str) -> str:
    timer = "CUDA events (torch.cuda.Event) with synchronize" if device.type == "cuda" else "time.perf_counter"
    return (
        f"fp32 on {device} ({threads} threads). Prompt: the first {config.prompt_tokens} tokens of the Austen "
        f"test text, the same ids for every model. Generation: batch 1, greedy (argmax), KV cache; prefill is "
        f"one forward of the prompt, timed apart; decode is {config.new_tokens} single-token forwards through the "
        f"cache with EOS ignored (as min_new_tokens = max_new_tokens), so every model does the same work; "
        f"ms/token = decode time / {config.new_tokens}. Forward: batch {config.batch_size} x {config.seq_len} "
        f"tokens, no grad, full logits, no cache. Each phase: {config.warmup} untimed warm-up run(s) per model, "
        f"then {config.repeats} timed repeats interleaved round-robin across models (per repeat: generation "
        f"of every model, then forward of every model), so machine noise hits all alike; timed with {timer}. "
        f"Reported: median over repeats; spread = (max - min) / median of the per-repeat rates; speed-ups "
        f"relative to the first model. Peak memory: weights (parameters + buffers) + peak extra during one "
        f"untimed generation and forward, measured per model after timing, as {memory_method}"
        + ("" if device.type == "cuda" else "; process-level, so approximate")
        + "."
    )


def bench_models(specs: list[str], config: BenchConfig = BenchConfig(), progress: bool = True) -> dict:
    """Size, memory and speed of several models, measured by one harness, interleaved.

    ``specs``: MODEL arguments (alias, folder, .gguf file or hub id), loaded in fp32 on the
    resolved device with :func:`lmdistill.models.load_model`. All models must share a tokenizer
    (they get the same token ids) and fit ``prompt_tokens + new_tokens`` and ``seq_len`` in
    their context; both are checked from tokenizer and config files before any weights load.

    All models are loaded at once, because interleaving (round-robin per repeat: generation
    of model 1, 2, ..., then forward of model 1, 2, ...) needs them resident together; that
    is fine for the small models this compares, but a 7B teacher and its student need the
    memory of both.

    Returns a JSON-able dict: ``device``, ``threads``, ``torch``, ``protocol`` (text), and
    ``models``, one entry per spec in order, with ``parameters`` (``total``,
    ``non_embedding``), ``size_on_disk_bytes`` (None for a hub id), ``peak_memory_bytes``,
    ``generation`` (``ms_per_token``, ``tokens_per_second``, ``spread``; decode only),
    ``prefill`` and ``forward`` (``tokens_per_second``, ``spread``), and ``speedup`` of each
    against the first model (1.0 for it). See ``protocol`` for how each number is measured.
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

    models = []
    for spec in specs:
        say(f"loading {spec} on {device}")
        model = load_model(spec, dtype=torch.float32, device=device)
        vocab = model.get_input_embeddings().num_embeddings
        if max(ids) >= vocab:
            raise ModelError(f"model {spec}: the tokenizer produced id {max(ids)} but the model has only {vocab} "
                             f"embeddings; its tokenizer files do not belong to its weights")
        models.append(model)

    clock = _Clock(device)
    prompts = [prompt.to(model_device(m)) for m in models]
    batches = [batch.to(model_device(m)) for m in models]
    prefill_s: list[list[float]] = [[] for _ in models]
    decode_s: list[list[float]] = [[] for _ in models]
    forward_s: list[list[float]] = [[] for _ in models]

    with eval_mode(*models):
        if config.warmup:
            say(f"warming up ({config.warmup} run(s) per phase per model)")
        for i, model in enumerate(models):
            for _ in range(config.warmup):
                measure_generation(model, prompts[i], config.new_tokens, clock)
                measure_forward(model, batches[i], clock)
        for r in range(config.repeats):
            say(f"repeat {r + 1}/{config.repeats}")
            for i, model in enumerate(models):
                p, d, _ = measure_generation(model, prompts[i], config.new_tokens, clock)
                prefill_s[i].append(p)
                decode_s[i].append(d)
            for i, model in enumerate(models):
                forward_s[i].append(measure_forward(model, batches[i], clock))

        memory = _PeakMemory(device)
        peaks = []
        for i, model in enumerate(models):
            say(f"peak memory of {specs[i]}")

            def run(model=model, i=i) -> None:
                measure_generation(model, prompts[i], config.new_tokens, clock)
                measure_forward(model, batches[i], clock)

            peaks.append(_weights_bytes(model) + memory.measure(run))

    threads = torch.get_num_threads()
    entries = []
    for i, (spec, model) in enumerate(zip(specs, models)):
        size, size_kind = _size_on_disk_of(spec)
        generation = _rate_stats(decode_s[i], config.new_tokens)
        generation = {"ms_per_token": 1000.0 * statistics.median(decode_s[i]) / config.new_tokens, **generation}
        entries.append({
            "model": spec,
            "parameters": parameter_counts(model),
            "size_on_disk_bytes": size,
            "size_on_disk_kind": size_kind,
            "peak_memory_bytes": peaks[i],
            "weights_bytes": _weights_bytes(model),
            "generation": generation,
            "prefill": _rate_stats(prefill_s[i], config.prompt_tokens),
            "forward": _rate_stats(forward_s[i], config.batch_size * config.seq_len),
        })
    first = entries[0]
    for entry in entries:
        entry["speedup"] = {
            phase: entry[phase]["tokens_per_second"] / first[phase]["tokens_per_second"]
            for phase in ("generation", "prefill", "forward")
        }
    return {
        "device": str(device),
        "threads": threads,
        "torch": torch.__version__,
        "config": asdict(config),
        "memory_method": memory.method,
        "protocol": _protocol(config, device, threads, memory.method),
        "models": entries,
    }


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / _MB:.1f}"


def format_bench(results: dict) -> str:
    """A Markdown table of :func:`bench_models` results, one row per model, protocol above.

    MB are 10^6 bytes; speed-ups in parentheses are against the first row.
    """
    lines = [
        f"Protocol: {results['protocol']}",
        "",
        "| model | params (total / non-emb) | size MB | peak mem MB | gen tok/s (speed-up) | ms/token "
        "| prefill tok/s | forward tok/s (speed-up) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results["models"]:
        p, g, s = m["parameters"], m["generation"], m["speedup"]
        lines.append(
            f"| {m['model']} | {_count(p['total'])} / {_count(p['non_embedding'])} | {_mb(m['size_on_disk_bytes'])} "
            f"| {_mb(m['peak_memory_bytes'])} | {g['tokens_per_second']:.1f} ({s['generation']:.2f}x) "
            f"| {g['ms_per_token']:.2f} | {m['prefill']['tokens_per_second']:.1f} "
            f"| {m['forward']['tokens_per_second']:.1f} ({s['forward']:.2f}x) |"
        )
    worst = max(max(m[ph]["spread"] for ph in ("generation", "prefill", "forward")) for m in results["models"])
    lines += ["", f"Largest run-to-run spread: {100 * worst:.0f}% ({results['device']}, {results['threads']} threads)."]
    return "\n".join(lines)

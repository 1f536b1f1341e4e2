"""Teacher-written text: a corpus sampled from a model, for sequence-level distillation.

A corpus of the teacher's own samples carries what the teacher knows beyond the training
text (modern English, other genres), which a student cut from it loses and cannot relearn from
a narrow corpus. ``lmdistill generate-corpus`` writes it as JSON lines that every command reads
as a local source (``data.sources=[corpus:all, DIR]``).

Layout of ``DIR``:

- ``manifest.json``: the settings that determine the text (teacher fingerprint, prompts,
  lengths, sampling, seed, precision), written first; a rerun with other settings is refused.
- ``part-00000.jsonl``, ``part-00001.jsonl``, ...: one file per batch of rows, each written
  atomically, one document a line: ``{"id", "text", "prompt", "new_tokens"}``. ``text`` is the
  continuation only (the prompt, when taken from data, is data already); a row that samples an
  end-of-document token (or another special token) goes on as a new document on the next line.

Batch ``k`` draws its prompts and its samples from generators seeded by ``(seed, k)``, so a run
killed at any point and rerun writes the same files as one that never stopped, and a larger
``--tokens`` extends a corpus without changing what is there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import remove_leftovers, write_text_atomic
from .errors import LmdistillError
from .measure.speed import cache_kwarg, last_logits_only, returned_cache
from .models.device import model_device

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class TeacherTextError(LmdistillError):
    """Settings or an output folder that cannot be used; the message names the fix."""


@dataclass(frozen=True)
class TextSettings:
    """Everything that determines the samples (stored in the manifest)."""

    teacher: str
    teacher_fingerprint: str
    prompts: str | None  # a SOURCE spec whose train split gives prompt windows; None: unconditional
    prompt_tokens: int  # tokens per prompt window (unconditional: the one start token)
    new_tokens: int  # tokens sampled per row
    batch_size: int  # rows per batch (and per part file)
    temperature: float
    top_p: float
    seed: int
    precision: str  # "fp32" or "bf16": the teacher's weights while sampling

    def __post_init__(self) -> None:
        if self.new_tokens < 1 or self.batch_size < 1 or self.prompt_tokens < 1:
            raise TeacherTextError("new_tokens, batch_size and prompt_tokens must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise TeacherTextError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TeacherTextError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.precision not in ("fp32", "bf16"):
            raise TeacherTextError(f"precision must be fp32 or bf16, got {self.precision!r}")


def part_path(out: Path, index: int) -> Path:
    return out / f"part-{index:05d}.jsonl"


def open_corpus(out: Path, settings: TextSettings) -> list[int]:
    """Create ``out`` or check that it holds this corpus; the new-token counts of its parts so far."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TeacherTextError(f"{out} is a file; choose a folder for the corpus (--out)")
    manifest = {"format_version": FORMAT_VERSION, "settings": asdict(settings)}
    path = out / MANIFEST_NAME
    if path.exists():
        old = json.loads(path.read_text())
        if old != manifest:
            changed = sorted(k for k in manifest["settings"] if old.get("settings", {}).get(k) != manifest["settings"][k])
            raise TeacherTextError(
                f"{out} holds a corpus made with other settings ({', '.join(changed) or 'format'}); rerun with "
                "the same settings to extend it, or choose a new --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise TeacherTextError(f"{out} is not empty and holds no {MANIFEST_NAME}; choose a new or empty folder (--out)")
    else:
        write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
    remove_leftovers(out)  # a part a killed run was writing; it is sampled again, identically
    counts = []
    while part_path(out, len(counts)).exists():
        lines = part_path(out, len(counts)).read_text().splitlines()
        counts.append(sum(int(json.loads(line)["new_tokens"]) for line in lines))
    return counts


# The nucleus is looked for among this many most likely tokens first: a top-k is about 15 times
# cheaper than sorting a 49k vocabulary, and rows whose nucleus reaches further are sorted in full.
NUCLEUS_CANDIDATES = 1024


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the index where the cumulative mass passes ``u`` of the row's total (inverse CDF)."""
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)


def _in_nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    # A token is kept while the mass before it is below top_p: the smallest prefix reaching top_p.
    return (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / T), restricted to the nucleus of mass ``top_p``.

    One uniform number per row picks the token by inverse CDF (multinomial is several times
    slower over a large vocabulary), so every row costs the generator the same draw.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    if top_p >= 1:
        return _draw(probs, u).squeeze(-1)
    vals, ids = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    tokens = ids.gather(-1, _draw(vals * _in_nucleus(vals, top_p), u)).squeeze(-1)
    beyond = vals.sum(dim=-1) < top_p  # rows whose nucleus reaches past the candidates
    if beyond.any():
        full, order = probs[beyond].sort(dim=-1, descending=True)
        tokens[beyond] = order.gather(-1, _draw(full * _in_nucleus(full, top_p), u[beyond])).squeeze(-1)
    return tokens


@torch.inference_mode()
def sample_rows(model: nn.Module, prompts: torch.Tensor, settings: TextSettings, generator: torch.Generator) -> torch.Tensor:
    """``(B, new_tokens)`` tokens sampled after ``prompts`` ``(B, P)``, one forward a step with the KV cache."""
    cache_kw = cache_kwarg(model)
    out = model(input_ids=prompts, use_cache=True, **last_logits_only(model))
    tokens = []
    for step in range(settings.new_tokens):
        tokens.append(sample_next(out.logits[:, -1], settings.temperature, settings.top_p, generator))
        if step + 1 < settings.new_tokens:
            out = model(input_ids=tokens[-1][:, None], use_cache=True, **{cache_kw: returned_cache(out)})
    return torch.stack(tokens, dim=1)


def prompt_windows(data: np.ndarray | None, settings: TextSettings, start: list[int], rng: np.random.Generator) -> torch.Tensor:
    """``(batch_size, prompt_tokens)`` prompts: random windows of ``data``, or the start tokens alone."""
    if data is None:
        return torch.tensor([start] * settings.batch_size, dtype=torch.long)
    if len(data) <= settings.prompt_tokens:
        raise TeacherTextError(
            f"the prompt source has {len(data):,} tokens, too few for {settings.prompt_tokens}-token prompts; "
            "use a bigger source or fewer --prompt-tokens"
        )
    starts = rng.integers(0, len(data) - settings.prompt_tokens, size=settings.batch_size)
    return torch.from_numpy(np.stack([data[s : s + settings.prompt_tokens] for s in starts]).astype(np.int64))


def split_at_ends(ids: list[int], end_ids: set[int]) -> list[list[int]]:
    """The non-empty runs of ``ids`` between end-of-document tokens: after an end, the teacher
    starts a new document, which is as much its text as the first."""
    pieces, piece = [], []
    for token in ids:
        if token in end_ids:
            if piece:
                pieces.append(piece)
            piece = []
        else:
            piece.append(token)
    return pieces + ([piece] if piece else [])


def write_corpus(
    model: nn.Module,
    tokenizer,
    out: Path,
    settings: TextSettings,
    target_tokens: int,
    prompt_data: np.ndarray | None,
    end_ids: set[int],
    start: list[int],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Sample batches into ``out`` until its parts hold at least ``target_tokens`` new tokens.

    ``model`` is on its device in its sampling precision; ``start`` is the unconditional prompt
    (``prompt_data`` None); a row's tokens in ``end_ids`` separate its documents. Returns the new tokens
    the corpus holds.
    """
    counts = open_corpus(out, settings)
    done = sum(counts)
    device = model_device(model)
    while done < target_tokens:
        index = len(counts)
        rng = np.random.default_rng([settings.seed, index])
        prompts = prompt_windows(prompt_data, settings, start, rng)
        generator = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
        rows = sample_rows(model, prompts.to(device), settings, generator).cpu().tolist()
        lines, kept = [], 0
        for row, (prompt, ids) in enumerate(zip(prompts.tolist(), rows)):
            prompt_text = tokenizer.decode(prompt) if prompt_data is not None else ""
            for piece_index, piece in enumerate(split_at_ends(ids, end_ids)):
                lines.append(json.dumps({"id": f"{index:05d}-{row:03d}-{piece_index}", "text": tokenizer.decode(piece),
                                         "prompt": prompt_text if piece_index == 0 else "",
                                         "new_tokens": len(piece)}, ensure_ascii=False))
                kept += len(piece)
        write_text_atomic(part_path(out, index), "\n".join(lines) + "\n")
        counts.append(kept)
        done += kept
        if progress is not None:
            progress(done, target_tokens)
    return done

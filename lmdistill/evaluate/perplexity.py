"""Token-level perplexity of a causal LM over one token stream (sliding-window protocol).

The protocol is the "sliding window" strategy of the Hugging Face transformers perplexity
guide (https://huggingface.co/docs/transformers/perplexity), with exact token counting:

* The stream is one 1-D sequence of token ids (documents already joined with EOS by the
  data pipeline, so a window's context may cross document boundaries). With
  ``max_tokens`` only its first ``max_tokens`` ids are used.
* Windows start at ``0, stride, 2*stride, ...``; window ``k`` is
  ``tokens[begin_k : min(begin_k + window, n)]`` and the schedule stops at the first
  window that reaches the end of the stream.
* Each window scores only the tokens no earlier window scored, i.e. positions
  ``[end_{k-1}, end_k)``, each predicted from the tokens before it *inside that window*.
  A window's first position has nothing before it inside the window, so it is never a
  target. Hence:

  - ``stride == window`` (disjoint windows): the first token of every window is not
    scored, so ``n - ceil(n / window)`` tokens are; token ``begin + j`` sees the ``j``
    tokens before it (1 <= j < window).
  - ``stride < window`` (overlapping windows): every token except the stream's first is
    scored exactly once (``n - 1`` tokens); beyond the first window each one sees between
    ``window - stride`` and ``window - 1`` tokens of context.

  (The guide's own loop subtracts one target per window even when windows overlap, so it
  slightly miscounts there; this module counts the targets actually scored.)
* ``nll_sum`` is the sum of natural-log negative log-likelihoods of the scored tokens,
  from logits upcast to float32 (float64 models stay float64) and accumulated in Python
  float64; ``perplexity = exp(nll_sum / tokens_scored)``. Token-level: not normalised per
  word or byte, so it only compares models that share a tokenizer.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..data.errors import DataError
from ..models.device import eval_mode, model_device
from ..models.errors import ModelError

__all__ = ["PerplexityProtocol", "PerplexityResult", "perplexity"]


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class PerplexityProtocol:
    """How a token stream is cut into windows and scored; see the module docstring."""

    window: int = 512
    """Tokens the model sees per forward pass; at most the model's context length."""
    stride: int | None = None
    """New tokens scored per window; None means ``window`` (disjoint windows)."""
    max_tokens: int | None = None
    """Use only the first N tokens of the stream; None means the whole stream."""
    batch_size: int = 4
    """Windows of equal length run together in one forward pass."""

    def __post_init__(self) -> None:
        if not _is_int(self.window) or self.window < 2:
            raise ValueError(f"window must be an integer >= 2, got {self.window!r}")
        if self.stride is not None and (
            not _is_int(self.stride) or not 1 <= self.stride <= self.window
        ):
            raise ValueError(
                f"stride must be None or an integer in [1, window={self.window}], "
                f"got {self.stride!r}"
            )
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 2):
            raise ValueError(
                f"max_tokens must be None or an integer >= 2 (one token predicts the next), "
                f"got {self.max_tokens!r}"
            )

    @property
    def effective_stride(self) -> int:
        return self.window if self.stride is None else self.stride

    def tokens_used(self, stream_tokens: int) -> int:
        """How many tokens of a stream of ``stream_tokens`` ids the protocol reads."""
        return stream_tokens if self.max_tokens is None else min(stream_tokens, self.max_tokens)

    def tokens_scored(self, stream_tokens: int) -> int:
        """Exact number of tokens scored on a stream of ``stream_tokens`` ids."""
        n = self.tokens_used(stream_tokens)
        return sum(end - first for _, end, first in _windows(n, self.window, self.effective_stride))

    def describe(self, stream_tokens: int | None = None) -> str:
        """The protocol in words; with ``stream_tokens``, also how many tokens get scored."""
        w, s = self.window, self.effective_stride
        text = f"token-level perplexity (natural log), windows of {w:,} tokens, stride {s:,}"
        if s == w:
            text += " (disjoint: the first token of each window is not scored)"
        else:
            text += (
                f" (sliding: each token scored once, with {w - s:,} to {w - 1:,} tokens of "
                "context after the first window)"
            )
        if self.max_tokens is None:
            text += ", whole stream"
        else:
            text += f", first {self.max_tokens:,} tokens of the stream"
        text += "; first token of the stream not scored"
        if stream_tokens is not None:
            used = self.tokens_used(stream_tokens)
            text += f"; {self.tokens_scored(stream_tokens):,} of {used:,} tokens scored"
        return text


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    """Total negative log-likelihood (nats) over the scored tokens."""
    tokens_scored: int
    seconds: float
    protocol: str
    """``PerplexityProtocol.describe(stream_tokens)`` of the run."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: np.ndarray | Tensor,
    protocol: PerplexityProtocol = PerplexityProtocol(),
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "",
    shard: tuple[int, int] = (0, 1),
) -> PerplexityResult:
    """Token-level perplexity of ``model`` on the 1-D id stream ``tokens``.

    Args:
        model: a causal LM called as ``model(input_ids=...)`` returning ``.logits``
            ``(batch, seq, vocab)``. Run in eval mode; each module's previous training
            mode is restored afterwards. The model is not moved.
        tokens: 1-D integer ids (numpy array of any integer dtype, or a torch tensor).
        protocol: windows, stride, truncation and batch size.
        device: where the input ids go; default: the device of the input embeddings.
        progress: show a tqdm bar (unit: scored tokens) labelled ``desc``.
        shard: ``(index, count)``: score only batches ``index, index + count, ...`` of the
            protocol's batches (one process's share under data parallelism). The result
            then covers that share; summing ``nll_sum`` and ``tokens_scored`` over the
            ``count`` shards gives the full stream's.

    Raises:
        ValueError: on a stream that is not 1-D integer ids, has fewer than 2 tokens or
            ids outside the model's vocabulary, or a window longer than the model's
            context, before any forward pass.
    """
    stream = _check_stream(tokens)
    stream_tokens = len(stream)
    n = protocol.tokens_used(stream_tokens)
    stream = stream[:n]
    _check_against_model(model, stream, protocol.window)
    if device is None:
        device = model_device(model)

    index, count = shard
    if not (_is_int(index) and _is_int(count) and 0 <= index < count):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
    windows = list(_windows(n, protocol.window, protocol.effective_stride))
    batches = [b for i, b in enumerate(_batches(windows, protocol.batch_size)) if i % count == index]
    total = sum(end - first for batch in batches for _, end, first in batch)
    start = time.perf_counter()
    nll_sum, scored = 0.0, 0
    with eval_mode(model):
        with tqdm(total=total, desc=desc or None, unit="tok", disable=not progress) as bar:
            for batch in batches:
                ids = torch.stack([_ids(stream, b, e) for b, e, _ in batch]).to(device)
                logits = model(input_ids=ids).logits  # (batch, window_len, vocab)
                batch_nll, batch_tokens = 0.0, 0
                for row, (begin, end, first) in enumerate(batch):
                    # Logit at window position j predicts token j + 1; targets are
                    # stream positions [first, end), window positions [first - begin, ...).
                    j0 = first - begin
                    pred = logits[row, j0 - 1 : end - begin - 1]
                    # Upcast one row at a time: never a float32 copy of the whole batch.
                    pred = pred.to(torch.float64 if pred.dtype == torch.float64 else torch.float32)
                    target = ids[row, j0:].to(pred.device)
                    batch_nll += F.cross_entropy(pred, target, reduction="sum").item()
                    batch_tokens += end - first
                del logits
                nll_sum += batch_nll
                scored += batch_tokens
                bar.update(batch_tokens)
                if progress:
                    bar.set_postfix(ppl=f"{math.exp(nll_sum / scored):.3f}")
    seconds = time.perf_counter() - start
    assert scored == total, (scored, total)
    return PerplexityResult(
        perplexity=math.exp(nll_sum / scored) if scored else float("nan"),
        nll_sum=nll_sum,
        tokens_scored=scored,
        seconds=seconds,
        protocol=protocol.describe(stream_tokens),
    )


# --------------------------------------------------------------------------- helpers


def _windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(begin, end, first_target)`` per window that scores at least one token.

    Mirrors the guide's loop: targets are ``[prev_end, end)``, except the window's own
    first position, which nothing inside the window predicts.
    """
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if end > first:  # a 1-token tail window (disjoint mode) scores nothing: skip it
            yield begin, end, first
        prev_end = end
        if end == n:
            break


def _batches(
    windows: list[tuple[int, int, int]], batch_size: int
) -> Iterator[list[tuple[int, int, int]]]:
    # Only equal-length windows share a batch, so no padding or attention mask is needed;
    # in practice only the last window can be shorter.
    batch: list[tuple[int, int, int]] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w[1] - w[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _ids(stream: np.ndarray | Tensor, begin: int, end: int) -> Tensor:
    # Convert per window: a uint16 shard of 100M tokens never becomes int64 all at once.
    chunk = stream[begin:end]
    if isinstance(chunk, Tensor):
        return chunk.to(torch.long)
    return torch.from_numpy(np.asarray(chunk, dtype=np.int64))


def _check_stream(tokens: np.ndarray | Tensor) -> np.ndarray | Tensor:
    if isinstance(tokens, Tensor):
        ok = not tokens.dtype.is_floating_point and not tokens.dtype.is_complex
        ok = ok and tokens.dtype != torch.bool
        stream: np.ndarray | Tensor = tokens.detach().cpu()
        dtype = str(tokens.dtype)
    else:
        stream = np.asarray(tokens)
        ok = np.issubdtype(stream.dtype, np.integer)
        dtype = str(stream.dtype)
    if not ok:
        raise ValueError(f"tokens must be integer token ids, got dtype {dtype}")
    if stream.ndim != 1:
        raise ValueError(
            f"tokens must be a 1-D stream of ids, got shape {tuple(stream.shape)}; "
            "join documents with EOS and flatten first"
        )
    if len(stream) < 2:
        raise DataError(f"the text tokenises to {len(stream)} token(s); scoring needs at least 2 (one token "
                        "predicts the next); pass a longer text")
    return stream


def _check_against_model(model: torch.nn.Module, stream: np.ndarray | Tensor, window: int) -> None:
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and window > context:
        raise ModelError(
            f"window={window} exceeds the model's context of {context} tokens; "
            f"use window <= {context}"
        )
    vocab = None
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if isinstance(emb, torch.nn.Embedding):
        vocab = emb.num_embeddings
    lo, hi = int(stream.min()), int(stream.max())
    if lo < 0:
        raise ValueError(f"token ids must be >= 0, got a minimum of {lo}")
    if vocab is not None and hi >= vocab:
        raise ModelError(
            f"token id {hi} is outside the model's vocabulary of {vocab}; "
            "was the stream tokenised with another tokenizer?"
        )



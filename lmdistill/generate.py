"""Text generation from a teacher or student, greedy or sampled, optionally streamed.

Decoding goes through ``model.generate`` so it uses the model's KV cache and the same logits
processors as every other Hugging Face tool; we only pin each knob explicitly, because a
``None`` would otherwise be filled in from the model's own ``generation_config`` (GPT-2's
hub config, for instance, would silently add ``top_k=50``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from .errors import LmdistillError
from .models.device import eval_mode, model_device

__all__ = ["SamplingConfig", "SamplingError", "check_length", "check_prompt_fits", "continuation_text", "generate",
           "generate_ids", "encode_prompt"]


class SamplingError(LmdistillError):
    """A sampling setting or a prompt that cannot be used; the message names the setting and the fix."""


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token.

    ``max_new_tokens``: at most this many tokens are generated (fewer if EOS comes first).
    ``temperature``: 0 means greedy (argmax); above 0 samples from softmax(logits / T).
    ``top_k``: sample only among the k most likely tokens (None: no limit; sampling only).
    ``top_p``: nucleus sampling, the smallest set with this much probability (None: off).
    ``repetition_penalty``: >1 discourages tokens already in the prompt or output (CTRL-style;
    applied in greedy mode too).
    ``seed``: makes sampling reproducible; the global RNG state is restored afterwards.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _finite_number(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise SamplingError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (not _finite_number(self.top_p) or not 0 < self.top_p <= 1):
            raise SamplingError(f"top_p must be None or a number in (0, 1], got {self.top_p!r}")
        if not _finite_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SamplingError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generation_config(self, eos_token_id: int | list[int] | None, pad_token_id: int | None) -> GenerationConfig:
        """The transformers equivalent, with every sampling knob set so no model default leaks in."""
        sampling = {}
        if not self.greedy:
            # top_k=0 and top_p=1.0 are transformers' "off" values; None would mean "use the default".
            sampling = dict(temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p or 1.0)
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=not self.greedy,
            num_beams=1,
            repetition_penalty=self.repetition_penalty,
            eos_token_id=eos_token_id,
            # GPT-2 has no pad token; reusing EOS silences the warning and is harmless at batch 1.
            pad_token_id=pad_token_id if pad_token_id is not None else _first(eos_token_id),
            use_cache=True,
            **sampling,
        )


def _finite_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _first(ids: int | list[int] | None) -> int | None:
    return ids[0] if isinstance(ids, (list, tuple)) and ids else ids if isinstance(ids, int) else None


def model_eos_token_id(model) -> int | list[int] | None:
    """EOS from the model's generation config, else its config (None when it has neither)."""
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return eos
    return None


def check_length(model: nn.Module, prompt_tokens: int, new_tokens: int) -> None:
    """Fail before any work when prompt + output would run past the model's positions."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_tokens + new_tokens > limit:
        raise SamplingError(
            f"a {prompt_tokens}-token prompt plus {new_tokens} new tokens exceeds the model's "
            f"{limit} positions; shorten the prompt or ask for at most {max(limit - prompt_tokens, 0)} new tokens "
            f"(--max-new-tokens)"
        )


def check_prompt_fits(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> None:
    """Fail before any output when ``prompt`` plus ``max_new_tokens`` would not fit ``model``."""
    check_length(model, len(encode_prompt(tokenizer, prompt)), max_new_tokens)


# --------------------------------------------------------------------------- decoding


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add after the prompt.

    Decoded together with the prompt and cut after it, because some tokenizers (SentencePiece
    ones) drop a token's leading space when it is decoded alone. Special tokens (EOS) are
    left out.
    """
    kwargs = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    head = tokenizer.decode(prompt_ids, **kwargs)
    full = tokenizer.decode(list(prompt_ids) + list(new_ids), **kwargs)
    if full.startswith(head):
        return full[len(head):]
    # The last prompt bytes and the first new ones merged into one character; no clean cut.
    return tokenizer.decode(new_ids, **kwargs)


class _CallbackStreamer(BaseStreamer):
    """Hands ``stream`` the text that each new token adds, once it is stable.

    It re-decodes the whole continuation each time (cheap next to a forward pass) and emits
    only what extends the text already emitted, holding back a trailing U+FFFD: that is a
    multi-byte character whose remaining bytes are still to come. ``end`` flushes the rest,
    so the pieces join up to :func:`continuation_text` of the finished output.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stream: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.stream = stream
        self.new_ids: list[int] = []
        self.emitted = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first pushes the prompt itself
            self.prompt_seen = True
            return
        if value.dim() > 1:
            if value.shape[0] != 1:
                raise ValueError("streaming supports batch size 1 only")
            value = value[0]
        self.new_ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = continuation_text(self.tokenizer, self.prompt_ids, self.new_ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def end(self) -> None:
        self._emit(continuation_text(self.tokenizer, self.prompt_ids, self.new_ids))

    def _emit(self, text: str) -> None:
        # A decoder that rewrote already-emitted text cannot be taken back; skip until it extends again.
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            piece, self.emitted = text[len(self.emitted):], text
            self.stream(piece)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as the model sees them (special tokens added); BOS alone for an empty prompt."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if ids:
        return list(ids)
    # An empty prompt: start from BOS (GPT-2's <|endoftext|>), as unconditional sampling does.
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise SamplingError("the prompt is empty and the tokenizer has no BOS or EOS token to start from; pass some text")
    return [start]


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids: torch.Tensor,
    config: SamplingConfig = SamplingConfig(),
    streamer: BaseStreamer | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """New token ids, shape ``(n,)`` with ``n <= config.max_new_tokens``, for a ``(1, P)`` prompt.

    EOS, if it ends the output, is included. ``eos_token_id`` defaults to the model's.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must have shape (1, P) with P >= 1, got {tuple(prompt_ids.shape)}")
    check_length(model, prompt_ids.shape[1], config.max_new_tokens)
    if eos_token_id is None:
        eos_token_id = model_eos_token_id(model)
    if pad_token_id is None:
        pad_token_id = getattr(model.generation_config, "pad_token_id", None)
    gen_config = config.generation_config(eos_token_id, pad_token_id)
    device = model_device(model)
    input_ids = prompt_ids.to(device)
    # transformers samples with the global RNG; fork it so seeding here leaves the caller's untouched.
    fork_devices = [device] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=gen_config,
            streamer=streamer,
        )
    return out[0, input_ids.shape[1]:].cpu()


def generate(
    model,
    tokenizer,
    prompt: str,
    config: SamplingConfig = SamplingConfig(),
    stream: Callable[[str], None] | None = None,
) -> str:
    """Continuation text of ``prompt`` (without the prompt), using the model's KV cache.

    If ``stream`` is given, it receives the text in pieces as tokens are produced; the pieces
    concatenate to the returned string. The model is put in eval mode for the call and
    restored afterwards. (Speed is measured apart, by :mod:`lmdistill.measure.speed`.)
    """
    ids = encode_prompt(tokenizer, prompt)
    streamer = _CallbackStreamer(tokenizer, ids, stream) if stream is not None else None
    model_eos = model_eos_token_id(model)
    new_ids = generate_ids(
        model,
        torch.tensor([ids], dtype=torch.long),
        config,
        streamer=streamer,
        eos_token_id=model_eos if model_eos is not None else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return continuation_text(tokenizer, ids, new_ids.tolist())

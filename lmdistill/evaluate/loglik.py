"""Log-likelihood primitives of a causal LM, computed as lm-evaluation-harness's ``HFLM`` does.

Mirrors lm-evaluation-harness 0.4.13 (``lm_eval/models/huggingface.py`` class ``HFLM`` and
``lm_eval/api/model.py`` class ``TemplateLM``) so that numbers reported here can be set next
to ``lm_eval --model hf`` numbers for the same model:

* ``max_length`` -- ``HFLM.max_length`` / ``models.utils.resolve_max_length``: the first of
  ``config.n_positions``, ``config.max_position_embeddings``, ``config.n_ctx`` that is set
  (on ``config.text_config`` when the config nests one), else ``tokenizer.model_max_length``
  unless it is transformers' "unset" sentinel (``1000000000000000019884624838656``), else 2048.
* ``prefix_token_id`` -- ``HFLM.prefix_token_id``: the tokenizer's BOS id, else its EOS id
  (GPT-2: both are ``<|endoftext|>`` = 50256). It conditions an empty context and the first
  rolling window.
* Tokenisation -- ``HFLM.tok_encode``: ``tokenizer.encode(text)`` with the tokenizer's own
  special-token default (a Llama tokenizer adds BOS, GPT-2's adds nothing), except that a text
  already starting with the decoded prefix token gets ``add_special_tokens=False``.
* ``encode_pair`` -- ``TemplateLM._encode_pair``: trailing whitespace of the context moves to
  the front of the continuation; ``context + continuation`` is encoded as one string and split
  after ``len(encode(context))`` tokens (so a merge across the boundary is attributed by
  count, not by token identity).
* ``loglikelihood`` -- ``TemplateLM.loglikelihood`` + ``HFLM._loglikelihood_tokens``: an empty
  context becomes ``[prefix_token_id]`` (or, when the continuation's first token *is* the
  prefix token, that first token becomes the context); the model input is
  ``(context + continuation)[-(max_length + 1):][:-1]`` (left truncation); the result is the
  sum of the log-probabilities of the continuation tokens and whether every one of them is the
  argmax of its distribution. Requests run sorted by descending total length (the harness's
  ``Collator`` order), right-padded with id 0 and without an attention mask (causal, so the
  padding never influences the scored positions), and come back in request order.
* ``loglikelihood_rolling`` -- ``HFLM.loglikelihood_rolling``: the whole text's tokens are cut
  by ``utils.get_rolling_token_windows(tokens, prefix_token_id, max_seq_len=max_length,
  context_len=1)`` and each window made disjoint by ``utils.make_disjoint_window``; every token
  of the text is scored exactly once, the first window's from the prefix token onwards, each
  later window's with the ``max_length`` tokens before its last target as input. The result is
  the sum over windows.

One deliberate difference: log-softmax runs in float32 (float64 for a float64 model) on the
scored positions only. The harness's default (``softmax_dtype=None``) runs it in the model's
dtype over the whole padded batch; for float32 models the two agree to rounding, for
bfloat16/float16 models ours is the more accurate one.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.errors import DataError
from ..models.device import eval_mode, model_device
from ..models.errors import ModelError

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "TOKENIZER_INFINITY",
    "encode_pair",
    "get_rolling_token_windows",
    "loglikelihood",
    "loglikelihood_rolling",
    "make_disjoint_window",
    "max_length",
    "prefix_token_id",
    "rolling_requests",
    "score_token_requests",
    "tok_encode",
]

DEFAULT_MAX_LENGTH = 2048
"""The harness's fallback context length (``lm_eval.defaults.DEFAULT_MAX_LENGTH``)."""
TOKENIZER_INFINITY = 1000000000000000019884624838656
"""transformers' ``model_max_length`` for "not set" (``VERY_LARGE_INTEGER``)."""

TokenRequest = tuple[list[int], list[int]]
"""``(context_tokens, continuation_tokens)``, both non-empty."""


# --------------------------------------------------------------------------- model facts


def max_length(model: torch.nn.Module, tokenizer) -> int:
    """Context length the harness uses for ``model`` (see the module docstring)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max != TOKENIZER_INFINITY:
        return int(model_max)
    return DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer) -> int:
    """BOS, else EOS: what conditions an empty context and the first rolling window."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is None:
        raise ModelError(
            "the tokenizer has neither a BOS nor an EOS token; the harness protocol needs one "
            "to condition the first token (set tokenizer.eos_token)"
        )
    return int(tokenizer.eos_token_id)


# --------------------------------------------------------------------------- tokenisation


def tok_encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """``HFLM.tok_encode`` (without its ``add_bos_token`` / truncation options)."""
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    # A text that already starts with the prefix token must not get a second one.
    if add_special_tokens is None and text.startswith(tokenizer.decode(prefix_token_id(tokenizer))):
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``TemplateLM._encode_pair``: tokens of ``context`` and of ``continuation`` after it.

    ``context`` must be non-empty (``loglikelihood`` handles the empty case).
    """
    if not context:
        raise ValueError("context must be non-empty; loglikelihood() handles an empty context")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        # "Q: x " + "y" is scored as "Q: x" + " y": BPE tokenizers attach the space to the word.
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation)
    context_enc = tok_encode(tokenizer, context)
    return context_enc, whole[len(context_enc):]


def _request_tokens(tokenizer, context: str, continuation: str) -> TokenRequest:
    """``TemplateLM.loglikelihood``'s per-request encoding, including the empty-context rule."""
    if context == "":
        cont = tok_encode(tokenizer, continuation, add_special_tokens=False)
        if not cont:
            raise DataError(f"continuation {continuation!r} encodes to no tokens; nothing to score (fix that item "
                            "of the task's data)")
        prefix = prefix_token_id(tokenizer)
        ctx, cont = ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    else:
        ctx, cont = encode_pair(tokenizer, context, continuation)
    if not cont:
        raise DataError(
            f"continuation {continuation!r} after context {context[-40:]!r} encodes to no tokens; "
            "nothing to score (fix that item of the task's data)"
        )
    return ctx, cont


def get_rolling_token_windows(
    token_list: list[int], prefix_token: int, max_seq_len: int, context_len: int
) -> Iterator[tuple[list[int], list[int]]]:
    """``lm_eval.utils.get_rolling_token_windows``: ``(input_tokens, pred_tokens)`` per window.

    The first window predicts the first ``max_seq_len`` tokens from ``[prefix] + tokens``; each
    later one predicts up to ``max_seq_len - context_len + 1`` new tokens from the
    ``max_seq_len`` tokens before its last target. Only the last ``len(pred_tokens)`` logits
    of a window are scored.
    """
    if not 1 <= context_len <= max_seq_len:
        raise ValueError(f"need 1 <= context_len <= max_seq_len, got {context_len}, {max_seq_len}")
    if not token_list:
        return
    pred_len = max_seq_len - context_len + 1
    first_seq_len = min(max_seq_len, len(token_list))
    yield [prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len]
    predicted = first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (
            token_list[window_end - max_seq_len - 1 : window_end - 1],
            token_list[window_end - window_pred_len : window_end],
        )
        predicted += window_pred_len


def make_disjoint_window(pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """``lm_eval.utils.make_disjoint_window``: drop the context tokens the targets repeat."""
    a, b = pair
    return a[: len(a) - (len(b) - 1)], b


def rolling_requests(tokenizer, text: str, max_len: int) -> list[TokenRequest]:
    """The disjoint rolling windows of ``text`` as token requests (empty text: none)."""
    tokens = tok_encode(tokenizer, text)
    return [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(tokens, prefix_token_id(tokenizer), max_len, context_len=1)
    ]


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_token_requests(
    model: torch.nn.Module,
    requests: Sequence[TokenRequest],
    max_len: int,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """``HFLM._loglikelihood_tokens`` on token requests: ``(sum log p(cont), all greedy)`` each.

    Raises ``ValueError`` before any forward pass on an empty context or continuation, or a
    continuation longer than ``max_len`` (the harness asserts the same).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_len < 1:
        raise ValueError(f"max_length must be >= 1, got {max_len}")
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("every request needs a non-empty context and continuation")
        if len(cont) > max_len:
            raise DataError(
                f"a continuation of {len(cont)} tokens exceeds max_length={max_len}; "
                "the harness cannot score it in one window"
            )
    # The harness's Collator order: longest first (OOMs show at once, batches pad little),
    # ties broken by the tokens themselves so the order is deterministic.
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0]) - len(requests[i][1]),
                                                        tuple(requests[i][0] + requests[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    device = model_device(model)
    with eval_mode(model):
        with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                # Left truncation to max_len + 1 tokens; the last token is only a target.
                inps = [(requests[i][0] + requests[i][1])[-(max_len + 1):][:-1] for i in chunk]
                ids = torch.zeros((len(chunk), max(len(x) for x in inps)), dtype=torch.long)
                for row, inp in enumerate(inps):
                    ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                logits = model(input_ids=ids.to(device)).logits  # (batch, seq, vocab)
                for row, i in enumerate(chunk):
                    cont = requests[i][1]
                    inplen, contlen = len(inps[row]), len(cont)
                    # Logits at input positions [inplen - contlen, inplen) predict the continuation.
                    pred = logits[row, inplen - contlen : inplen]
                    pred = pred.to(torch.float64 if pred.dtype == torch.float64 else torch.float32)
                    logp = F.log_softmax(pred, dim=-1)
                    target = torch.tensor(cont, dtype=torch.long, device=logp.device)
                    greedy = bool((logp.argmax(dim=-1) == target).all())
                    results[i] = (float(logp.gather(-1, target[:, None]).sum()), greedy)
                del logits
                bar.update(len(chunk))
    return results  # type: ignore[return-value]


def loglikelihood(
    model: torch.nn.Module,
    tokenizer,
    requests: list[tuple[str, str]],
    batch_size: int = 8,
    progress: bool = False,
    *,
    max_length: int | None = None,
) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), is_greedy)`` per ``(context, continuation)`` request.

    The harness's ``loglikelihood`` request type (see the module docstring); ``max_length``
    overrides the model's context length (as ``lm_eval --model_args max_length=N`` does).
    """
    max_len = _resolve_max_length(model, tokenizer, max_length)
    tokens = [_request_tokens(tokenizer, ctx, cont) for ctx, cont in requests]
    return score_token_requests(model, tokens, max_len, batch_size, progress, desc="loglikelihood")


def loglikelihood_rolling(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str],
    batch_size: int = 8,
    progress: bool = False,
    *,
    max_length: int | None = None,
) -> list[float]:
    """Log-likelihood of each whole text, every token scored once (harness rolling windows)."""
    max_len = _resolve_max_length(model, tokenizer, max_length)
    per_text = [rolling_requests(tokenizer, text, max_len) for text in texts]
    flat = [w for windows in per_text for w in windows]
    scores = score_token_requests(model, flat, max_len, batch_size, progress, desc="rolling windows")
    out, k = [], 0
    for windows in per_text:
        # Summed window by window in order, as the harness does (an empty text sums to 0.0).
        out.append(sum((ll for ll, _ in scores[k : k + len(windows)]), 0.0))
        k += len(windows)
    return out


# --------------------------------------------------------------------------- helpers


def _resolve_max_length(model, tokenizer, override: int | None) -> int:
    if override is None:
        return max_length(model, tokenizer)
    if not isinstance(override, int) or isinstance(override, bool) or override < 1:
        raise ValueError(f"max_length must be None or an integer >= 1, got {override!r}")
    return override



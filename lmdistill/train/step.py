"""One optimiser step and one validation pass.

Gradient accumulation is normalised by the token count of the whole optimiser step (each
micro-batch's summed loss is divided by the step's token total), so 4 micro-batches of 1
sequence give the same update as 1 batch of 4.

Under torchrun (:mod:`lmdistill.dist`) every rank runs this on its own blocks: each
micro-batch's summed loss is divided by the rank's step tokens and DDP (or FSDP2) averages
the gradients over the ranks, which equals dividing by the global token count because every
rank has the same number of tokens. Logged values are sums over all ranks divided by the
global token count.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from .. import dist
from ..data.sampler import BlockSampler
from ..evaluate.perplexity import PerplexityProtocol, perplexity
from ..loss.objective import forward_model
from ..loss.terms import LossOutput
from ..teacher_cache.reader import TeacherTargets
from .health import check_finite_step
from .setup import Setup


def forward_teacher(teacher: PreTrainedModel | None, input_ids: torch.Tensor, want_hidden: bool, fused: bool = False,
                    want_layers: bool = True):
    """Teacher logits (None when ``fused``) and hidden states (all if asked, else the last when fused;
    fused, all only with ``want_layers``)."""
    if teacher is None:
        return None, None
    with torch.no_grad():
        return forward_model(teacher, input_ids, want_hidden, fused, want_layers)


def step_loss(setup: Setup, input_ids: torch.Tensor, labels: torch.Tensor,
              cached: TeacherTargets | None = None, mask: torch.Tensor | None = None) -> LossOutput:
    """The weighted loss of one micro-batch (summed over tokens), through the fused path when set;
    with ``cached`` teacher targets the ``kl`` term is the sparse KL against them; with ``mask``
    (an on-policy batch) the logit divergence alone, on the positions it keeps. The teacher
    runs here (no gradients), the student and the loss in ``setup.objective``."""
    if cached is not None:
        total, terms = setup.objective(input_ids, labels, cached=cached)
        return LossOutput(total=total, terms=terms)
    loss = setup.config.loss
    fused = setup.fused
    want_hidden = (loss.needs_hidden or loss.needs_layers) and mask is None
    teacher_logits, teacher_states = forward_teacher(setup.teacher, input_ids, want_hidden, fused,
                                                     loss.needs_layers and mask is None)
    teacher_head = None
    if fused and loss.kl > 0:
        t_head = setup.teacher.get_output_embeddings()
        teacher_head = (t_head.weight, t_head.bias)
    total, terms = setup.objective(input_ids, labels, teacher_logits=teacher_logits, teacher_states=teacher_states,
                                   teacher_head=teacher_head, mask=mask)
    return LossOutput(total=total, terms=terms)


def next_micro_batch(setup: Setup, sampler: BlockSampler, tokens: np.ndarray) -> tuple:
    """``(input_ids, labels)``, plus the blocks' stored teacher targets when the run has a cache."""
    if setup.teacher_cache is None:
        return sampler.next_batch(tokens)
    input_ids, labels, blocks = sampler.next_indexed_batch(tokens)
    return input_ids, labels, setup.teacher_cache.targets(blocks, setup.config.loss.temperature)


def train_step(setup: Setup, optimizer: torch.optim.Optimizer, micro_batches: list[tuple]) -> dict[str, float]:
    """One optimiser step over ``micro_batches`` (``(input_ids, labels)`` or ``(input_ids, labels,
    TeacherTargets)``); returns per-token loss terms (over all ranks), the grad norm and the
    step's token count (all ranks).

    Under DDP the gradients are all-reduced once, in the backward pass of the last
    micro-batch; each rank divides by its own step tokens and DDP averages over the ranks,
    which is the global per-token mean since every rank has the same token count. Under fp16
    a gradient scaler scales the loss and skips steps whose gradients overflow.
    """
    objective, scaler = setup.objective, setup.scaler
    step_tokens = sum(counted_positions(batch) for batch in micro_batches)  # this rank's
    seen_tokens = sum(batch[1].numel() for batch in micro_batches)
    sums: dict[str, torch.Tensor] = {}
    objective.train()
    optimizer.zero_grad(set_to_none=True)
    for i, (input_ids, labels, *extra) in enumerate(micro_batches):
        input_ids, labels = input_ids.to(setup.device), labels.to(setup.device)
        cached = extra[0].to(setup.device) if extra and extra[0] is not None else None
        mask = extra[1].to(setup.device) if len(extra) > 1 and extra[1] is not None else None
        with dist.grad_sync(objective, sync=i == len(micro_batches) - 1):
            with setup.autocast_context():
                loss = step_loss(setup, input_ids, labels, cached, mask)
            scaled = loss.total / step_tokens
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        # float64 sums on the device: one host sync per step instead of one per micro-batch and term
        for name, value in (("loss", loss.total), *loss.terms.items()):
            sums[name] = sums.get(name, 0.0) + value.detach().double()
    names = list(sums)
    totals = dict(zip(names, torch.stack([sums[n] for n in names]).tolist())) if names else {}
    totals = dist.sum_across({**totals, "tokens": float(step_tokens), "seen": float(seen_tokens)}, setup.ranks,
                             setup.device)
    all_tokens, all_seen = totals.pop("tokens"), totals.pop("seen")
    metrics = {name: total / all_tokens for name, total in totals.items()}
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in setup.student.parameters() if p.grad is not None]
    max_norm = setup.config.train.max_grad_norm
    grad_norm = dist.local_value(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
    grad_norm = grad_norm.item()
    # Checked before the weights change, so a fault never reaches them (or a checkpoint). Under
    # fp16 the scaler itself skips steps whose gradients overflowed.
    check_finite_step(setup, metrics, grad_norm if scaler is None else 0.0)
    if scaler is not None:
        scaler.step(optimizer)  # skipped (and the scale lowered) when the gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    # Freed now, not at the next step's start: validation and checkpoints between steps then
    # run without a second copy of the student's size (the gradients) held for nothing.
    optimizer.zero_grad(set_to_none=True)
    metrics["grad_norm"] = grad_norm
    if scaler is not None:
        metrics["loss_scale"] = scaler.get_scale()
    metrics["tokens"] = int(all_seen)
    return metrics


def counted_positions(batch: tuple) -> int:
    """Positions a micro-batch's loss counts: every label, or those its mask (4th item) keeps."""
    mask = batch[3] if len(batch) > 3 else None
    return int(mask.sum()) if mask is not None else batch[1].numel()


class _LogitsOnly(nn.Module):
    """The objective seen as a causal LM (``model(input_ids=...).logits``) for the perplexity code."""

    def __init__(self, objective: nn.Module, student: PreTrainedModel) -> None:
        super().__init__()
        self.objective = objective
        self.config = student.config
        self._embeddings = [student.get_input_embeddings()]  # a list: not registered twice

    def get_input_embeddings(self) -> nn.Module:
        return self._embeddings[0]

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        return SimpleNamespace(logits=self.objective(input_ids, logits_only=True))


def validate(setup: Setup, tokens: np.ndarray) -> dict[str, float]:
    """Student perplexity on the first ``train.eval_tokens`` validation tokens (disjoint windows).

    Under DDP the ranks share the batches of windows (the inner module runs, so no collective
    is involved in the forward passes) and sum their totals; under FSDP2 every rank computes
    all of it, since every rank must take part in each forward pass.
    """
    protocol = PerplexityProtocol(
        window=setup.config.data.block_size,
        max_tokens=min(len(tokens), setup.config.train.eval_tokens + 1),
        batch_size=setup.config.train.batch_size,
    )
    model = _LogitsOnly(dist.unwrap(setup.objective), setup.student)
    ranks = setup.ranks
    split = ranks.enabled and not dist.is_sharded(setup.objective)
    shard = (ranks.rank, ranks.world_size) if split else (0, 1)
    with setup.autocast_context():
        result = perplexity(model, tokens, protocol, device=setup.device, shard=shard)
    dist.reshard(setup.objective)
    totals = {"nll": result.nll_sum, "tokens": result.tokens_scored}
    if split:
        totals = dist.sum_across(totals, ranks, setup.device)
    val_loss = totals["nll"] / totals["tokens"]
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_tokens": int(totals["tokens"])}

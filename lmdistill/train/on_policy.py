"""On-policy distillation (GKD: Agarwal et al., 2024): some steps train on the student's own samples.

With ``loss.on_policy_fraction`` = lambda, each optimiser step is on-policy with probability
lambda. Such a step keeps the first ``loss.on_policy_prompt_tokens`` of each block as the
prompt, lets the student sample the rest of the block (with the KV cache, at
``loss.on_policy_temperature``, dropout off), and trains the logit divergence between teacher
and student on the sampled tokens only: the student learns where its own mistakes take it,
which teacher-forced data never shows it. The choice of steps and the samples are seeded by
``(train.seed, step, micro-batch)``, so every rank agrees and a resumed run repeats them.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel

from ..config import RunConfig
from ..measure.speed import cache_kwarg, last_logits_only, returned_cache
from ..models.device import eval_mode
from .setup import Setup

_STREAM = 0x6F6E  # a fixed word in the seed, so these draws never share a stream with other seeded ones


def is_on_policy_step(config: RunConfig, step: int) -> bool:
    """Whether optimiser step ``step`` (1-based) trains on the student's samples."""
    fraction = config.loss.on_policy_fraction
    if fraction <= 0:
        return False
    return fraction >= 1 or np.random.default_rng([config.train.seed, step, _STREAM]).random() < fraction


def sample_generator(config: RunConfig, step: int, micro_batch: int, rank: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.default_rng([config.train.seed, step, micro_batch, rank, _STREAM])
                              .integers(0, 2**63 - 1)))
    return generator


def on_policy_batches(setup: Setup, batches: list[tuple], step: int) -> list[tuple]:
    """``batches`` with the student's continuations: ``(input_ids, labels, None, mask)`` each."""
    loss = setup.config.loss
    out = []
    for index, (input_ids, labels, *_) in enumerate(batches):
        generator = sample_generator(setup.config, step, index, setup.ranks.rank, setup.device)
        with setup.autocast_context():
            ids, continued, mask = student_continuations(setup.student, input_ids.to(setup.device),
                                                         labels.to(setup.device), loss.on_policy_prompt_tokens,
                                                         loss.on_policy_temperature, generator)
        out.append((ids, continued, None, mask))
    return out


@torch.no_grad()
def student_continuations(student: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor, prompt_tokens: int,
                          temperature: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks with everything after their first ``prompt_tokens`` sampled by ``student``:
    ``(input_ids, labels, mask)``, ``mask`` marking the positions whose label was sampled."""
    sequence = torch.cat([input_ids, labels[:, -1:]], dim=1)  # the block and its last label: length + 1
    rows, length = sequence.shape
    pieces = [sequence[:, :prompt_tokens]]
    with eval_mode(student):
        out = student(input_ids=pieces[0], use_cache=True, **last_logits_only(student))
        for position in range(prompt_tokens, length):
            probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
            pieces.append(torch.multinomial(probs, 1, generator=generator))
            if position + 1 < length:
                out = student(input_ids=pieces[-1], use_cache=True, **{cache_kwarg(student): returned_cache(out)},
                              **last_logits_only(student))
    sampled = torch.cat(pieces, dim=1)
    mask = torch.zeros(rows, length - 1, dtype=torch.bool, device=sampled.device)
    mask[:, prompt_tokens - 1:] = True  # label t is token t + 1: sampled from position prompt_tokens on
    return sampled[:, :-1].contiguous(), sampled[:, 1:].contiguous(), mask

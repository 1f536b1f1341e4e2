"""Deterministic, resumable, rank-aware batches of token blocks.

Block ``i`` is the window ``tokens[i*B : i*B + B + 1]`` (B = block_size): the first B tokens
are the input, the last B the labels, so that consecutive blocks share one token and every
token but the first is a label exactly once per epoch. Each epoch visits all
``(num_tokens - 1) // B`` blocks in a permutation seeded by ``(seed, epoch)``; rank ``r`` of
``world_size`` takes positions ``r, r + world_size, ...`` of it, after dropping the remainder
so that all ranks see the same number of blocks (DDP ranks must step together).

With ``repeats`` (one ``(tokens, repeat)`` pair per source, in the order the sources were
prepared into the split), an epoch holds each source's blocks ``repeat`` times: an integer part
as whole copies, a fraction as that share of the source's blocks drawn afresh each epoch (so a
small source, such as teacher-written text, can weigh more than its size, or a large one less).
A block belongs to the source its first token comes from. Without ``repeats``, or with every
repeat 1, an epoch is one permutation of all blocks.

The sampler's position is two integers (epoch, index into this rank's blocks), identical on
every rank, so rank 0's ``state_dict`` resumes every rank.

Data parallelism sees the same blocks as one process: in each micro-batch rank ``r`` takes
``batch_size`` consecutive positions of its stride, so the ``world_size`` ranks together take
the ``world_size * batch_size`` consecutive positions ``p, p+1, ...`` of the permutation that
one process with a batch of ``world_size * batch_size`` would take (the rows in another order).
The epochs differ only when ``world_size`` does not divide the number of blocks: then the last
``num_blocks % world_size`` positions of each epoch's permutation are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmdistill.data.errors import DataError

_STATE_VERSION = 1


class BlockSampler:
    """Batches of ``(input_ids, labels)``, each ``(batch_size, block_size)`` int64."""

    def __init__(self, num_tokens: int, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 repeats: Sequence[tuple[int, float]] | None = None) -> None:
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        num_blocks = max(num_tokens - 1, 0) // block_size
        if num_blocks < world_size:
            need = world_size * block_size + 1
            raise DataError(
                f"the split has {num_tokens:,} tokens, fewer than the {need:,} that "
                f"{world_size} rank(s) x one block of {block_size} (+1) need; use a smaller block "
                "size or add more data"
            )
        self.num_tokens = num_tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_blocks = num_blocks
        self.repeats = _check_repeats(repeats, num_tokens)
        self._sources = _source_blocks(self.repeats, block_size, num_blocks)
        self._plain = self.repeats is None or all(r == 1 for _, r in self.repeats)  # every block once: as without
        self.epoch_size = num_blocks if self.repeats is None else sum(
            int(r) * (end - first) + round((r % 1) * (end - first)) for first, end, r in self._sources)
        if self.epoch_size < world_size:
            raise DataError(f"the repeats leave {self.epoch_size} block(s) an epoch, fewer than the {world_size} "
                            "rank(s); raise data.repeats")
        self.blocks_per_epoch = self.epoch_size // world_size  # per rank
        self._epoch = 0
        self._pos = 0  # index into this rank's blocks of the current epoch
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        """The epoch the next block comes from (0-based)."""
        return self._epoch

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.block_size

    def _rank_blocks(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.num_blocks) if self._plain else self._weighted_epoch(rng)
            self._order = perm[: self.blocks_per_epoch * self.world_size][self.rank :: self.world_size]
            self._order_epoch = epoch
        return self._order

    def _weighted_epoch(self, rng: np.random.Generator) -> np.ndarray:
        pool = []
        for first, end, repeat in self._sources:
            blocks = np.arange(first, end)
            pool += [blocks] * int(repeat)
            pool.append(rng.choice(blocks, size=round((repeat % 1) * len(blocks)), replace=False))
        pool = np.concatenate(pool)
        return pool[rng.permutation(len(pool))]

    def _next_blocks(self) -> np.ndarray:
        picked = []
        needed = self.batch_size
        while needed:
            blocks = self._rank_blocks(self._epoch)
            take = blocks[self._pos : self._pos + needed]
            picked.append(take)
            needed -= len(take)
            self._pos += len(take)
            if self._pos == len(blocks):
                self._epoch += 1
                self._pos = 0
        return np.concatenate(picked)

    def next_batch(self, tokens: np.ndarray) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The next ``(input_ids, labels)`` from ``tokens`` (the split this sampler was made for)."""
        input_ids, labels, _ = self.next_indexed_batch(tokens)
        return input_ids, labels

    def next_indexed_batch(self, tokens: np.ndarray) -> tuple[torch.LongTensor, torch.LongTensor, np.ndarray]:
        """Like :meth:`next_batch`, plus the block indices ``(batch_size,)`` the rows come from
        (row ``r``'s input is ``tokens[b*B : b*B + B]`` for ``b = blocks[r]``), for looking up
        data stored per block such as a teacher cache. Advances the sampler the same way."""
        if len(tokens) != self.num_tokens:
            raise DataError(
                f"sampler was built for {self.num_tokens:,} tokens but got {len(tokens):,}; "
                "build it from the same split it samples"
            )
        blocks = self._next_blocks()
        starts = blocks * self.block_size
        windows = np.asarray(tokens)[starts[:, None] + np.arange(self.block_size + 1)]
        t = torch.from_numpy(windows.astype(np.int64))
        return t[:, :-1].contiguous(), t[:, 1:].contiguous(), blocks

    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "position": self._pos,
            "num_tokens": self.num_tokens,
            "block_size": self.block_size,
            "seed": self.seed,
            "world_size": self.world_size,
            **({"repeats": [list(pair) for pair in self.repeats]} if self.repeats is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; the data, block size and seed must match.

        batch_size and rank may differ: the position counts blocks, the same on every rank.
        A different world size resumes at the same place in the epoch's permutation when the
        blocks consumed so far (``position x saved world size``) split evenly among the new
        ranks; otherwise the message says which world sizes can resume.
        """
        for key in ("num_tokens", "block_size", "seed"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"sampler state is for {key}={state.get(key)}, this sampler has "
                    f"{key}={getattr(self, key)}; resume with the same data and settings"
                )
        saved_repeats = state.get("repeats")
        if (None if saved_repeats is None else [tuple(pair) for pair in saved_repeats]) != self.repeats:
            raise DataError(f"sampler state has source repeats {saved_repeats}, this sampler {self.repeats}; "
                            "resume with the same data.repeats")
        saved_world = int(state.get("world_size", 1))
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.epoch_size // saved_world:
            raise DataError(f"sampler state position {position} / epoch {epoch} is out of range")
        if saved_world != self.world_size:
            consumed = position * saved_world  # blocks of this epoch's permutation already taken
            if consumed % self.world_size:
                fits = sorted(w for w in range(1, consumed + 1) if consumed % w == 0 and w <= self.epoch_size)
                raise DataError(
                    f"the run stopped after block {consumed:,} of epoch {epoch} with {saved_world} process(es); "
                    f"{self.world_size} processes cannot split the rest of the epoch where it stopped. Resume with "
                    f"{saved_world} processes (torchrun --nproc-per-node {saved_world}), or a number that divides "
                    f"{consumed:,} ({', '.join(map(str, fits[:8]))}{', ...' if len(fits) > 8 else ''})"
                )
            position = consumed // self.world_size
            if position >= self.blocks_per_epoch:  # only the dropped remainder of the epoch was left
                epoch, position = epoch + 1, 0
        self._epoch = epoch
        self._pos = position


def _check_repeats(repeats: Sequence[tuple[int, float]] | None, num_tokens: int) -> list[tuple[int, float]] | None:
    if repeats is None:
        return None
    pairs = [(int(tokens), float(repeat)) for tokens, repeat in repeats]
    if sum(tokens for tokens, _ in pairs) != num_tokens:
        raise DataError(f"the sources' token counts add up to {sum(t for t, _ in pairs):,}, not the split's "
                        f"{num_tokens:,}; prepare the data again")
    if any(not np.isfinite(r) or r <= 0 for _, r in pairs):
        raise DataError(f"every source repeat must be a finite number > 0, got {[r for _, r in pairs]}")
    return pairs


def _source_blocks(repeats: list[tuple[int, float]] | None, block_size: int, num_blocks: int) -> list[tuple[int, int, float]]:
    """``(first block, end block, repeat)`` per source: block ``i`` belongs to the source of token ``i * block_size``."""
    ranges, start = [], 0
    for tokens, repeat in repeats or []:
        first, end = -(-start // block_size), min(-(-(start + tokens) // block_size), num_blocks)
        if end > first:
            ranges.append((first, end, repeat))
        start += tokens
    return ranges

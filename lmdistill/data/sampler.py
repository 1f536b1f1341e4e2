"""Deterministic, resumable, rank-aware batches of token blocks.

Block ``i`` is the window ``tokens[i*B : i*B + B + 1]`` (B = block_size): the first B tokens
are the input, the last B the labels, so that consecutive blocks share one token and every
token but the first is a label exactly once per epoch. Each epoch visits all
``(num_tokens - 1) // B`` blocks in a permutation seeded by ``(seed, epoch)``; rank ``r`` of
``world_size`` takes positions ``r, r + world_size, ...`` of it, after dropping the remainder
so that all ranks see the same number of blocks (DDP ranks must step together).

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

import numpy as np
import torch

from lmdistill.data.errors import DataError

_STATE_VERSION = 1


class BlockSampler:
    """Batches of ``(input_ids, labels)``, each ``(batch_size, block_size)`` int64."""

    def __init__(self, num_tokens: int, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
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
        self.blocks_per_epoch = num_blocks // world_size  # per rank
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
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
            self._order = perm[: self.blocks_per_epoch * self.world_size][self.rank :: self.world_size]
            self._order_epoch = epoch
        return self._order

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
        saved_world = int(state.get("world_size", 1))
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_blocks // saved_world:
            raise DataError(f"sampler state position {position} / epoch {epoch} is out of range")
        if saved_world != self.world_size:
            consumed = position * saved_world  # blocks of this epoch's permutation already taken
            if consumed % self.world_size:
                fits = sorted(w for w in range(1, consumed + 1) if consumed % w == 0 and w <= self.num_blocks)
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

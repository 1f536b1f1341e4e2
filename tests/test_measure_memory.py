"""lmdistill.measure.memory: the peak-memory reading sees what a run allocates, and is reset per run."""

from __future__ import annotations

import mmap
import time

import pytest
import torch

from lmdistill.measure import memory
from lmdistill.models.arch import count_parameters

from .helpers import tiny_gpt2

SIZE = 64 * 2**20
PAGE = mmap.PAGESIZE


def fresh_pages(hold: float = 0.0) -> None:
    """SIZE bytes that are sure to add to the resident set while held: a new anonymous mapping,
    one byte written per page, unmapped afterwards. A tensor of that size can come back from
    pages the allocator already holds resident (after other tests freed memory), and then
    the process's RSS does not grow at all."""
    buffer = mmap.mmap(-1, SIZE)
    try:
        for offset in range(0, SIZE, PAGE):
            buffer[offset] = 1
        time.sleep(hold)
    finally:
        buffer.close()


def test_peak_memory_sees_a_transient_allocation():
    peak = memory.PeakMemory(torch.device("cpu"))
    if "ru_maxrss" in peak.method:
        pytest.skip("lifetime high-water mark only; cannot measure a fresh peak here")

    assert peak.measure(fresh_pages) >= 0.9 * SIZE
    # The peak was reset, not carried over (which would read >= SIZE every time). The reading is
    # process-wide, so another thread allocating meanwhile can inflate one attempt: take the least.
    assert min(peak.measure(lambda: None) for _ in range(3)) < SIZE / 4


def test_psutil_sampler_sees_a_held_allocation():
    pytest.importorskip("psutil")

    assert memory.sampled_rss_growth(lambda: fresh_pages(hold=0.05)) >= 0.9 * SIZE  # held for the sampler to see


def test_weights_bytes_counts_a_tied_weight_once():
    model = tiny_gpt2(1)
    assert model.lm_head.weight is model.transformer.wte.weight
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory.weights_bytes(model) == 4 * count_parameters(model) + buffers

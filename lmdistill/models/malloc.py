"""CPU memory: keep freed blocks for reuse instead of handing them back to the OS (glibc).

glibc serves every allocation above its mmap threshold (at most 32 MiB by default) with a
fresh ``mmap`` and unmaps it on free. A distillation step allocates and frees tensors of that
size many times: a 49,152 x 576 lm_head weight cast to bf16, its fp32 gradient, 256 x 49,152
logit chunks. Each fresh mapping is faulted in page by page, so on this project's 2-core
machine a bf16 -> fp32 copy of the head weight took 36 ms into new memory against 2 ms into
memory already touched, and the demo's step 2.15 s against 1.82 s once freed blocks are
reused (``benchmarks/cpu_malloc.py`` measures it side by side). PyTorch's CPU tuning guide
recommends jemalloc or tcmalloc for the same reason; ``mallopt`` gets the effect with the
allocator the process already has: big blocks come from the heap and freed ones stay there.

The cost is memory that is not returned to the OS until the process ends: the peak (what
``bench`` and the peers benchmark report as VmHWM) is what the run needed anyway. The CLI
applies it before every command and ``train.setup.build_setup`` for CPU training driven from
Python. Set ``LMDISTILL_CPU_MALLOC=system`` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

from ..errors import ConfigError

ENV = "LMDISTILL_CPU_MALLOC"
# mallopt parameters (malloc.h); values are C ints.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ONE_GIB = 1 << 30

_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB, once per process.

    Returns whether they are in effect: False on a C library other than glibc, when
    ``LMDISTILL_CPU_MALLOC=system`` asks for the defaults, or when glibc refuses the values.
    Changes nothing numerically: only where the allocator takes memory from.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    setting = os.environ.get(ENV, "reuse").strip().lower()
    if setting == "system":
        return False
    if setting != "reuse":
        raise ConfigError(f"{ENV}={setting!r}: use 'reuse' (the default) or 'system' (glibc's own thresholds)")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: blocks below it come from the heap; the trim threshold keeps
    # the freed top of the heap mapped instead of returning it after each large free.
    return bool(mallopt(_M_MMAP_THRESHOLD, _ONE_GIB)) and bool(mallopt(_M_TRIM_THRESHOLD, _ONE_GIB))

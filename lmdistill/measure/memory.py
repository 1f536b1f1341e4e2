"""Peak memory of running a model: exact on CUDA, process-level (so approximate) on CPU."""

from __future__ import annotations

import gc
import importlib.util
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["PeakMemory", "weights_bytes"]


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers, each tensor once (tied weights are shared)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class PeakMemory:
    """Peak memory that running one model adds on top of what was resident before.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
    allocated bytes before (tensor memory only, exact). CPU: process resident set size, so it
    also counts any allocator or interpreter growth in between. On Linux the kernel's RSS
    high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` and read back,
    which is exact for the process; otherwise psutil samples RSS every 0.5 ms from a thread;
    otherwise ``resource.getrusage`` ``ru_maxrss`` growth (a lifetime high-water mark, so it
    reads 0 whenever an earlier model already reached higher).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = "cuda max_memory_allocated"
        elif _can_reset_hwm():
            self.method = "process peak RSS (Linux VmHWM, reset per model)"
        elif importlib.util.find_spec("psutil") is not None:
            self.method = "process RSS sampled by psutil every 0.5 ms"
        else:
            self.method = "process ru_maxrss growth (lifetime high-water mark)"

    def measure(self, run: Callable[[], None]) -> int:
        """Bytes above the starting level while ``run()`` executes."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            run()
            torch.cuda.synchronize(self.device)
            return max(torch.cuda.max_memory_allocated(self.device) - base, 0)
        if self.method.startswith("process peak RSS"):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            # Read back right after the reset (not before it) so memory freed by another
            # thread in between cannot lower the high-water mark below the base.
            base = _proc_status_bytes("VmHWM")
            run()
            return max(_proc_status_bytes("VmHWM") - base, 0)
        if "psutil" in self.method:
            return sampled_rss_growth(run)
        base = _ru_maxrss_bytes()
        run()
        return max(_ru_maxrss_bytes() - base, 0)


def _can_reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_bytes("VmHWM") > 0
    except (OSError, ValueError):
        return False


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise ValueError(f"{key} not in /proc/self/status")


def sampled_rss_growth(run: Callable[[], None]) -> int:
    """Peak RSS growth while ``run()`` executes, sampled by psutil every 0.5 ms from a thread."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return max(max(peak[0], proc.memory_info().rss) - base, 0)


def _ru_maxrss_bytes() -> int:
    import resource  # Unix only; the last resort, so imported only when it is used

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB on Linux

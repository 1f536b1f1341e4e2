"""The only module that knows about ranks and ``torch.distributed``.

Runs launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) train with PyTorch's own engine: the student, together
with its loss (:class:`lmdistill.loss.objective.StudentObjective`), wrapped in
``DistributedDataParallel`` (default) or sharded with FSDP2's ``fully_shard``; the teacher
runs inference only, replicated on every rank's device or with its decoder layers sharded.
A torchrun launch with one process also joins a (one-process) group, so the same code path
runs on one GPU. Without torchrun everything here is a no-op for a single process, so the
loop calls it unconditionally.

Process groups use NCCL on CUDA and gloo on the CPU (which is also what the tests use).

Checkpoints hold full, unsharded state in the single-process format (an HF folder for the
student, ``optimizer.state_dict()`` keyed by parameter index), gathered here from the ranks
and scattered back on resume, so any checkpoint resumes under DDP, FSDP or one process.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

from .config import DISTRIBUTED as STRATEGIES
from .errors import DistributedError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    """True when this process is in a process group (launched by torchrun, even with 1 process)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes checkpoints and the report."""
        return self.rank == 0


SINGLE = DistInfo()


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARS)


def from_environment() -> DistInfo:
    """Rank, world size and local rank as ``torchrun`` sets them (1 process when unset)."""
    if not launched_by_torchrun():
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise DistributedError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT/RANK are not set; launch with torchrun "
                             "(torchrun --nproc-per-node N -m lmdistill distill ...)")
        return SINGLE
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err}); launch with torchrun") from None
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent; launch with torchrun")
    return DistInfo(rank, world, local, enabled=True)


def uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init(device: str = "auto") -> tuple[DistInfo, bool]:
    """Join the process group when launched by torchrun; returns ``(info, created)``.

    ``device`` is the run's ``train.device``: CUDA ranks use NCCL and the GPU of their local
    rank; CPU ranks use gloo. ``created`` is False when there is nothing to do or the group
    already exists (then the caller must not destroy it).
    """
    info = from_environment()
    if not info.enabled:
        return info, False
    if torch_dist.is_initialized():
        return info, False
    cuda = uses_cuda(device)
    if cuda:
        count = torch.cuda.device_count()
        if info.local_rank >= count:
            raise DistributedError(f"local rank {info.local_rank} has no GPU: this node has {count}; "
                             f"launch at most {count} processes per node (torchrun --nproc-per-node {count})")
        torch.cuda.set_device(info.local_rank)
    torch_dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return info, True


def rank_device(info: DistInfo, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under CUDA, else ``device`` unchanged."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def shutdown(info: DistInfo, created: bool) -> None:
    if info.enabled and created and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Who does what


@contextlib.contextmanager
def quiet_unless_main(info: DistInfo) -> Iterator[None]:
    """Standard output only from rank 0 (progress lines and notes); errors and warnings, on
    standard error, still come from every rank."""
    if info.is_main:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def main_first(info: DistInfo, fn: Callable[[], T]) -> T:
    """``fn()`` on local rank 0 of each node first, then on the others (which then find the
    caches that it filled: token shards, converted models, downloads). An error on a first
    rank is raised on every rank instead of leaving the others waiting."""
    if not info.enabled:
        return fn()
    first = info.local_rank == 0
    result, error = None, None
    if first:
        try:
            result = fn()
        except Exception as err:  # shared below, then raised here
            error = err
    statuses: list[Any] = [None] * info.world_size
    torch_dist.all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, status) for rank, status in enumerate(statuses) if status]
    if failed:
        rank, status = failed[0]
        raise DistributedError(f"rank {rank} failed first ({status}); this rank stops too")
    return fn() if not first else result  # type: ignore[return-value]


def check_same(info: DistInfo, value: Any, what: str) -> None:
    """Raise on every rank unless ``value`` is the same on all of them."""
    if not info.enabled or info.world_size == 1:
        return
    values: list[Any] = [None] * info.world_size
    torch_dist.all_gather_object(values, value)
    differ = [rank for rank, v in enumerate(values) if v != values[0]]
    if differ:
        raise DistributedError(f"{what} differs between rank 0 and rank {differ[0]} ({values[0]!r} vs {values[differ[0]]!r})")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        torch_dist.barrier()


def gather(value: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``value`` (picklable), as a list on rank 0; None on the others."""
    if not info.enabled:
        return [value]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    torch_dist.gather_object(value, out, dst=0)
    return out


def sum_across(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """Each value summed over all ranks (float64), for logging totals from rank 0."""
    return _reduce(values, info, device, "sum")


def max_across(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """Each value's maximum over all ranks: step times and stop requests, so that every rank
    takes the same decisions (time budget, learning rate, when to stop)."""
    return _reduce(values, info, device, "max")


def _reduce(values: dict[str, float], info: DistInfo, device: torch.device, how: str) -> dict[str, float]:
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM if how == "sum" else torch_dist.ReduceOp.MAX)
    return dict(zip(keys, tensor.tolist()))


# ---------------------------------------------------------------------------------------
# Wrapping the models


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise DistributedError(f"FSDP2 (train.distributed=fsdp, train.teacher_sharding=fsdp) needs torch >= 2.6, this is "
                         f"{torch.__version__}; upgrade torch or use train.distributed=ddp and "
                         f"train.teacher_sharding=replicate") from None
    return fully_shard


def _mesh(info: DistInfo, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (info.world_size,))


def wrap_student(objective: nn.Module, info: DistInfo, strategy: str, device: torch.device,
                 layers: nn.ModuleList | list[nn.Module]) -> nn.Module:
    """The student's objective module as trained on this rank: itself (no process group),
    DDP, or FSDP2-sharded.

    DDP: rank 0's parameters are broadcast to every rank; gradients are averaged in buckets
    during the backward pass of the last micro-batch (:func:`grad_sync`). FSDP2: each decoder
    layer in ``layers`` becomes one FSDP unit (all-gathered for its forward and backward,
    resharded after), and the objective module the root unit that holds the rest (embeddings,
    final norm, lm_head): the loss reads the lm_head weight inside the root's forward, where
    it is unsharded. Parameters become DTensors on ``device``. Create the optimizer after
    this call.
    """
    if strategy not in STRATEGIES:
        raise DistributedError(f"unknown distributed strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not info.enabled:
        return objective.to(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        objective.to(device)
        ids = [device.index] if device.type == "cuda" else None
        # No buffer changes during training (no batch norm in causal LMs): rank 0's buffers are
        # copied once, when DDP is built, not before every forward pass.
        params = inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DistributedDataParallel(objective, device_ids=ids, **no_sync)
    fully_shard = _fully_shard()
    mesh = _mesh(info, device)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(objective, mesh=mesh)
    return objective


def shard_teacher(teacher: nn.Module, layers: nn.ModuleList | list[nn.Module], info: DistInfo,
                  device: torch.device) -> nn.Module:
    """Shard the teacher's decoder layers with FSDP2 (inference only).

    Each layer is its own unit, all-gathered for its forward pass and freed right after
    (``reshard_after_forward=True``), so one layer's full weights exist at a time. The rest
    (embeddings, final norm, lm_head) is replicated on every rank: the fused loss reads the
    lm_head weight outside the teacher's forward, and it is a small part of a large model.
    """
    if not info.enabled:
        return teacher.to(device)
    fully_shard = _fully_shard()
    mesh = _mesh(info, device)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return teacher.to(device)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2, so nothing is sharded
        return False
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Free the unsharded root parameters an FSDP2 root keeps after a no-grad forward."""
    if is_sharded(model):
        model.reshard()


def grad_sync(model: nn.Module, sync: bool):
    """DDP: skip the gradient all-reduce (``no_sync``) on all but the last micro-batch of a
    step. FSDP2 reduce-scatters every micro-batch (its gradients stay sharded)."""
    from torch.nn.parallel import DistributedDataParallel

    if not sync and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _dtensor_type():
    """The DTensor class (parameters sharded by FSDP2), or ``()`` on a torch without it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()
    return DTensor


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor such as FSDP2's gradient norm."""
    return t.full_tensor() if isinstance(t, _dtensor_type()) else t


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded DTensor (an FSDP2 parameter); a plain tensor as it is."""
    return t.to_local() if isinstance(t, _dtensor_type()) else t


# ---------------------------------------------------------------------------------------
# Full state for checkpoints


def full_model_state(objective: nn.Module, info: DistInfo, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """The full state dict of an FSDP2-sharded module on rank 0, on the CPU (None on the other
    ranks); every rank must call it. Keys lose ``prefix``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    return {k.removeprefix(prefix): v for k, v in state.items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer, info: DistInfo) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with every sharded (DTensor) state tensor gathered in full, on
    rank 0 (None on the other ranks); every rank must call it. Keyed by parameter index as in
    one process, so the checkpoint resumes under any strategy and world size."""
    DTensor = _dtensor_type()
    state = optimizer.state_dict()
    gathered: dict[int, dict[str, Any]] = {}
    for index in sorted(state["state"]):  # the same order on every rank: the collectives pair up
        entry = {}
        for key, value in state["state"][index].items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            if info.is_main and torch.is_tensor(value):
                value = value.detach().cpu()
            entry[key] = value
        gathered[index] = entry
    if not info.is_main:
        return None
    return {"state": gathered, "param_groups": state["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full (index-keyed) optimizer state; state tensors of sharded parameters are cut
    into this rank's shard (each rank reads the same checkpoint, so no communication)."""
    DTensor = _dtensor_type()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(isinstance(p, DTensor) for p in params):
        sharded = {}
        for index, entry in state["state"].items():
            param = params[int(index)] if int(index) < len(params) else None
            if isinstance(param, DTensor):
                entry = {key: _shard_like(value, param)
                         if torch.is_tensor(value) and tuple(value.shape) == tuple(param.shape) else value
                         for key, value in entry.items()}
            sharded[index] = entry
        state = {**state, "state": sharded}
    optimizer.load_state_dict(state)


def _shard_like(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's shard of ``full``, placed like the DTensor ``param``."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(param.device)
    try:
        # Every rank holds the same full tensor (read from the checkpoint): cut, no communication.
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    except TypeError:  # torch < 2.7: scattered from rank 0 instead, the same values
        return distribute_tensor(full, param.device_mesh, param.placements)

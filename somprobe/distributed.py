"""Process-group set-up and sharding for running somprobe under ``torchrun``.

This is the one place that knows about ``torch.distributed``: every other module asks it for the
rank, the world size and its shard of the work. Without a distributed environment (no ``RANK`` /
``WORLD_SIZE`` variables, as in a plain ``somprobe`` call) everything here degrades to one
process: rank 0 of a world of 1, barriers and reductions are no-ops.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init` reads them (``env://``) and picks the backend that fits the device: NCCL for CUDA,
gloo for the CPU.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch

__all__ = ["Context", "env_world", "init", "context", "shard_range", "shard_indices", "barrier",
           "all_reduce_", "is_distributed", "finalize"]


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes shared metadata."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> Context:
    """The rank / world size torchrun put in the environment (rank 0 of 1 when absent)."""
    def _int(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    return Context(rank=_int("RANK", 0), world_size=_int("WORLD_SIZE", 1),
                   local_rank=_int("LOCAL_RANK", 0))


def is_distributed() -> bool:
    """True when a process group of more than one rank is initialised."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def init(device: str | torch.device = "auto", *, timeout_s: float = 1800.0) -> Context:
    """Initialise the default process group from torchrun's environment, once.

    Parameters
    ----------
    device : str or torch.device
        The device this rank computes on; ``cuda`` picks NCCL (and this rank's local GPU),
        anything else gloo.
    timeout_s : float
        Collective timeout: a rank that dies makes the others fail after at most this long.

    Returns
    -------
    Context
        This process's rank and world; world size 1 (nothing initialised) outside torchrun.
    """
    ctx = env_world()
    if ctx.world_size <= 1:
        return ctx
    dist = torch.distributed
    if dist.is_initialized():
        return Context(ctx.rank, ctx.world_size, ctx.local_rank, dist.get_backend())
    dev = str(device)
    use_cuda = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(ctx.local_rank % max(1, torch.cuda.device_count()))
    dist.init_process_group(backend=backend, init_method="env://", rank=ctx.rank,
                            world_size=ctx.world_size, timeout=_dt.timedelta(seconds=timeout_s))
    return Context(ctx.rank, ctx.world_size, ctx.local_rank, backend)


def context() -> Context:
    """The current rank/world: from the process group when initialised, else the environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dist = torch.distributed
        return Context(dist.get_rank(), dist.get_world_size(), env_world().local_rank,
                       dist.get_backend())
    return env_world()


def finalize() -> None:
    """Destroy the process group if this module (or anyone) initialised one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous rows ``[start, stop)`` of ``n`` for ``rank``: sizes differ by at most one,
    lower ranks take the extra rows, every row belongs to exactly one rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    base, extra = divmod(int(n), world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_indices(items, rank: int, world_size: int):
    """Round-robin shard of ``items`` (``items[rank::world_size]``): for work units of uneven
    cost (SOMs of different sizes) this balances better than contiguous blocks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return items[rank::world_size]


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        torch.distributed.barrier()


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (no-op in one process)."""
    if is_distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor

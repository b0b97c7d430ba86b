"""Process-group set-up and sharding for running somprobe under ``torchrun``.

This is the one place that knows about ``torch.distributed``: every other module asks it for the
rank, the world size and its shard of the work. Without a distributed environment (no ``RANK`` /
``WORLD_SIZE`` variables, as in a plain ``somprobe`` call) everything here degrades to one
process: rank 0 of a world of 1, barriers and reductions are no-ops.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init` reads them (``env://``), checks that every rank computes on the same kind of
device and picks the backend that fits it: NCCL for CUDA tensor reductions, gloo for the CPU (and,
on every device, for the small object collectives and checks).
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch

__all__ = ["Context", "env_world", "init", "context", "shard_range", "shard_indices", "barrier",
           "all_reduce_", "is_distributed", "finalize", "all_gather_object", "broadcast_object",
           "agree", "on_main", "check_devices", "check_shared_dir", "batch_shard"]


_NCCL = None  # the NCCL group of an all-CUDA job (init); None otherwise


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
        The device this rank computes on; ``cuda`` selects this rank's local GPU and NCCL for
        tensor reductions (objects and checks use the gloo default group on every device).
    timeout_s : float
        Collective timeout: a rank that dies makes the others fail after at most this long.

    Returns
    -------
    Context
        This process's rank and world; world size 1 (nothing initialised) outside torchrun.

    Raises
    ------
    DistributedError
        Ranks resolve ``device`` to different kinds (names them; see :func:`check_devices`).
    """
    ctx = env_world()
    if ctx.world_size <= 1:
        return ctx
    dist = torch.distributed
    if dist.is_initialized():
        return Context(ctx.rank, ctx.world_size, ctx.local_rank, dist.get_backend())
    dev = str(device)
    use_cuda = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(ctx.local_rank % max(1, torch.cuda.device_count()))
    # The default group is gloo on every rank, whatever the device: ranks that would pick
    # different devices (a node without a GPU under --device auto) then learn it from the check
    # below instead of hanging in a NCCL/gloo mismatch. Once all agree on CUDA, an NCCL group
    # carries the tensor reductions (all_reduce_); objects and checks stay on gloo.
    global _NCCL
    timeout = _dt.timedelta(seconds=timeout_s)
    dist.init_process_group(backend="gloo", init_method="env://", rank=ctx.rank,
                            world_size=ctx.world_size, timeout=timeout)
    kind = _same_kind("cuda" if use_cuda else "cpu")
    if kind == "cuda":
        _NCCL = dist.new_group(backend="nccl", timeout=timeout)
    return Context(ctx.rank, ctx.world_size, ctx.local_rank, "nccl" if kind == "cuda" else "gloo")


def context() -> Context:
    """The current rank/world: from the process group when initialised, else the environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dist = torch.distributed
        return Context(dist.get_rank(), dist.get_world_size(), env_world().local_rank,
                       "nccl" if _NCCL is not None else dist.get_backend())
    return env_world()


def finalize() -> None:
    """Destroy the process group if this module (or anyone) initialised one."""
    global _NCCL
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _NCCL = None


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
    """Sum ``tensor`` over ranks in place and return it (no-op in one process).

    CUDA tensors go over the NCCL group :func:`init` made, CPU tensors over gloo."""
    if is_distributed():
        group = _NCCL if tensor.is_cuda and _NCCL is not None else None
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)
    return tensor


# ---------------------------------------------------------------------------------------------
# Agreement between ranks (issue 12): every rank raises the same error, naming the rank(s)
# ---------------------------------------------------------------------------------------------
def all_gather_object(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in one process).

    Raises
    ------
    DistributedError
        A peer is gone (it died, or the collective timed out): the message says so and how to go on.
    """
    if not is_distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    try:
        torch.distributed.all_gather_object(out, obj)
    except Exception as e:  # gloo/NCCL raise RuntimeError subclasses with transport details
        raise _peer_lost(e) from e
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    try:
        torch.distributed.broadcast_object_list(box, src=src)
    except Exception as e:
        raise _peer_lost(e) from e
    return box[0]


def _peer_lost(e: Exception):
    from .errors import DistributedError

    detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return DistributedError(f"rank {context().rank}: another rank stopped answering ({detail}); "
                            "see the other ranks' messages, fix the cause and re-run the same "
                            "command (extract continues with --resume)")


def agree(error: str | None = None, *, what: str = "") -> None:
    """Collective check: raise on every rank if any rank reports an ``error``.

    Every rank must call it at the same point. In one process it raises ``error`` if given.

    Parameters
    ----------
    error : str, optional
        This rank's problem (None = fine).
    what : str
        What was being checked, for the message.

    Raises
    ------
    DistributedError
        Naming each failing rank and its message.
    """
    from .errors import DistributedError

    errors = all_gather_object(error)
    bad = [(r, m) for r, m in enumerate(errors) if m]
    if not bad:
        return
    if len(errors) == 1:
        raise DistributedError(bad[0][1])
    detail = "; ".join(f"rank {r}: {m}" for r, m in bad[:4]) + (" …" if len(bad) > 4 else "")
    raise DistributedError(f"{what + ' failed on ' if what else ''}{len(bad)} of {len(errors)} "
                           f"ranks — {detail}")


def on_main(fn, what: str = ""):
    """``fn()`` on rank 0 only, then a collective check: if it raised a somprobe error, every
    rank raises (rank 0 its own error, the others a :class:`DistributedError` quoting it).

    Every rank must call it at the same point; the others get ``None``. One process: ``fn()``.
    """
    from .errors import DistributedError, SomprobeError

    ctx = context()
    if not ctx.distributed:
        return fn()
    out, err = None, None
    if ctx.is_main:
        try:
            out = fn()
        except SomprobeError as e:
            err = e
    try:
        agree(str(err) if err is not None else None, what=what)
    except DistributedError:
        if err is not None:
            raise err from None
        raise
    return out


def check_devices(device: str | torch.device = "auto") -> str:
    """The device type (``cpu``/``cuda``) every rank resolves ``device`` to; all must agree.

    Raises
    ------
    DistributedError
        Ranks on different device types (e.g. one node without a GPU under ``--device auto``):
        names them and says to pass ``--device cpu`` or ``--device cuda`` explicitly.
    """
    from .device import resolve_device

    return _same_kind(resolve_device(device).type)


def _same_kind(kind: str) -> str:
    from .errors import DistributedError

    kinds = all_gather_object(kind)
    if len(set(kinds)) > 1:
        by = "; ".join(f"{k} on rank{'s' if kinds.count(k) > 1 else ''} "
                       f"{', '.join(str(r) for r, v in enumerate(kinds) if v == k)}"
                       for k in sorted(set(kinds)))
        raise DistributedError(f"ranks compute on different devices ({by}); every rank must use "
                               "the same kind: pass --device cuda (GPU on every node) or --device cpu")
    return kind


def check_shared_dir(path, *, name: str = ".somprobe-ranks") -> None:
    """Check that every rank sees the same directory ``path`` (a shared filesystem).

    Rank 0 writes a token with a fresh random value into ``path``; after a barrier every rank
    reads it back. Ranks that do not see it write into a different directory (a node-local
    disk), so their rows would never reach the store. One process: nothing to check.

    Raises
    ------
    DistributedError
        Naming the ranks (and hosts) that do not see rank 0's token.
    """
    import secrets
    import socket
    from pathlib import Path

    from .errors import DistributedError
    from .run import atomic_write_json

    if not is_distributed():
        return
    ctx = context()
    token = Path(path) / name
    value = secrets.token_hex(8) if ctx.is_main else None
    err = None
    if ctx.is_main:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            atomic_write_json(token, {"token": value})
        except OSError as e:
            err = f"cannot write {token}: {e}"
    value = broadcast_object((value, err))
    if value[1]:
        raise DistributedError(value[1])
    try:
        import json

        seen = json.loads(token.read_text()).get("token")
    except (OSError, ValueError):
        seen = None
    host = socket.gethostname()
    reports = all_gather_object((seen == value[0], host))
    barrier()
    if ctx.is_main:
        token.unlink(missing_ok=True)
    blind = [(r, h) for r, (ok, h) in enumerate(reports) if not ok]
    if blind:
        who = ", ".join(f"rank {r} on {h}" for r, h in blind)
        raise DistributedError(f"the run directory {path} is not shared between ranks: {who} "
                               f"cannot see what rank 0 ({reports[0][1]}) wrote there; put --out on "
                               "a filesystem every node mounts at the same path (NFS, Lustre …)")


def batch_shard(n: int, batch_size: int, rank: int, world_size: int) -> range:
    """Rows of ``rank``'s shard when ``n`` rows are cut into global batches of ``batch_size``
    and the batches are shared out contiguously (:func:`shard_range` over batches).

    Shards are batch-aligned, so every batch holds the same samples as in one process and
    batch-dependent results (PGD random starts, float reductions) stay bit-equal.
    """
    nb = -(-int(n) // int(batch_size)) if n > 0 else 0
    b = shard_range(nb, rank, world_size)
    return range(min(b.start * batch_size, n), min(b.stop * batch_size, n))

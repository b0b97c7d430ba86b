"""Fitting many independent maps at once: the thread policy, the cost model and the scheduler.

``somprobe fit`` trains small maps (the paper's 4 layers × sizes 10, 20, 30, 40). One small map
keeps a core busy but not two: at batch 10 a 20×20 step is a [400, 2048]×[2048, 10] product, and
a second BLAS thread gains little when the machine is quiet and loses several times over when
another process holds a core (each step waits for the slower thread). So maps are fitted
side by side, **one thread each, as many at once as there are cores**, and a map only gets more
threads when there are fewer maps than cores and its steps are large (:func:`plan`).

Short jobs (the paper's sixteen maps on SOM-tr take a few seconds) run their maps in **threads
of the calling process**: the matrix products release the GIL and dominate the steps of all
but the smallest maps, and a thread starts at once. Longer jobs (:data:`PROCESS_MIN_SECONDS`)
use **worker processes** (``spawn``: a fresh interpreter, safe whatever threads the parent
already used; ``fork`` is not, with OpenMP), free of the GIL; starting one costs about a second of
imports, so the calling process fits maps too and the workers join as they come up
(:func:`run_tasks`); tiny jobs do not start workers at all. Every map is fitted by the same
code with the same thread count wherever it runs, so the results are bit-identical to fitting
the maps one by one.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import queue
import threading
from dataclasses import dataclass

import torch

from somprobe.errors import SOMError

__all__ = ["available_cores", "map_cost", "step_flops", "plan", "Plan", "assign", "run_tasks",
           "THREADED_STEP_FLOPS", "MIN_PARALLEL_SECONDS", "PROCESS_MIN_SECONDS", "BACKENDS"]

#: A map gets more than one thread only if one training step is at least this many flops
#: (a [G, D]×[D, B] product: batch 100 on a 20×20 map of 2,048 features; the batch map's
#: steps are whole chunks of the data and always qualify).
THREADED_STEP_FLOPS = 2 * 100 * 400 * 2048
#: Below this estimated one-core time a job runs in the calling process: a worker costs about
#: a second of imports, which tiny jobs would not win back.
MIN_PARALLEL_SECONDS = 1.5
#: From this estimated one-core time on, maps run in worker processes rather than threads: the
#: ~1.5 s a process spends importing is then under a tenth of the job, and processes do not
#: share the GIL (which the per-step bookkeeping of small maps holds). On the paper's sixteen
#: maps (~3 s) two threads gave 1.7× over one by one; two processes 1.06×, start-up included.
PROCESS_MIN_SECONDS = 20.0
#: Ways :func:`run_tasks` runs maps side by side.
BACKENDS = ("threads", "processes")
# Cost model of one online step on one core: a fixed overhead (~25 small tensor operations of
# bookkeeping per step) plus the flops at matrix-product speed (the online loop works in blocks
# of ~160 rows, whose two products run near the GEMM peak: ~70 GF/s on one core of the 2-core
# reference machine; 250 µs per step measured there on a 10×10 map).
_STEP_OVERHEAD_S = 250e-6
_FLOPS_PER_S = 6e10


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def step_flops(m: int, n: int, dim: int, *, batch_size: int, mode: str, n_samples: int) -> float:
    """Flops of one training step's BMU product ``W Xᵀ`` (``2·B·G·D``; the batch map's steps are
    chunks of up to 64 MiB of data, counted as the whole data)."""
    rows = n_samples if mode == "batch" else min(int(batch_size), int(n_samples))
    return 2.0 * rows * int(m) * int(n) * int(dim)


def map_cost(m: int, n: int, dim: int, *, n_samples: int, epochs: int, batch_size: int,
             mode: str) -> float:
    """Estimated one-core seconds to fit one map (the scheduler's weight; only ratios matter much).

    ``epochs · (steps · overhead + N · 4·G·D / throughput)``: every sample costs the BMU
    product and the update product, ``2·G·D`` flops each.
    """
    steps = 1 if mode == "batch" else -(-int(n_samples) // int(batch_size))
    flops = 4.0 * int(n_samples) * int(m) * int(n) * int(dim)
    return int(epochs) * (steps * _STEP_OVERHEAD_S + flops / _FLOPS_PER_S)


@dataclass(frozen=True)
class Plan:
    """How a set of maps is fitted: ``workers`` maps at once, ``threads`` torch threads each,
    side by side in threads of this process or in worker processes (``backend``)."""

    workers: int
    threads: int
    backend: str = "threads"


def plan(costs, steps, *, cores: int | None = None, workers: int | None = None,
         threads: int | None = None) -> Plan:
    """Choose how many maps to fit at once and the torch threads of each.

    Parameters
    ----------
    costs : list of float
        :func:`map_cost` of every map to fit.
    steps : list of float
        :func:`step_flops` of every map.
    cores : int, optional
        Cores to use (default :func:`available_cores`).
    workers, threads : int, optional
        Fixed by the user; the other one (if not given) is derived from it.

    The backend is ``threads`` for jobs estimated under :data:`PROCESS_MIN_SECONDS` of one core,
    ``processes`` from there on.

    Returns
    -------
    Plan
        Default: one thread per map and ``min(maps, cores)`` maps at once; with fewer maps than
        cores, maps whose steps reach :data:`THREADED_STEP_FLOPS` share the spare cores as
        threads. Jobs under :data:`MIN_PARALLEL_SECONDS` run one map at a time.
    """
    cores = available_cores() if cores is None else max(1, int(cores))
    for name, v in (("workers", workers), ("threads", threads)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise SOMError(f"{name} must be a positive integer, got {v!r}")
    n = len(costs)
    if n == 0:
        return Plan(1, threads or 1)
    big = max(steps) >= THREADED_STEP_FLOPS
    if workers is None:
        if sum(costs) < MIN_PARALLEL_SECONDS:
            workers = 1
        elif threads is None:
            workers = min(n, cores)
        else:
            workers = max(1, min(n, cores // threads))
    workers = min(int(workers), n)
    if threads is None:
        threads = max(1, cores // workers) if big else 1
    backend = "processes" if sum(costs) >= PROCESS_MIN_SECONDS else "threads"
    return Plan(workers, int(threads), backend)


def assign(costs, world_size: int) -> list[int]:
    """Rank of each task: longest first, each to the least-loaded rank (ties: lowest rank).

    Deterministic, so every rank computes the same assignment; within a factor 4/3 of the best
    possible makespan (Graham's LPT bound).
    """
    load = [0.0] * int(world_size)
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(len(load)), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


# ---------------------------------------------------------------------------------------------
# scheduler
# ---------------------------------------------------------------------------------------------
class _Stopped(Exception):
    """Raised inside a fit's progress callback when another map failed: stop at the next chunk."""


@contextlib.contextmanager
def torch_threads(n: int):
    """Set torch's intra-op threads to ``n`` for the block (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


_WORKER: dict = {}


def _init_worker(threads: int, counter, stop) -> None:
    torch.set_num_threads(int(threads))
    _WORKER.update(counter=counter, stop=stop)


def _worker_progress(n: int) -> None:
    if _WORKER["stop"].is_set():
        raise _Stopped()
    with _WORKER["counter"].get_lock():
        _WORKER["counter"].value += int(n)


def _call_in_worker(fn, task):
    return fn(task, _worker_progress)


def run_tasks(fn, tasks, *, workers: int = 1, threads: int = 1, total: int | None = None,
              progress=False, desc: str = "SOMs", describe=str, into: list | None = None,
              backend: str = "processes"):
    """Run ``fn(task, progress_callback)`` for every task, ``workers`` at a time.

    Parameters
    ----------
    fn : callable
        A module-level function (picklable); ``progress_callback(n)`` reports ``n`` units done.
    tasks : list
        Picklable tasks, best ordered longest first.
    workers : int
        Tasks at once: the calling thread and ``workers − 1`` spawned processes or threads.
    threads : int
        Torch threads of each (the caller's are restored afterwards; with ``backend="threads"``
        the setting is the process's, shared by all tasks).
    total : int, optional
        Units of all tasks, for the bar.
    progress : bool
        One tqdm bar over all tasks.
    describe : callable
        Names a task in error messages.
    into : list, optional
        Receives the ``(task, result)`` pairs, also those finished before an error.
    backend : {"processes", "threads"}
        Where the other ``workers − 1`` tasks run (see the module notes). With ``threads``,
        ``fn`` must be thread-safe (the SOM fits are: each has its own state and generator).

    Returns
    -------
    list of (task, result)
        In order of completion (``into`` if given). When a task fails the others stop at their
        next progress call (what they finished stays written) and the first error is raised: a
        somprobe error as it is, a dead worker as :class:`SOMError` naming the task.
    """
    if backend not in BACKENDS:
        raise SOMError(f"backend={backend!r}: choose one of {BACKENDS}")
    tasks = list(tasks)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="sample" if total else "map")
    lock = threading.Lock()
    pending = list(reversed(tasks))  # pop() takes the next (longest) task
    done: "queue.Queue" = queue.Queue()
    errors: list = []
    local = [0]
    counter = stop = None

    def take():
        with lock:
            if errors or not pending:
                return None
            return pending.pop()

    bar_lock = threading.Lock()

    def refresh():
        if bar is not None:
            with bar_lock:  # worker threads report too
                bar.n = local[0] + (counter.value if counter is not None else 0)
                bar.refresh()

    def local_progress(n):
        if errors:
            raise _Stopped()
        with lock:
            local[0] += int(n)
        refresh()

    def work(first=None):
        # the loop of the calling thread, and of each worker thread with backend="threads"
        while True:
            task, first = (first, None) if first is not None else (take(), None)
            if task is None:
                return
            try:
                done.put((task, fn(task, local_progress)))
            except _Stopped:
                return
            except BaseException as e:
                with lock:
                    errors.append((task, e))
                if stop is not None:
                    stop.set()
                if not isinstance(e, Exception):
                    raise  # KeyboardInterrupt: the caller's finally stops the workers
                return

    pool = feeder = None
    helpers: list = []
    results = [] if into is None else into
    try:
        with torch_threads(threads):
            # this process takes the longest task first; a worker pays its start-up (imports)
            # on the next one while this process already computes
            first = take()
            if workers > 1 and len(tasks) > 1 and backend == "threads":
                helpers = [threading.Thread(target=work, daemon=True)
                           for _ in range(min(workers, len(tasks)) - 1)]
                for h in helpers:
                    h.start()
            elif workers > 1 and len(tasks) > 1:
                ctx = mp.get_context("spawn")
                counter, stop = ctx.Value("q", 0), ctx.Event()
                n_proc = min(workers, len(tasks)) - 1
                pool = cf.ProcessPoolExecutor(n_proc, mp_context=ctx, initializer=_init_worker,
                                              initargs=(threads, counter, stop))
                slots = threading.Semaphore(n_proc)

                def finished(fut, task):
                    try:
                        res = fut.result()
                    except BaseException as e:  # noqa: BLE001 - handed to the caller below
                        with lock:
                            if not isinstance(e, _Stopped):
                                errors.append((task, e))
                        stop.set()
                    else:
                        done.put((task, res))
                    slots.release()

                def feed():
                    while True:
                        slots.acquire()
                        task = take()
                        if task is None:
                            return
                        try:
                            fut = pool.submit(_call_in_worker, fn, task)
                        except Exception as e:  # noqa: BLE001 - pool broken or shut down
                            with lock:
                                errors.append((task, e))
                            return
                        fut.add_done_callback(lambda f, t=task: finished(f, t))

                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
            work(first)
            for h in helpers:
                while h.is_alive():
                    h.join(0.5)
                    refresh()
            if feeder is not None:
                while feeder.is_alive():
                    feeder.join(0.5)
                    refresh()
                pool.shutdown(wait=True)
                pool = None
    finally:
        if pool is not None:  # interrupted: do not wait for maps still running
            if stop is not None:
                stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
        while not done.empty():
            results.append(done.get())
        refresh()
        if bar is not None:
            bar.close()
    if errors:
        task, e = errors[0]
        if isinstance(e, cf.BrokenExecutor):
            raise SOMError(f"the worker process fitting {describe(task)} died ({e}); maps already "
                           "finished are kept: re-run with --resume (or --workers 1 to fit in "
                           "this process)") from e
        raise e
    return results

"""The run-level fit job: one SOM per layer and grid size from a run's code store.

Reads ``codes/<train_split>/`` (``somprobe extract``), writes into ``soms/``::

    soms/<layer>-<m>x<n>.pt + .json       the map (SOM.save) and its readable sidecar
    soms/<layer>-<m>x<n>.ckpt.pt          per-epoch checkpoint while fitting (removed at the end)
    soms/curves.csv                        training curves, tidy (docs/interfaces.md)
    soms/bmus/<split>/<layer>-<m>x<n>.npy        int64 [N, k] top-k BMUs, nearest first
    soms/bmus/<split>/<layer>-<m>x<n>-dist.npy   float32 [N, k] their distances
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from somprobe.errors import SOMError
from ..run import Run, save_csv, save_npy
from somprobe.som.map import CURVE_COLUMNS, SOM

__all__ = ["fit_run", "parse_sizes", "bmus_dist_path", "som_checkpoint_path", "CURVES_COLUMNS",
           "DEFAULT_K"]

#: Columns of ``soms/curves.csv``.
CURVES_COLUMNS = ["layer", "size", "m", "n"] + CURVE_COLUMNS
#: BMUs kept per sample (study 003 uses the top 10).
DEFAULT_K = 10

_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*$")


def parse_sizes(sizes) -> list[tuple[int, int]]:
    """Grid sizes from ``20``, ``"7x12"``, ``"10,20,30,40"`` or a list of those.

    A list of plain numbers means square grids (``(10, 20)`` is 10×10 and 20×20); write
    ``"7x12"`` or ``[(7, 12)]`` for a non-square grid.

    Returns
    -------
    list of (m, n)
        A bare number ``s`` means a square ``s``×``s`` grid.
    """
    if isinstance(sizes, (int, np.integer)) and not isinstance(sizes, bool):
        items = [int(sizes)]
    elif isinstance(sizes, str):
        items = [s for s in sizes.split(",") if s.strip()]
    else:
        items = list(sizes)
    out = []
    for it in items:
        if isinstance(it, (tuple, list)) and len(it) == 2:
            m, n = int(it[0]), int(it[1])
        elif isinstance(it, (int, np.integer)) and not isinstance(it, bool):
            m = n = int(it)
        else:
            match = _SIZE.match(str(it))
            if not match:
                raise SOMError(f"cannot read SOM size {it!r}: write 20 (square) or 7x12 (rows x columns)")
            m = int(match.group(1))
            n = int(match.group(2) or m)
        if m < 2 or n < 2:
            raise SOMError(f"SOM size {m}x{n} is too small: a grid needs at least 2x2 units")
        if (m, n) not in out:
            out.append((m, n))
    if not out:
        raise SOMError("no SOM size given: pass e.g. sizes=(20,) or '10,20,30,40'")
    return out


def bmus_dist_path(run: Run, split: str, layer: str, m: int, n: int) -> Path:
    """File of the BMU distances next to ``run.bmus_path`` (``...-dist.npy``)."""
    p = run.bmus_path(split, layer, m, n)
    return p.with_name(p.stem + "-dist.npy")


def som_checkpoint_path(run: Run, layer: str, m: int, n: int) -> Path:
    """Per-epoch checkpoint of a fit in progress (``soms/<layer>-<m>x<n>.ckpt.pt``)."""
    p = run.som_path(layer, m, n)
    return p.with_name(p.stem + ".ckpt.pt")


def _open(run: Run, split: str):
    from somprobe.store import open_store

    return open_store(run.codes_dir(split))


def _complete(path: Path, som: SOM) -> SOM | None:
    """The finished map at ``path`` if it was fitted with ``som``'s hyperparameters."""
    if not path.is_file():
        return None
    old = SOM.load(path, device=som.device)
    if old._hparams() != som._hparams() or old.epoch_ < int(som.epochs):
        return None
    return old


#: A map's checkpoint is written at an epoch's end at most this often (seconds): the paper's
#: small maps take well under a second per epoch, and writing their weights after each epoch
#: cost more than training them. An interrupted ``fit`` loses at most this much work per map.
CHECKPOINT_SECONDS = 30.0


def fit_run(run, *, layers=None, sizes=(20,), train_split="som-tr", splits=None, resume=False,
            progress=False, k=DEFAULT_K, workers=None, threads=None, data_parallel=False,
            checkpoint_every=CHECKPOINT_SECONDS, **som_kwargs) -> list[Path]:
    """Fit one SOM per layer and grid size on a run's codes; write maps, curves and BMUs.

    The maps are independent, so they are fitted side by side: by default one torch thread per
    map and as many maps at once as there are cores (:func:`somprobe.som.parallel.plan`), in
    worker processes. The result does not depend on ``workers``: every map is bit-identical to
    fitting it alone with the same ``threads``.

    Under ``torchrun`` (an initialised process group, or torchrun's environment, in which case
    the group is initialised here) the maps are spread over the ranks, longest first to the
    least-loaded rank; each rank writes its own maps and BMUs, rank 0 writes ``curves.csv``
    after gathering every rank's curves. With ``data_parallel=True`` every rank works on every
    map instead, on its part of the data (``SOM.fit(shard=...)``), and rank 0 writes.

    Parameters
    ----------
    run : Run or path
        The run directory (``somprobe extract`` must have written ``codes/<train_split>``).
    layers : list of str, optional
        Layers to fit (default: every layer of the training store).
    sizes : int, str or list
        Grid sizes, e.g. ``(10, 20, 30, 40)``, ``"20,7x12"`` (see :func:`parse_sizes`).
    train_split : str
        Code-store split the maps are trained on (study 003: ``som-tr``).
    splits : list of str, optional
        Splits whose top-``k`` BMUs are written (default: every complete split of the run).
    resume : bool
        Keep maps already fitted with the same hyperparameters and continue interrupted fits
        from their checkpoints (same final weights as an uninterrupted fit).
    checkpoint_every : float
        Seconds between a map's checkpoints, written at the end of an epoch
        (:meth:`SOM.fit`); 0 writes one after every epoch.
    progress : bool
        One tqdm bar over all maps (rank 0 only under torchrun).
    k : int
        BMUs kept per sample (capped at the number of units).
    workers : int, optional
        Maps fitted at once on this machine (per rank under torchrun); default: the number of
        cores, or 1 for jobs of under ~1.5 s and on a GPU.
    threads : int, optional
        Torch threads per map; default 1, more only when there are fewer maps than cores and
        a step is large (batch mode, big batches).
    data_parallel : bool
        Under torchrun: split every map's data over the ranks instead of the maps.
    **som_kwargs
        Hyperparameters of :class:`SOM` (``topology``, ``metric``, ``sigma``, ``alpha``,
        ``decay``, ``epochs``, ``batch_size``, ``mode``, ``init``, ``seed``, ``device``).

    Returns
    -------
    list of Path
        The map files (``run.som_path``) of every layer and size, in layer-major order (under
        torchrun: of all ranks).
    """
    from somprobe import distributed as dist
    from somprobe.device import resolve_device
    from somprobe.som import parallel

    run = run if isinstance(run, Run) else Run(run)
    grid_sizes = parse_sizes(sizes)
    train = _open(run, train_split)
    layers = list(train.layers) if layers is None else list(layers)
    if not layers:
        raise SOMError(f"no layers to fit in {run.codes_dir(train_split)}; run `somprobe extract` first")
    if splits is None:
        splits = run.splits() or [train_split]
    for s in splits:
        if s != train_split:
            _open(run, s)  # a missing or incomplete split fails here, before any fitting
    combos = [(layer, m, n) for layer in layers for (m, n) in grid_sizes]
    N = int(train.n_rows)
    # reading each layer once here makes an unknown layer fail before any fitting (StoreError)
    dims = {layer: int(train.codes(layer).shape[1]) for layer in layers}
    probe = SOM(grid_sizes[0][0], grid_sizes[0][1], dims[layers[0]], **som_kwargs)  # checks hparams
    E, B, mode = int(probe.epochs), int(probe.batch_size), probe.mode
    costs = [parallel.map_cost(m, n, dims[layer], n_samples=N, epochs=E, batch_size=B, mode=mode)
             for layer, m, n in combos]
    steps = [parallel.step_flops(m, n, dims[layer], batch_size=B, mode=mode, n_samples=N)
             for layer, m, n in combos]

    ctx = dist.context()
    if ctx.world_size > 1 and not dist.is_distributed():
        ctx = dist.init(som_kwargs.get("device", "auto"))
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) if ctx.distributed else 1
    cores = max(1, parallel.available_cores() // local_world)
    on_gpu = resolve_device(som_kwargs.get("device", "auto")).type != "cpu"

    def spec(i, shard=None):
        layer, m, n = combos[i]
        return {"index": i, "root": str(run.root), "train_split": train_split, "layer": layer,
                "m": m, "n": n, "splits": list(splits), "resume": bool(resume), "k": int(k),
                "checkpoint_every": float(checkpoint_every),
                "som_kwargs": dict(som_kwargs), "shard": shard, "n_samples": N, "epochs": E}

    results: list = []
    err = None
    try:
        if ctx.distributed and data_parallel:
            p = parallel.plan(costs, steps, cores=cores, workers=1, threads=threads)
            tasks = [spec(i, (ctx.rank, ctx.world_size)) for i in range(len(combos))]
            results = _fit_data_parallel(tasks, p.threads if not on_gpu else None,
                                         progress=progress and ctx.is_main, total=N * E * len(tasks))
        else:
            mine = list(range(len(combos)))
            if ctx.distributed:
                owner = parallel.assign(costs, ctx.world_size)
                mine = [i for i in mine if owner[i] == ctx.rank]
            mine.sort(key=lambda i: (-costs[i], i))
            if on_gpu:  # one map at a time: the GPU is shared, the CPU threads do not matter
                p = parallel.Plan(1, threads or torch.get_num_threads())
            else:
                p = parallel.plan([costs[i] for i in mine], [steps[i] for i in mine], cores=cores,
                                  workers=workers, threads=threads)
            parallel.run_tasks(_fit_map, [spec(i) for i in mine], workers=p.workers,
                               threads=p.threads, backend=p.backend, total=N * E * len(mine),
                               progress=progress and ctx.is_main, describe=_describe, into=results)
    except BaseException as e:
        err = e
        if not ctx.distributed or not isinstance(e, Exception):
            raise
    finally:
        if not ctx.distributed:
            _write_results(run, combos, results)
    if ctx.distributed:
        _finish_ranks(run, combos, results, err)
    return [run.som_path(layer, m, n) for layer, m, n in combos]


def _describe(task: dict) -> str:
    return f"{task['layer']} {task['m']}x{task['n']}"


def _write_results(run: Run, combos, results) -> None:
    if results:
        order = sorted(results, key=lambda r: r[0]["index"])
        _write_curves(run, pd.concat([c for _, c in order], ignore_index=True))


def _finish_ranks(run: Run, combos, results, err) -> None:
    """Gather every rank's curves and errors; rank 0 writes curves.csv; raise on every rank if
    any rank failed (a failing rank raises its own error, the others name it)."""
    from somprobe import distributed as dist
    from somprobe.errors import DistributedError

    msg = None if err is None else (str(err) or type(err).__name__)
    gathered = dist.all_gather_object((msg, results))
    everything = [r for _, res in gathered for r in res]
    # data-parallel ranks all hold the same curves: keep one per map
    unique = list({r[0]["index"]: r for r in everything}.values())
    dist.on_main(lambda: _write_results(run, combos, unique), what="writing soms/curves.csv")
    bad = [(r, m) for r, (m, _) in enumerate(gathered) if m]
    if err is not None:
        raise err
    if bad:
        detail = "; ".join(f"rank {r}: {m}" for r, m in bad[:4])
        raise DistributedError(f"fitting SOMs failed on {len(bad)} of {len(gathered)} ranks — "
                               f"{detail}; maps already finished are kept: fix the cause and "
                               "re-run with --resume")


def _fit_data_parallel(tasks, threads, *, progress, total):
    """Every rank fits every map, in the same order, on its part of the data."""
    from somprobe.som.parallel import torch_threads

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="SOMs (data-parallel)", unit="sample")
    out = []
    try:
        with torch_threads(threads or torch.get_num_threads()):
            for task in tasks:
                out.append((task, _fit_map(task, bar.update if bar is not None else None)))
    finally:
        if bar is not None:
            bar.close()
    return out


def _fit_map(task: dict, progress=None) -> pd.DataFrame:
    """Fit (or keep, on resume) one map of a :func:`fit_run` task, write it and its BMUs.

    Runs in the calling process or a worker; returns the map's curve with its layer and size.
    """
    from somprobe import distributed as dist

    run = Run(task["root"])
    layer, m, n, split0 = task["layer"], task["m"], task["n"], task["train_split"]
    shard = task.get("shard")
    writer = shard is None or shard[0] == 0
    train = _open(run, split0)
    X = train.codes(layer)
    som = SOM(m, n, X.shape[1], **task["som_kwargs"])
    path = run.som_path(layer, m, n)
    ckpt = som_checkpoint_path(run, layer, m, n)
    done = _complete(path, som) if task["resume"] else None
    if done is not None:
        som = done
        if progress is not None:
            progress(task["n_samples"] * task["epochs"])
    else:
        if not task["resume"] and writer:
            ckpt.unlink(missing_ok=True)
        som.fit(X, progress=progress if progress is not None else False, checkpoint=ckpt,
                checkpoint_every=task["checkpoint_every"], resume=task["resume"], shard=shard)

    k_ = min(int(task["k"]), som.n_units)

    def split_bmus():
        # one split at a time, so only one split's BMUs are in memory
        for split in task["splits"]:
            store = train if split == split0 else _open(run, split)
            if layer not in store.layers:
                continue
            X_ = store.codes(layer)
            if shard is None:
                yield split, som.bmus(X_, k=k_)
                continue
            # data-parallel: each rank maps its rows, rank 0 writes the gathered files
            rows = dist.shard_range(len(X_), *shard)
            part = som.bmus(X_[rows.start:rows.stop], k=k_) if len(rows) else \
                (np.empty((0, k_), np.int64), np.empty((0, k_), np.float32))
            parts = dist.all_gather_object(part)
            yield split, (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    # the gathers are collectives: every rank runs them, outside rank 0's write
    bmus = split_bmus() if shard is None else list(split_bmus())

    def write():
        if done is None:
            som.save(path, meta={"layer": layer, "train_split": split0, "size": f"{m}x{n}",
                                 "codes": str(run.codes_dir(split0))})
            ckpt.unlink(missing_ok=True)
            ckpt.with_suffix(".json").unlink(missing_ok=True)
        for split, (idx, dist_) in bmus:
            save_npy(run.bmus_path(split, layer, m, n), idx)
            save_npy(bmus_dist_path(run, split, layer, m, n), dist_)

    if shard is None:
        write()
    else:
        dist.on_main(write, what=f"writing the SOM {layer} {m}x{n}")
    c = som.curve_.copy()
    c.insert(0, "n", n)
    c.insert(0, "m", m)
    c.insert(0, "size", f"{m}x{n}")
    c.insert(0, "layer", layer)
    return c


def _write_curves(run: Run, new: pd.DataFrame) -> None:
    # Keep the curves of maps not refitted by this call (another layer or size fitted earlier).
    path = run.curves_csv
    if path.is_file():
        old = pd.read_csv(path, dtype={"size": str, "layer": str})
        keys = set(zip(new["layer"], new["size"]))
        old = old[[(l, s) not in keys for l, s in zip(old["layer"], old["size"])]]
        new = pd.concat([old, new], ignore_index=True) if len(old) else new
    save_csv(path, new[CURVES_COLUMNS])

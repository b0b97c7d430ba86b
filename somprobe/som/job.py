"""The run-level fit job: one SOM per layer and grid size from a run's code store.

Reads ``codes/<train_split>/`` (``somprobe extract``), writes into ``soms/``::

    soms/<layer>-<m>x<n>.pt + .json       the map (SOM.save) and its readable sidecar
    soms/<layer>-<m>x<n>.ckpt.pt          per-epoch checkpoint while fitting (removed at the end)
    soms/curves.csv                        training curves, tidy (docs/interfaces.md)
    soms/bmus/<split>/<layer>-<m>x<n>.npy        int64 [N, k] top-k BMUs, nearest first
    soms/bmus/<split>/<layer>-<m>x<n>-dist.npy   float32 [N, k] their distances
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

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


def fit_run(run, *, layers=None, sizes=(20,), train_split="som-tr", splits=None, resume=False,
            progress=False, k=DEFAULT_K, **som_kwargs) -> list[Path]:
    """Fit one SOM per layer and grid size on a run's codes; write maps, curves and BMUs.

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
        from their per-epoch checkpoints (same final weights as an uninterrupted fit).
    progress : bool
        tqdm bars.
    k : int
        BMUs kept per sample (capped at the number of units).
    **som_kwargs
        Hyperparameters of :class:`SOM` (``topology``, ``metric``, ``sigma``, ``alpha``,
        ``decay``, ``epochs``, ``batch_size``, ``mode``, ``init``, ``seed``, ``device``).

    Returns
    -------
    list of Path
        The map files written (``run.som_path``), in layer-major order.
    """
    run = run if isinstance(run, Run) else Run(run)
    grid_sizes = parse_sizes(sizes)
    train = _open(run, train_split)
    layers = list(train.layers) if layers is None else list(layers)
    if not layers:
        raise SOMError(f"no layers to fit in {run.codes_dir(train_split)}; run `somprobe extract` first")
    if splits is None:
        splits = run.splits() or [train_split]
    stores = {s: (train if s == train_split else _open(run, s)) for s in splits}

    curves = []
    written = []
    combos = [(layer, m, n) for layer in layers for (m, n) in grid_sizes]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(combos, desc="SOMs", unit="map")
    try:
        for layer, m, n in combos:
            if bar is not None:
                bar.set_postfix_str(f"{layer} {m}x{n}")
            X = train.codes(layer)
            som = SOM(m, n, X.shape[1], **som_kwargs)
            path = run.som_path(layer, m, n)
            ckpt = som_checkpoint_path(run, layer, m, n)
            done = _complete(path, som) if resume else None
            if done is not None:
                som = done
            else:
                if not resume:
                    ckpt.unlink(missing_ok=True)
                som.fit(X, progress=progress, checkpoint=ckpt, resume=resume)
                som.save(path, meta={"layer": layer, "train_split": train_split,
                                     "size": f"{m}x{n}", "codes": str(run.codes_dir(train_split))})
                ckpt.unlink(missing_ok=True)
                ckpt.with_suffix(".json").unlink(missing_ok=True)
            written.append(path)
            c = som.curve_.copy()
            c.insert(0, "n", n)
            c.insert(0, "m", m)
            c.insert(0, "size", f"{m}x{n}")
            c.insert(0, "layer", layer)
            curves.append(c)
            for split, store in stores.items():
                if layer not in store.layers:
                    continue
                idx, dist = som.bmus(store.codes(layer), k=min(int(k), som.n_units))
                save_npy(run.bmus_path(split, layer, m, n), idx)
                save_npy(bmus_dist_path(run, split, layer, m, n), dist)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if curves:
            _write_curves(run, pd.concat(curves, ignore_index=True))
    return written


def _write_curves(run: Run, new: pd.DataFrame) -> None:
    # Keep the curves of maps not refitted by this call (another layer or size fitted earlier).
    path = run.curves_csv
    if path.is_file():
        old = pd.read_csv(path, dtype={"size": str, "layer": str})
        keys = set(zip(new["layer"], new["size"]))
        old = old[[(l, s) not in keys for l, s in zip(old["layer"], old["size"])]]
        new = pd.concat([old, new], ignore_index=True) if len(old) else new
    save_csv(path, new[CURVES_COLUMNS])

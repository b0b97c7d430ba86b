"""How far perturbations move inputs on the SOM: BMU shifts rank by rank (study 003, Fig. 11–12).

For each clean input and its perturbed twin, the torus distance between the clean input's
r-th BMU and the perturbed input's r-th BMU, for r = 1..k.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import AnalysisError
from ..som.grid import Grid
from .centres import check_bmus

__all__ = ["bmu_shifts", "align_ids", "shift_table", "shift_summary"]


def bmu_shifts(clean_bmus, perturbed_bmus, grid: Grid) -> np.ndarray:
    """Torus distance between the r-th clean BMU and the r-th perturbed BMU of each input.

    Parameters
    ----------
    clean_bmus, perturbed_bmus : array-like of int, ``[N, k]``
        Top-k BMUs of the same N inputs, row i of both being the same input.
    grid : Grid

    Returns
    -------
    numpy.ndarray float64 ``[N, k]``
    """
    c = check_bmus(clean_bmus, grid, name="clean BMUs")
    p = check_bmus(perturbed_bmus, grid, name="perturbed BMUs")
    if c.shape != p.shape:
        raise AnalysisError(
            f"clean BMUs {c.shape} and perturbed BMUs {p.shape} differ in shape: align the "
            "perturbed inputs with their clean twins (same ids, same k)"
        )
    return grid.unit_distance(c, p)


def align_ids(clean_ids, perturbed_ids, *, clean_name: str = "clean", perturbed_name: str = "perturbed") -> np.ndarray:
    """Row of the clean store holding each perturbed input, matched by sample id.

    The perturbed store may hold any subset of the clean inputs, in any order; every perturbed id
    must appear in the clean store, and ids must be unique in both.

    Returns
    -------
    numpy.ndarray int64 ``[len(perturbed_ids)]``

    Raises
    ------
    AnalysisError
        Naming the first perturbed id that the clean store lacks, or a duplicated id.
    """
    clean = np.asarray([str(i) for i in clean_ids], dtype=object)
    pert = np.asarray([str(i) for i in perturbed_ids], dtype=object)
    for name, ids in ((clean_name, clean), (perturbed_name, pert)):
        u, cnt = np.unique(ids, return_counts=True) if ids.size else (ids, np.zeros(0, int))
        if np.any(cnt > 1):
            raise AnalysisError(f"sample id {u[cnt > 1][0]!r} appears {cnt[cnt > 1][0]} times in {name}: ids must be unique; re-extract that split")
    if pert.size == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(clean, kind="stable")
    cs = clean[order]
    pos = np.minimum(np.searchsorted(cs, pert), max(cs.size - 1, 0))
    ok = cs[pos] == pert if cs.size else np.zeros(pert.size, bool)
    if not np.all(ok):
        first = int(np.argmin(ok))
        raise AnalysisError(
            f"ids of {perturbed_name} do not match {clean_name}: perturbed sample {first} has id "
            f"{pert[first]!r}, which {clean_name} does not hold ({int((~ok).sum())} such ids); attack "
            f"the same split you compare against (e.g. `somprobe attack --split {clean_name}`)"
        )
    return order[pos].astype(np.int64)


def shift_table(distances, ids) -> pd.DataFrame:
    """Tidy ``sample_id, rank, distance`` rows (rank 1 = top-1 BMU) from ``[N, k]`` shifts."""
    d = np.asarray(distances, dtype=np.float64)
    n, k = d.shape
    return pd.DataFrame({"sample_id": np.repeat(np.asarray([str(i) for i in ids], dtype=object), k),
                         "rank": np.tile(np.arange(1, k + 1), n), "distance": d.reshape(-1)})


def shift_summary(distances) -> dict:
    """Summary of ``[N, k]`` shifts: ``n`` = N inputs; ``mean, median, q25, q75`` over all N·k."""
    d = np.asarray(distances, dtype=np.float64)
    v = d.reshape(-1)
    if v.size == 0:
        return {"n": 0, "mean": np.nan, "median": np.nan, "q25": np.nan, "q75": np.nan}
    q25, med, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"n": int(d.shape[0]), "mean": float(v.mean()), "median": float(med), "q25": float(q25), "q75": float(q75)}

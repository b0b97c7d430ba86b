"""Cosine distances between SOM unit weights: all pairs (Fig. 6C/D, 9) and class centres (Fig. 7, 10).

Cosine distance is ``1 − cos(w_a, w_b)`` (study 003, Eq. 2), in ``[0, 2]``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import AnalysisError
from ..som.grid import Grid

__all__ = [
    "weight_cosine_distances", "weight_similarity_summary", "choose_classes", "centre_similarity",
]


def _as_numpy_weights(weights) -> np.ndarray:
    try:
        import torch

        if isinstance(weights, torch.Tensor):
            weights = weights.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    w = np.asarray(weights)
    if w.ndim != 2:
        raise AnalysisError(f"SOM weights must be a [G, D] matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise AnalysisError("SOM weights contain NaN or inf: the SOM file is corrupt; refit it with `somprobe fit`")
    return w


def weight_cosine_distances(weights) -> np.ndarray:
    """Cosine distance between every pair of unit weights.

    Parameters
    ----------
    weights : array-like or torch.Tensor ``[G, D]``

    Returns
    -------
    numpy.ndarray float32 ``[G, G]``
        Symmetric, zero diagonal, clipped to ``[0, 2]`` against round-off. A unit with an
        all-zero weight has distance 1 to every other unit (its cosine is taken as 0).
    """
    w = _as_numpy_weights(weights).astype(np.float64, copy=False)
    norm = np.linalg.norm(w, axis=1, keepdims=True)
    u = w / np.where(norm > 0, norm, 1.0)
    d = 1.0 - u @ u.T
    np.clip(d, 0.0, 2.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d.astype(np.float32)


def weight_similarity_summary(distances) -> dict:
    """Summary of the off-diagonal entries of a symmetric distance matrix.

    Returns
    -------
    dict
        ``mean, median, std, q05, q25, q75, q95`` over the ``G(G−1)/2`` distinct pairs of units
        (the entries above the diagonal; quantiles linearly interpolated as ``np.quantile``).
    """
    d = np.asarray(distances)
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 2:
        raise AnalysisError(f"need a square [G, G] distance matrix with G ≥ 2, got shape {d.shape}")
    v = d[np.triu_indices(d.shape[0], k=1)].astype(np.float64)
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(v.mean()), "median": float(q[2]), "std": float(v.std()),
            "q05": float(q[0]), "q25": float(q[1]), "q75": float(q[3]), "q95": float(q[4])}


def choose_classes(classes, *, n: int = 100, seed: int = 0) -> np.ndarray:
    """Up to ``n`` classes drawn without replacement with ``np.random.default_rng(seed)``, sorted.

    The draw depends only on the set of classes, ``n`` and ``seed``, so every layer and SOM size
    of a run compares the same classes.
    """
    cls = np.unique(np.asarray(classes, dtype=np.int64))
    if cls.size <= n:
        return cls
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(cls, size=int(n), replace=False))


def centre_similarity(weights, centres: pd.DataFrame, grid: Grid, *, classes=None) -> pd.DataFrame:
    """Cosine distance between the weights of the units nearest the class centres (Fig. 7, 10).

    Parameters
    ----------
    weights : array-like or torch.Tensor ``[G, D]``
        Unit weights of the SOM the centres were computed on.
    centres : pandas.DataFrame
        :func:`~somprobe.analysis.centres.class_centres` output (``class, row, col``).
    grid : Grid
    classes : array-like of int, optional
        Classes to compare (e.g. :func:`choose_classes` of the run's classes); default all in
        ``centres``. Classes without a centre raise :class:`AnalysisError`.

    Returns
    -------
    pandas.DataFrame
        ``class_a, class_b, unit_a, unit_b, cosine_distance``, one row per unordered pair
        ``class_a < class_b``. Two centres nearest the same unit have distance 0.
    """
    w = _as_numpy_weights(weights)
    if w.shape[0] != grid.n_units:
        raise AnalysisError(f"SOM weights have {w.shape[0]} units but the grid {grid.m}×{grid.n} has {grid.n_units}")
    cen = centres.sort_values("class")
    cls_all = cen["class"].to_numpy(np.int64)
    cls = cls_all if classes is None else np.unique(np.asarray(classes, dtype=np.int64))
    missing = np.setdiff1d(cls, cls_all)
    if missing.size:
        raise AnalysisError(f"classes {missing[:10].tolist()} have no centre: compute centres on a SOM-tr that holds them")
    sel = np.searchsorted(cls_all, cls)
    units = grid.nearest_unit(np.stack([cen["row"].to_numpy(np.float64), cen["col"].to_numpy(np.float64)], -1)[sel])
    d = weight_cosine_distances(w[units])
    ia, ib = np.triu_indices(cls.size, k=1)
    return pd.DataFrame({"class_a": cls[ia], "class_b": cls[ib], "unit_a": units[ia], "unit_b": units[ib],
                         "cosine_distance": d[ia, ib].astype(np.float64)})

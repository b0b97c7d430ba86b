"""Where on the SOM the BMUs fall: kernel density on the torus and per-class BMU counts.

Study 003 (Fig. 4, Supp. Fig. 1) shows the density of BMUs with Gaussian kernels. On a torus a
plain planar KDE breaks at the seams (mass near an edge leaks off the grid and the opposite edge
gets none), so the kernel here is *wrapped*: each BMU contributes through its copies in the
surrounding tiles. A Gaussian is separable, so the wrapped 2-D kernel is the product of two
wrapped 1-D kernels and the whole density is ``K_rows @ counts @ K_cols.T`` — exact and cheap.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..errors import AnalysisError
from ..som.grid import Grid
from .centres import check_bmus

__all__ = ["bmu_density", "density_points", "scott_bandwidth", "class_bmu_counts"]


def density_points(grid: Grid, *, resolution: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Row and column positions where :func:`bmu_density` evaluates the density.

    ``resolution`` points per unit along each axis: ``1`` gives the unit centres
    ``0, 1, …, m-1``; ``r`` gives ``0, 1/r, …`` (``m·r`` values).
    """
    if int(resolution) < 1:
        raise AnalysisError(f"resolution must be a positive integer, got {resolution}")
    r = int(resolution)
    return np.arange(grid.m * r) / r, np.arange(grid.n * r) / r


def scott_bandwidth(bmus, grid: Grid) -> float:
    """Scott's rule ``h = N^(-1/6) · σ`` with σ the mean per-axis *circular* spread of the BMUs.

    The circular standard deviation ``sqrt(-2 ln R) · size / 2π`` replaces the planar one, which
    is meaningless on a torus (a cluster across the seam would look grid-wide). Uniformly spread
    BMUs (R → 0) give a large σ; the result is clipped to ``[0.5, min(m, n)/4]`` units.
    """
    b = check_bmus(bmus, grid).ravel()
    if b.size == 0:
        return 1.0
    rc = grid.index_to_rc(b).astype(np.float64)
    sig = []
    for a, size in enumerate((grid.m, grid.n)):
        ang = 2 * np.pi * rc[:, a] / size
        R = min(max(math.hypot(np.cos(ang).mean(), np.sin(ang).mean()), 1e-12), 1.0)
        sig.append(math.sqrt(-2 * math.log(R)) * size / (2 * np.pi))
    h = b.size ** (-1 / 6) * float(np.mean(sig))
    return float(np.clip(h, 0.5, min(grid.m, grid.n) / 4))


def _wrapped_kernel_1d(points: np.ndarray, n_units: int, size: int, h: float, grid: Grid, axis: int) -> np.ndarray:
    """``[len(points), n_units]`` 1-D Gaussian summed over the periodic copies of each unit."""
    p = np.zeros((points.size, 1, 2))
    u = np.zeros((1, n_units, 2))
    p[..., axis] = points[:, None]
    u[..., axis] = np.arange(n_units)[None, :]
    # shortest signed displacement (Grid), then the further copies on both sides; enough copies
    # that the neglected ones lie beyond ~6 bandwidths (one on each side when h ≪ size)
    d = grid.delta(p, u)[..., axis]
    n_copies = max(1, math.ceil(6 * h / size))
    shifts = np.arange(-n_copies, n_copies + 1) * size
    if not grid.periodic:
        shifts = np.zeros(1)
    z = (d[..., None] + shifts) / h
    return np.exp(-0.5 * z * z).sum(-1) / (math.sqrt(2 * math.pi) * h)


def bmu_density(bmus, grid: Grid, *, bandwidth: float | str = 1.0, resolution: int = 1,
                weights=None) -> np.ndarray:
    """Gaussian kernel density of BMU positions on the grid, wrapped on a torus.

    Parameters
    ----------
    bmus : array-like of int, ``[N, k]`` or ``[N]``
        BMU indices; every column counts (all top-k BMUs of every input).
    grid : Grid
    bandwidth : float or "scott"
        Kernel standard deviation in grid units. The default ``1.0`` (one unit) smooths over
        direct neighbours, which suits 10×10–40×40 SOMs; ``"scott"`` uses
        :func:`scott_bandwidth`.
    resolution : int
        Evaluation points per unit along each axis (see :func:`density_points`).
    weights : array-like ``[N, k]``, optional
        A weight per BMU (default 1).

    Returns
    -------
    numpy.ndarray float64 ``[m·resolution, n·resolution]``
        Density per unit area, normalised so that the sum times the cell area
        ``1/resolution²`` is 1 (the density integrates to 1 over the ``m × n`` grid). On a
        planar grid the same Gaussian is used without wrapping (mass off the edges is
        renormalised away). All zeros if there are no BMUs.
    """
    b = check_bmus(bmus, grid)
    h = scott_bandwidth(b, grid) if isinstance(bandwidth, str) and bandwidth == "scott" else bandwidth
    if isinstance(h, str) or not np.isfinite(h) or h <= 0:
        raise AnalysisError(f"bandwidth must be a positive number of grid units or 'scott', got {bandwidth!r}")
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    counts = np.bincount(b.reshape(-1), weights=w, minlength=grid.n_units).reshape(grid.m, grid.n)
    rows, cols = density_points(grid, resolution=resolution)
    Kr = _wrapped_kernel_1d(rows, grid.m, grid.m, float(h), grid, 0)
    Kc = _wrapped_kernel_1d(cols, grid.n, grid.n, float(h), grid, 1)
    dens = Kr @ counts @ Kc.T
    total = dens.sum() / (int(resolution) ** 2)
    return dens / total if total > 0 else dens


def class_bmu_counts(bmus, labels, grid: Grid, *, classes=None) -> pd.DataFrame:
    """How often each unit is among the top-k BMUs of each chosen class (Fig. 5, Supp. Fig. 2).

    Parameters
    ----------
    bmus : array-like of int, ``[N, k]``
    labels : array-like of int, ``[N]``
    grid : Grid
    classes : array-like of int, optional
        Classes to count (default: all classes present). A class without inputs gets all-zero
        counts.

    Returns
    -------
    pandas.DataFrame
        ``class, unit, row, col, count``: one row per class and unit, zeros included, so every
        class is a full ``m × n`` heatmap.
    """
    b = check_bmus(bmus, grid)
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (b.shape[0],):
        raise AnalysisError(f"labels must have shape ({b.shape[0]},), got {y.shape}")
    cls = np.unique(y) if classes is None else np.unique(np.asarray(classes, dtype=np.int64))
    G = grid.n_units
    pos = np.searchsorted(cls, y)
    keep = (pos < cls.size) & (cls[np.minimum(pos, max(cls.size - 1, 0))] == y) if cls.size else np.zeros_like(y, bool)
    sel = b[keep]
    ci = np.repeat(pos[keep], b.shape[1])
    counts = np.bincount(ci * G + sel.reshape(-1), minlength=cls.size * G)
    rc = grid.index_to_rc(np.arange(G))
    return pd.DataFrame({
        "class": np.repeat(cls, G), "unit": np.tile(np.arange(G), cls.size),
        "row": np.tile(rc[:, 0], cls.size), "col": np.tile(rc[:, 1], cls.size),
        "count": counts.astype(np.int64),
    })

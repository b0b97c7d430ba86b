"""Class centres on the SOM torus and the distance of BMUs to them (D_class).

Study 003 (Sec. 2.4, Fig. 2) finds a class centre in three steps: the unit most often chosen as
top-1 BMU by the class's SOM-tr inputs (the *mode*); every BMU of the class moved to its copy,
among the 9 tiles of the unfolded torus, nearest the mode; the centre of mass of those copies,
wrapped back onto the grid. ``D_class`` of an input is the mean torus distance between its top-k
BMUs and the centre of its label's class.

All geometry goes through :class:`somprobe.som.grid.Grid`; everything here is vectorised over
samples (classes are grouped with ``np.bincount``), so 50,000 inputs × 10 BMUs take milliseconds.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import AnalysisError
from ..som.grid import Grid

__all__ = [
    "CENTRE_METHODS", "class_centres", "d_class", "class_means", "correct_vs_incorrect",
    "check_bmus",
]

CENTRE_METHODS = ("unfold", "circular")


def check_bmus(bmus, grid: Grid, *, name: str = "bmus") -> np.ndarray:
    """Validate a BMU index array and return it as int64 ``[N, k]``.

    A 1-D array is taken as top-1 BMUs (``k = 1``). Indices must lie in ``[0, G)``: an index
    outside means the BMUs belong to a SOM of another size.
    """
    b = np.asarray(bmus)
    if b.ndim == 1:
        b = b[:, None]
    if b.ndim != 2 or b.shape[1] < 1:
        raise AnalysisError(f"{name} must be a [N, k] array of unit indices, got shape {b.shape}")
    if not np.issubdtype(b.dtype, np.integer):
        raise AnalysisError(f"{name} must hold integer unit indices, got dtype {b.dtype}")
    if b.size and (b.min() < 0 or b.max() >= grid.n_units):
        raise AnalysisError(
            f"{name} hold unit indices in [{b.min()}, {b.max()}] but the {grid.m}×{grid.n} grid has "
            f"{grid.n_units} units: the BMUs come from a SOM of another size; recompute them "
            f"with `somprobe fit` for this SOM"
        )
    return b.astype(np.int64, copy=False)


def _check_labels(labels, n: int, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise AnalysisError(f"{name} must have shape ({n},) to match the BMUs, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise AnalysisError(f"{name} must be integer class labels, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def class_centres(bmus, labels, grid: Grid, *, method: str = "unfold", k_centre: int | None = None,
                  classes=None) -> pd.DataFrame:
    """Centre of each class on the SOM grid (study 003, Fig. 2).

    Parameters
    ----------
    bmus : array-like of int, ``[N, k]``
        Top-k BMU indices of the SOM-tr inputs, best first (column 0 is the top-1 BMU).
        A 1-D array is read as top-1 BMUs.
    labels : array-like of int, ``[N]``
        Class label of each input.
    grid : Grid
        The SOM's grid.
    method : {"unfold", "circular"}
        ``"unfold"`` (the paper's): the mode is the most frequent **top-1** BMU of the class
        (ties → the lowest unit index); each of the class's BMUs is moved to its copy among the
        9 tiles nearest the mode (:meth:`Grid.unfold`); the centre is their mean, wrapped back
        (:meth:`Grid.wrap`). On an even-sized axis a BMU exactly half the grid away from the
        mode has two equally near copies; :meth:`Grid.delta`'s rounding picks one. ``"circular"``: per-axis circular mean, the row angle ``2πr/m`` and
        column angle ``2πc/n`` averaged as unit vectors. The circular mean does not depend on a
        reference point, whereas unfolding depends on the mode: a class spread over more than
        half the torus is cut differently depending on where its mode lies. For compact classes
        (spread well under half the grid) the two agree closely; for a class spread uniformly
        the circular mean is undefined (resultant ≈ 0) and its angle arbitrary, and the unfolded
        centre is merely some point — ``D_class`` is large either way.
    k_centre : int, optional
        How many BMUs per input enter the centre of mass (the first ``k_centre`` columns). The
        paper says "all BMUs of the same class examples", so the default ``None`` uses all ``k``
        columns given; ``1`` uses only the top-1 BMU. The mode always uses the top-1 BMU.
    classes : array-like of int, optional
        Classes that must get a centre. A listed class without any input raises
        :class:`AnalysisError` (its centre is undefined). By default the classes present.

    Returns
    -------
    pandas.DataFrame
        One row per class, sorted by class: ``class, method, mode_unit, row, col, unit,
        n_samples`` where ``(row, col)`` is the real-valued centre in ``[0, m) × [0, n)``,
        ``unit`` the unit nearest it and ``n_samples`` the number of inputs of the class.
        ``mode_unit`` is reported for both methods.
    """
    if method not in CENTRE_METHODS:
        raise AnalysisError(f"unknown centre method {method!r}; choose one of {CENTRE_METHODS}")
    b = check_bmus(bmus, grid)
    y = _check_labels(labels, b.shape[0])
    if b.shape[0] == 0:
        raise AnalysisError("no inputs to compute class centres from: the SOM-tr split is empty")
    if k_centre is not None:
        if not 1 <= int(k_centre) <= b.shape[1]:
            raise AnalysisError(f"k_centre={k_centre} must be between 1 and the {b.shape[1]} BMUs per input")
        b = b[:, : int(k_centre)]
    cls, inv = np.unique(y, return_inverse=True)
    if classes is not None:
        want = np.unique(np.asarray(classes, dtype=np.int64))
        missing = np.setdiff1d(want, cls)
        if missing.size:
            raise AnalysisError(
                f"class {int(missing[0])} has no SOM-tr samples"
                + (f" (nor {missing.size - 1} more: {missing[1:6].tolist()}…)" if missing.size > 1 else "")
                + ": its centre is undefined; add samples of that class to SOM-tr "
                "(`somprobe extract --split som-tr`) or leave it out of `classes`"
            )
    C, G = cls.size, grid.n_units
    counts = np.bincount(inv, minlength=C)
    # mode: dense class×unit histogram of the top-1 BMUs; argmax picks the lowest index on ties
    hist = np.bincount(inv * G + b[:, 0], minlength=C * G).reshape(C, G)
    mode = hist.argmax(axis=1)
    del hist
    rc = grid.index_to_rc(b).astype(np.float64)  # [N, k, 2]
    k = b.shape[1]
    idx = np.repeat(inv, k)
    if method == "unfold":
        ref = grid.index_to_rc(mode).astype(np.float64)[inv][:, None, :]
        unf = grid.unfold(rc, ref).reshape(-1, 2)
        tot = counts * k
        centre = np.stack([np.bincount(idx, weights=unf[:, a], minlength=C) / tot for a in (0, 1)], axis=-1)
        centre = grid.wrap(centre)
    else:
        sizes = np.array([grid.m, grid.n], dtype=np.float64)
        ang = (rc.reshape(-1, 2) / sizes) * (2 * np.pi)
        cs = np.stack([np.bincount(idx, weights=np.cos(ang[:, a]), minlength=C) for a in (0, 1)], -1)
        sn = np.stack([np.bincount(idx, weights=np.sin(ang[:, a]), minlength=C) for a in (0, 1)], -1)
        centre = grid.wrap(np.arctan2(sn, cs) / (2 * np.pi) * sizes)
    # wrapping -0.0 or m-ε round-off can give exactly m: fold it back to 0
    centre = np.where(centre >= np.array([grid.m, grid.n]), 0.0, centre)
    return pd.DataFrame({
        "class": cls, "method": method, "mode_unit": mode.astype(np.int64),
        "row": centre[:, 0], "col": centre[:, 1], "unit": grid.nearest_unit(centre),
        "n_samples": counts.astype(np.int64),
    })


def _centre_lookup(labels: np.ndarray, centres: pd.DataFrame, *, split: str | None = None) -> np.ndarray:
    """Row of ``centres`` for each label; AnalysisError naming labels without a centre."""
    cls = centres["class"].to_numpy(dtype=np.int64)
    order = np.argsort(cls, kind="stable")
    cs = cls[order]
    pos = np.searchsorted(cs, labels)
    pos_c = np.minimum(pos, max(cs.size - 1, 0))
    ok = (cs.size > 0) & (cs[pos_c] == labels) if cs.size else np.zeros(labels.shape, bool)
    if not np.all(ok):
        bad = np.unique(labels[~ok])
        where = f"{split} labels" if split else "labels"
        raise AnalysisError(
            f"{where} {bad[:10].tolist()}{'…' if bad.size > 10 else ''} are absent from SOM-tr, "
            "so they have no class centre (centres always come from SOM-tr): extract SOM-tr "
            "with every class of the evaluated split, or drop those samples"
        )
    return order[pos_c]


def d_class(bmus, labels, centres: pd.DataFrame, grid: Grid, *, k: int | None = None,
            split: str | None = None) -> np.ndarray:
    """Per input, the mean torus distance between its top-k BMUs and its label's class centre.

    Parameters
    ----------
    bmus : array-like of int, ``[N, k]``
        Top-k BMUs of the inputs (any split).
    labels : array-like of int, ``[N]``
        Their labels; every label must have a centre.
    centres : pandas.DataFrame
        Output of :func:`class_centres` (columns ``class, row, col``), computed on SOM-tr.
    grid : Grid
    k : int, optional
        Use the first ``k`` BMUs (default: all columns, 10 in the paper).
    split : str, optional
        Split name, only for error messages.

    Returns
    -------
    numpy.ndarray float64 ``[N]``
    """
    b = check_bmus(bmus, grid)
    if k is not None:
        b = b[:, : int(k)]
    y = _check_labels(labels, b.shape[0])
    row = _centre_lookup(y, centres, split=split)
    c = np.stack([centres["row"].to_numpy(np.float64), centres["col"].to_numpy(np.float64)], -1)[row]
    d = grid.distance(grid.index_to_rc(b), c[:, None, :])
    return d.mean(axis=1)


def class_means(values, labels) -> pd.DataFrame:
    """Per-class mean of a per-sample value: DataFrame ``class, d_class, n_samples``."""
    v = np.asarray(values, dtype=np.float64)
    cls, inv, n = np.unique(np.asarray(labels, dtype=np.int64), return_inverse=True, return_counts=True)
    s = np.bincount(inv, weights=v, minlength=cls.size)
    return pd.DataFrame({"class": cls, "d_class": s / n, "n_samples": n.astype(np.int64)})


def _summary(v: np.ndarray) -> dict:
    if v.size == 0:
        return {"n": 0, "mean": np.nan, "median": np.nan, "q25": np.nan, "q75": np.nan}
    q25, med, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(med), "q25": float(q25), "q75": float(q75)}


def correct_vs_incorrect(dclass, correct) -> pd.DataFrame:
    """Summary of per-sample ``D_class`` split by whether the model's prediction was right.

    Parameters
    ----------
    dclass : array-like float ``[N]``
        Per-sample D_class to the label's centre (SOM-val in study 003, Supp. Fig. 3).
    correct : array-like bool ``[N]``

    Returns
    -------
    pandas.DataFrame
        Two rows (``correct`` True then False): ``correct, n, mean, median, q25, q75`` over
        samples. A group without samples has ``n = 0`` and NaN statistics. (The paper's box plot
        is over per-class means; those come from ``dclass_samples`` grouped by label.)
    """
    d = np.asarray(dclass, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if ok.shape != d.shape:
        raise AnalysisError(f"correct has shape {ok.shape} but d_class has {d.shape}")
    return pd.DataFrame([{"correct": True, **_summary(d[ok])}, {"correct": False, **_summary(d[~ok])}])

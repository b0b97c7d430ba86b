"""Convexity test of classification regions (study 002, Fawzi et al.).

If the region of class c were convex, every convex combination of inputs labelled c would be
labelled c too. For k = 2…10 inputs of one class, draw random convex weights (a Dirichlet
distribution, seeded) and count how many combinations keep the label. The study finds that
regions are not convex: the share falls as k grows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import PathError
from .core import CHUNK, _logits
from .optimise import _count, _number
from .spaces import Space

__all__ = ["convexity_test", "convexity_summary", "DEFAULT_KS"]

DEFAULT_KS = tuple(range(2, 11))


def convexity_test(
    space: Space,
    points: Tensor,
    labels,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    trials: int = 100,
    alpha: float = 1.0,
    seed: int = 0,
    chunk: int = CHUNK,
) -> dict[str, np.ndarray]:
    """Label random convex combinations of k same-class points, for every k in ``ks``.

    Parameters
    ----------
    space : Space
    points : Tensor [N, *shape]
        Inputs (or latents) of one or more classes.
    labels : array of int [N]
        Class of each point — normally the model's prediction, so that every point lies in the
        region tested.
    ks : sequence of int
        Numbers of points combined (each >= 2; study: 2…10).
    trials : int
        Combinations drawn per k. Each draws a class uniformly among those with at least k
        points, k distinct points of it, and weights ~ Dirichlet(alpha, …, alpha).
    alpha : float
        Dirichlet concentration (1: uniform on the simplex).
    seed : int
        Seeds a local NumPy generator (no global state).
    chunk : int
        Combinations per forward pass.

    Returns
    -------
    dict of ndarray, one entry per combination
        ``k``, ``class``, ``pred`` (the label of the combination), ``in_class`` (bool),
        ``p_class`` (softmax probability of the class at the combination).

    Raises
    ------
    PathError
        Bad ks/trials/alpha, or no class has k points for some k.
    """
    ks = [_count("k", k, low=2, hint="a convex combination needs at least 2 points") for k in ks]
    if not ks:
        raise PathError("ks is empty: give the numbers of points to combine, e.g. 2..10")
    trials = _count("trials", trials, low=1)
    alpha = _number("alpha", alpha, open_low=True)
    _count("chunk", chunk, low=1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise PathError(f"seed must be an integer, got {seed!r}")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != points.shape[0]:
        raise PathError(f"{points.shape[0]} points but {labels.shape[0]} labels")
    classes, counts = np.unique(labels, return_counts=True)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    rng = np.random.default_rng(seed)
    idx_all, w_all, cls_all, k_all = [], [], [], []
    for k in ks:  # one vectorised draw per (k, class); both loops are short
        ok = classes[counts >= k]
        if not len(ok):
            raise PathError(f"no class has {k} points to combine (largest class has {counts.max()}); "
                            f"give more points per class or smaller ks")
        cls = rng.choice(ok, size=trials)
        idx = np.empty((trials, k), dtype=np.int64)
        for c in np.unique(cls):
            rows = np.flatnonzero(cls == c)
            m = members[c]
            # k distinct members per row: the first k of a random permutation of the class.
            pick = np.argsort(rng.random((len(rows), len(m))), axis=1)[:, :k]
            idx[rows] = m[pick]
        w = rng.dirichlet(np.full(k, alpha), size=trials)
        idx_all.append(idx)
        w_all.append(w)
        cls_all.append(cls)
        k_all.append(np.full(trials, k))
    flat = points.detach().flatten(1)
    preds, probs = [], []
    with torch.no_grad():
        for idx, w, cls in zip(idx_all, w_all, cls_all):
            for i in range(0, len(idx), chunk):
                ii = torch.as_tensor(idx[i:i + chunk], device=flat.device)
                ww = torch.as_tensor(w[i:i + chunk], dtype=flat.dtype, device=flat.device)
                combo = torch.einsum("tk,tkd->td", ww, flat[ii])
                out = _logits(space, combo.reshape(len(combo), *points.shape[1:])).float()
                c = torch.as_tensor(cls[i:i + chunk], device=out.device)
                preds.append(out.argmax(1).cpu().numpy())
                probs.append(out.softmax(1).gather(1, c[:, None])[:, 0].cpu().numpy())
    cls = np.concatenate(cls_all)
    pred = np.concatenate(preds)
    return {"k": np.concatenate(k_all), "class": cls, "pred": pred, "in_class": pred == cls,
            "p_class": np.concatenate(probs).astype(np.float64)}


def convexity_summary(result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Share of combinations that keep the class, per k.

    Returns
    -------
    dict of ndarray, one entry per k
        ``k``, ``n`` (combinations), ``share_in_class``, ``mean_p_class``.
    """
    k = np.asarray(result["k"])
    ks, inv, n = np.unique(k, return_inverse=True, return_counts=True)
    share = np.bincount(inv, weights=np.asarray(result["in_class"], dtype=float)) / n
    mean_p = np.bincount(inv, weights=np.asarray(result["p_class"], dtype=float)) / n
    return {"k": ks, "n": n, "share_in_class": share, "mean_p_class": mean_p}

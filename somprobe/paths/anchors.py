"""Bookkeeping shared by the recursive path finders (barrier bypass, region paths).

Both methods grow P piecewise-linear paths by inserting new anchors between two neighbours, round
after round, for all pairs at once. :class:`AnchorSet` keeps every anchor of every pair in one
flat pool (``[N, D]``) with its pair and a dyadic *key* in [0, 1]: the two ends have keys 0 and 1,
and a point inserted between anchors with keys k₁ and k₂ gets (k₁ + k₂)/2. Sorting by (pair, key)
gives every path in order, so insertion never shifts tensors around and all bookkeeping stays
vectorised. Keys are exact in float64 down to 52 levels of recursion, far beyond any depth limit.

:func:`segment_values` evaluates a function of the logits at many points on many segments
(a ragged set: each segment its own number of points), in chunks of ``chunk`` points, so memory
stays bounded by ``chunk × D`` whatever the number of pairs and points.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["AnchorSet", "segment_values", "cross_entropy"]


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-row cross-entropy ``[M]`` of ``logits [M, C]`` against ``target [M]``."""
    return torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")


class AnchorSet:
    """The anchors of P paths in one flat pool; see the module docstring.

    Parameters
    ----------
    a, b : Tensor [P, *shape]
        The two ends of each path.
    """

    def __init__(self, a: Tensor, b: Tensor):
        self.shape = tuple(a.shape[1:])
        self.n_pairs = int(a.shape[0])
        p = np.arange(self.n_pairs)
        self.points = torch.cat([a.detach().flatten(1), b.detach().flatten(1)])
        self.pair = np.concatenate([p, p])
        self.key = np.concatenate([np.zeros(self.n_pairs), np.ones(self.n_pairs)])

    @property
    def first(self) -> np.ndarray:
        """Pool index of every pair's first end."""
        return np.arange(self.n_pairs)

    @property
    def last(self) -> np.ndarray:
        """Pool index of every pair's second end."""
        return np.arange(self.n_pairs, 2 * self.n_pairs)

    def replace(self, index: np.ndarray, points: Tensor) -> None:
        """Overwrite anchors ``index`` (e.g. ends optimised to low loss) with ``points``."""
        self.points[torch.as_tensor(index, device=self.points.device)] = points.detach().flatten(1)

    def insert(self, left: np.ndarray, right: np.ndarray, points: Tensor) -> np.ndarray:
        """Insert ``points [S, *shape]`` between pool anchors ``left`` and ``right``; return their
        pool indices."""
        left = np.asarray(left, dtype=np.int64)
        right = np.asarray(right, dtype=np.int64)
        start = len(self.pair)
        self.points = torch.cat([self.points, points.detach().flatten(1).to(self.points)])
        self.pair = np.concatenate([self.pair, self.pair[left]])
        self.key = np.concatenate([self.key, 0.5 * (self.key[left] + self.key[right])])
        return np.arange(start, start + len(left))

    def order(self) -> tuple[np.ndarray, np.ndarray]:
        """Pool indices sorted by (pair, key) and the number of anchors of every pair."""
        order = np.lexsort((self.key, self.pair))
        counts = np.bincount(self.pair, minlength=self.n_pairs)
        return order, counts

    def padded(self) -> tuple[Tensor, Tensor]:
        """``anchors [P, K, *shape]`` in path order and ``n_anchors [P]``; rows past a pair's
        count repeat its last anchor (as :class:`~somprobe.paths.core.PathBatch` pads)."""
        order, counts = self.order()
        k = int(counts.max()) if counts.size else 0
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        pos = np.minimum(np.arange(k)[None, :], counts[:, None] - 1)
        idx = order[starts[:, None] + pos]                                   # [P, K]
        dev = self.points.device
        out = self.points[torch.as_tensor(idx.reshape(-1), device=dev)]
        return out.reshape(self.n_pairs, k, *self.shape), torch.as_tensor(counts, dtype=torch.long)


def segment_values(
    fn: Callable[[Tensor], Tensor],
    starts: Tensor,
    ends: Tensor,
    counts,
    *,
    shape: tuple[int, ...],
    chunk: int = 1024,
    include_ends: bool = True,
) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """Evaluate ``fn`` at evenly spaced points on S segments, ``counts[s]`` intervals each.

    Parameters
    ----------
    fn : callable
        Points ``[M, *shape]`` → values ``[M, ...]`` (e.g. logits); called under ``no_grad``.
    starts, ends : Tensor [S, D]
        Flattened segment ends.
    counts : array of int [S]
        Number of intervals n_s of segment s: it is sampled at t = k/n_s, k = 0..n_s (or
        k = 1..n_s−1 with ``include_ends=False``).
    shape : tuple
        Shape of one point (``fn``'s input is reshaped to ``[M, *shape]``).
    chunk : int
        Points per call of ``fn``.
    include_ends : bool
        Also evaluate t = 0 and t = 1.

    Returns
    -------
    values : Tensor [M, ...]
        ``fn`` at every point, segment after segment, in order of t.
    seg : numpy int64 [M]
        Segment of each point.
    t : numpy float64 [M]
        Position of each point on its segment.
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    per = counts + 1 if include_ends else np.maximum(counts - 1, 0)
    seg = np.repeat(np.arange(len(counts)), per)
    first = np.concatenate([[0], np.cumsum(per)[:-1]])
    k = np.arange(len(seg)) - np.repeat(first, per) + (0 if include_ends else 1)
    t = k / np.repeat(np.maximum(counts, 1), per)
    outs = []
    dev = starts.device
    with torch.no_grad():
        for i in range(0, len(seg), chunk):
            s = torch.as_tensor(seg[i:i + chunk], device=dev)
            tt = torch.as_tensor(t[i:i + chunk], dtype=starts.dtype, device=dev)[:, None]
            x0 = starts[s]
            pts = x0 + tt * (ends[s] - x0)
            outs.append(fn(pts.reshape(len(pts), *shape)))
    if outs:
        values = torch.cat(outs)
    else:
        values = torch.empty(0)
    return values, seg, t

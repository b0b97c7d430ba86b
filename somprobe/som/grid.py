"""Geometry of an m×n SOM grid on a torus (periodic boundary) or a plane.

This module is the one place for grid distances in somprobe: training, BMU analyses, class
centres and shifts all call it. Points are ``(row, col)`` pairs in the last axis, integer unit
positions or real-valued points (class centres), as numpy arrays or torch tensors.

On a torus the displacement along an axis of size ``s`` is the signed ``Δ`` of smallest magnitude
among ``Δ + k·s``; the distance is the Euclidean norm of that displacement. This is the same as
the shortest distance over the 9 copies of the grid that study 003 (Fig. 2A) describes, for any
``m`` and ``n`` (quicksom's precomputed table is wrong when ``m`` is not a multiple of ``n``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Grid", "TOPOLOGIES"]

TOPOLOGIES = ("torus", "planar")


def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


@dataclass(frozen=True)
class Grid:
    """An ``m`` (rows) × ``n`` (columns) grid of SOM units, indexed row-major.

    Parameters
    ----------
    m, n : int
        Rows and columns, each at least 2.
    topology : {"torus", "planar"}
        ``torus`` wraps both axes (periodic boundary), ``planar`` does not.
    """

    m: int
    n: int
    topology: str = "torus"

    def __post_init__(self):
        for name, v in (("m", self.m), ("n", self.n)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"grid size {name} must be an integer, got {v!r}")
            if v < 2:
                raise ValueError(
                    f"grid size {name}={v} is too small: a SOM grid needs at least 2×2 units"
                )
        object.__setattr__(self, "m", int(self.m))
        object.__setattr__(self, "n", int(self.n))
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {self.topology!r}; choose one of {TOPOLOGIES}")

    # indexing ----------------------------------------------------------------
    @property
    def n_units(self) -> int:
        return self.m * self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.m, self.n)

    @property
    def periodic(self) -> bool:
        return self.topology == "torus"

    def index_to_rc(self, index):
        """Unit index (any shape) → ``(..., 2)`` integer ``(row, col)``."""
        if _is_torch(index):
            self._check_index(index.min().item() if index.numel() else 0, index.max().item() if index.numel() else 0)
            return torch.stack([torch.div(index, self.n, rounding_mode="floor"), index % self.n], dim=-1)
        index = np.asarray(index)
        if index.size:
            self._check_index(index.min(), index.max())
        return np.stack([index // self.n, index % self.n], axis=-1)

    def rc_to_index(self, rc):
        """``(..., 2)`` integer ``(row, col)`` → unit index."""
        r, c = rc[..., 0], rc[..., 1]
        if not _is_torch(rc):
            r, c = np.asarray(r), np.asarray(c)
        bad = (r < 0) | (r >= self.m) | (c < 0) | (c >= self.n)
        if bool(bad.any()):
            raise ValueError(f"(row, col) outside the {self.m}×{self.n} grid")
        return r * self.n + c

    def _check_index(self, lo, hi):
        if lo < 0 or hi >= self.n_units:
            raise ValueError(
                f"unit index out of range [0, {self.n_units}) for a {self.m}×{self.n} grid "
                f"(got min {lo}, max {hi})"
            )

    def coords(self, *, device=None, dtype=None):
        """``(G, 2)`` positions ``(row, col)`` of all units, row-major.

        numpy float64 by default; a torch tensor when ``device`` or ``dtype`` is a torch one.
        """
        rc = np.stack(np.divmod(np.arange(self.n_units), self.n), axis=-1).astype(np.float64)
        if device is not None or isinstance(dtype, torch.dtype):
            return torch.as_tensor(rc, dtype=dtype or torch.float32, device=device)
        return rc

    # distances ---------------------------------------------------------------
    def _sizes(self, like):
        if _is_torch(like):
            return torch.tensor([self.m, self.n], dtype=like.dtype if like.is_floating_point() else torch.float64,
                                device=like.device)
        return np.array([self.m, self.n], dtype=np.float64)

    def delta(self, p, q):
        """Signed shortest displacement from ``p`` to ``q`` (``(..., 2)``, broadcasting).

        On a torus each component lies in ``[-size/2, size/2]``.
        """
        if _is_torch(p) or _is_torch(q):
            ref = p if _is_torch(p) else q
            p = torch.as_tensor(p, device=ref.device)
            q = torch.as_tensor(q, device=ref.device)
            dtype = torch.promote_types(torch.promote_types(p.dtype, q.dtype), torch.float32)
            d = q.to(dtype) - p.to(dtype)
            if self.periodic:
                s = self._sizes(d)
                d = d - s * torch.round(d / s)
            return d
        d = np.asarray(q, dtype=np.float64) - np.asarray(p, dtype=np.float64)
        if self.periodic:
            s = self._sizes(d)
            d = d - s * np.round(d / s)
        return d

    def sq_distance(self, p, q):
        """Squared grid distance between points ``p`` and ``q`` (broadcasting)."""
        d = self.delta(p, q)
        return (d * d).sum(-1)

    def distance(self, p, q):
        """Grid distance between points ``p`` and ``q`` (broadcasting over leading axes)."""
        d2 = self.sq_distance(p, q)
        return torch.sqrt(d2) if _is_torch(d2) else np.sqrt(d2)

    def unit_distance(self, a, b):
        """Grid distance between units given by index (broadcasting)."""
        if _is_torch(a) or _is_torch(b):
            ref = a if _is_torch(a) else b
            a, b = torch.as_tensor(a, device=ref.device), torch.as_tensor(b, device=ref.device)
        return self.distance(self.index_to_rc(a), self.index_to_rc(b))

    def unit_sq_distances(self, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """``(G, G)`` squared distances between all units as a torch tensor (for training)."""
        # Separable: d² = d_row² + d_col², so two small tables and one G×G add instead of a
        # [G, G, 2] pass (which cost ~0.3 s for a 40×40 map, as much as its training).
        def axis(size):
            i = torch.arange(size, dtype=torch.float64, device=device)
            d = i[None, :] - i[:, None]
            if self.periodic:
                d = d - size * torch.round(d / size)
            return d * d

        rows, cols = axis(self.m), axis(self.n)
        sqd = rows[:, None, :, None] + cols[None, :, None, :]
        return sqd.reshape(self.n_units, self.n_units).to(dtype)

    def unit_distances(self) -> np.ndarray:
        """``(G, G)`` numpy distances between all pairs of units."""
        c = self.coords()
        return self.distance(c[:, None, :], c[None, :, :])

    @property
    def max_distance(self) -> float:
        """Largest possible distance: the half-diagonal on a torus, the diagonal on a plane."""
        if self.periodic:
            return float(np.hypot(self.m / 2, self.n / 2))
        return float(np.hypot(self.m - 1, self.n - 1))

    # unfolding ---------------------------------------------------------------
    def unfold(self, points, reference):
        """The copy of each point, among the 9 tiles, nearest ``reference`` (broadcasting).

        Returns positions in the unfolded 3×-sized plane (they may be negative or exceed the
        grid), such that ``points_unfolded - reference`` is the shortest displacement.
        On a planar grid the points are returned unchanged.
        """
        if not self.periodic:
            return points
        return reference + self.delta(reference, points)

    def wrap(self, points):
        """Map real-valued positions back into ``[0, m) × [0, n)`` (identity on a plane)."""
        if not self.periodic:
            return points
        s = self._sizes(points) if _is_torch(points) else np.array([self.m, self.n], dtype=np.float64)
        return torch.remainder(points, s) if _is_torch(points) else np.mod(points, s)

    def nearest_unit(self, points):
        """Index of the unit nearest each real-valued point (``(..., 2)`` → ``(...)``)."""
        p = np.asarray(points, dtype=np.float64)
        r, c = np.rint(p[..., 0]), np.rint(p[..., 1])
        if self.periodic:
            r, c = np.mod(r, self.m), np.mod(c, self.n)
        else:
            r, c = np.clip(r, 0, self.m - 1), np.clip(c, 0, self.n - 1)
        return (r * self.n + c).astype(np.int64)

    def neighbors(self, connectivity: int = 4) -> np.ndarray:
        """``(G, connectivity)`` indices of each unit's grid neighbours.

        ``connectivity`` 4 (von Neumann: up, down, left, right) or 8 (Moore: with diagonals).
        On a planar grid missing neighbours at the border are ``-1``.
        """
        if connectivity == 4:
            offs = [(-1, 0), (1, 0), (0, -1), (0, 1)]
        elif connectivity == 8:
            offs = [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]
        else:
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
        rc = self.index_to_rc(np.arange(self.n_units))
        out = np.empty((self.n_units, len(offs)), dtype=np.int64)
        for j, (dr, dc) in enumerate(offs):
            r, c = rc[:, 0] + dr, rc[:, 1] + dc
            if self.periodic:
                out[:, j] = (r % self.m) * self.n + (c % self.n)
            else:
                ok = (r >= 0) & (r < self.m) & (c >= 0) & (c < self.n)
                out[:, j] = np.where(ok, r * self.n + c, -1)
        return out

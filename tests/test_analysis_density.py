"""Wrapped-kernel BMU density and per-class BMU counts against brute-force references."""
import math

import numpy as np
import pytest

from somprobe.analysis import bmu_density, class_bmu_counts, density_points, scott_bandwidth
from somprobe.errors import AnalysisError
from somprobe.som.grid import Grid


def brute_density(bmus, m, n, h, res, copies=1):
    """Sum over every BMU of a 2-D Gaussian at each of its 9 copies (``copies=1``; 25 with
    ``copies=2``, …), then normalise."""
    rows = np.arange(m * res) / res
    cols = np.arange(n * res) / res
    out = np.zeros((rows.size, cols.size))
    for u in np.ravel(bmus):
        r, c = divmod(int(u), n)
        for a in range(-copies, copies + 1):
            for b in range(-copies, copies + 1):
                dr = rows[:, None] - (r + a * m)
                dc = cols[None, :] - (c + b * n)
                out += np.exp(-(dr**2 + dc**2) / (2 * h * h)) / (2 * math.pi * h * h)
    return out / (out.sum() / res**2)


# with h ≤ 1 on these grids the copies beyond the 9 tiles weigh < 1e-6 relative; with h = 1.5
# on 5 columns they do not, and bmu_density includes the next ring of copies
@pytest.mark.parametrize("h,res,copies", [(1.0, 1, 1), (0.6, 3, 1), (1.5, 2, 2)])
def test_density_matches_tiled_bruteforce(h, res, copies):
    rng = np.random.default_rng(0)
    m, n = 7, 5
    bmus = rng.integers(0, m * n, (40, 3))
    got = bmu_density(bmus, Grid(m, n), bandwidth=h, resolution=res)
    ref = brute_density(bmus, m, n, h, res, copies)
    assert got.shape == (m * res, n * res)
    assert np.allclose(got, ref, rtol=1e-6, atol=1e-12)
    assert got.sum() / res**2 == pytest.approx(1.0)


def test_density_is_periodic_at_the_seam():
    # a planar KDE would put half of a corner BMU's mass off the grid; the wrapped kernel is
    # symmetric across both seams and moves with the BMUs (translation on a torus = np.roll)
    g = Grid(8, 6)
    d0 = bmu_density(np.array([[0]]), g, bandwidth=1.0)
    assert d0[1, 0] == pytest.approx(d0[-1, 0])
    assert d0[0, 1] == pytest.approx(d0[0, -1])
    assert d0[1, 1] == pytest.approx(d0[-1, -1])
    rng = np.random.default_rng(1)
    b = rng.integers(0, g.n_units, (30, 2))
    rc = g.index_to_rc(b)
    moved = ((rc[..., 0] + 3) % 8) * 6 + (rc[..., 1] + 5) % 6
    assert np.allclose(bmu_density(moved, g), np.roll(bmu_density(b, g), (3, 5), axis=(0, 1)))


def test_wide_bandwidth_uses_more_copies():
    # with h comparable to the grid, 9 copies would miss mass; the density of a single BMU then
    # tends to uniform, 1/(m·n) per unit area
    g = Grid(4, 4)
    d = bmu_density(np.array([[5]]), g, bandwidth=20.0)
    assert np.allclose(d, 1 / 16, rtol=1e-6)


def test_density_points_and_bad_bandwidth():
    r, c = density_points(Grid(3, 4), resolution=2)
    assert r.tolist() == [0, 0.5, 1, 1.5, 2, 2.5] and c.size == 8
    with pytest.raises(AnalysisError, match="bandwidth"):
        bmu_density(np.array([[0]]), Grid(3, 3), bandwidth=0)
    with pytest.raises(AnalysisError, match="bandwidth"):
        bmu_density(np.array([[0]]), Grid(3, 3), bandwidth="silverman")
    with pytest.raises(AnalysisError, match="resolution"):
        bmu_density(np.array([[0]]), Grid(3, 3), resolution=0)


def test_scott_bandwidth_compact_vs_spread():
    g = Grid(20, 20)
    rng = np.random.default_rng(2)
    compact = (rng.integers(-1, 2, (500, 2)) + [0, 19]) % 20  # straddles the column seam
    spread = rng.integers(0, 20, (500, 2))
    h_c = scott_bandwidth(compact[:, 0] * 20 + compact[:, 1], g)
    h_s = scott_bandwidth(spread[:, 0] * 20 + spread[:, 1], g)
    assert 0.5 <= h_c < h_s <= 5.0
    assert bmu_density(compact[:, 0] * 20 + compact[:, 1], g, bandwidth="scott").sum() == pytest.approx(1.0)


def test_class_bmu_counts_bruteforce():
    rng = np.random.default_rng(3)
    g = Grid(4, 5)
    y = rng.integers(0, 6, 50)
    b = rng.integers(0, 20, (50, 10))
    t = class_bmu_counts(b, y, g, classes=[1, 4, 9])
    assert len(t) == 3 * 20
    for c in (1, 4):
        ref = np.bincount(b[y == c].ravel(), minlength=20)
        got = t[t["class"] == c].sort_values("unit")["count"].to_numpy()
        assert (got == ref).all()
    assert (t[t["class"] == 9]["count"] == 0).all()  # a class without inputs: all zeros
    row = t[(t["class"] == 4) & (t["unit"] == 13)].iloc[0]
    assert (row["row"], row["col"]) == (2, 3)
    assert t["count"].sum() == (np.isin(y, [1, 4]).sum()) * 10

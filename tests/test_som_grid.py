"""Torus/planar grid geometry (somprobe.som.grid) against brute force over the 9 tiles."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from somprobe.som.grid import Grid


def brute_torus_distance(p, q, m, n):
    """Shortest Euclidean distance from p to any of the 9 copies of q (study 003, Fig. 2A)."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    best = np.inf
    for dm, dn in itertools.product((-1, 0, 1), repeat=2):
        best = min(best, float(np.hypot(q[0] + dm * m - p[0], q[1] + dn * n - p[1])))
    return best


sizes = st.integers(min_value=2, max_value=15)
coord = st.floats(min_value=0, max_value=1, allow_nan=False, exclude_max=True)


@pytest.mark.parametrize("m,n", [(7, 12), (12, 7), (2, 5), (20, 20), (3, 10)])
def test_unit_distances_equal_brute_force_over_nine_tiles(m, n):
    g = Grid(m, n)
    D = g.unit_distances()
    rc = g.index_to_rc(np.arange(g.n_units))
    brute = np.array([[brute_torus_distance(a, b, m, n) for b in rc] for a in rc])
    np.testing.assert_allclose(D, brute, atol=1e-12)
    # The torch table used for training is the same, squared.
    sq = g.unit_sq_distances(dtype=torch.float64).numpy()
    np.testing.assert_allclose(sq, brute ** 2, atol=1e-9)


def test_planar_distances_are_euclidean():
    g = Grid(4, 6, "planar")
    rc = g.index_to_rc(np.arange(24))
    expect = np.hypot(rc[:, None, 0] - rc[None, :, 0], rc[:, None, 1] - rc[None, :, 1])
    np.testing.assert_allclose(g.unit_distances(), expect)
    np.testing.assert_allclose(g.unit_sq_distances(dtype=torch.float64).numpy(), expect ** 2, atol=1e-12)
    assert g.max_distance == pytest.approx(np.hypot(3, 5))


@settings(max_examples=200, deadline=None)
@given(m=sizes, n=sizes, a=coord, b=coord, c=coord, d=coord)
def test_real_points_match_brute_force(m, n, a, b, c, d):
    g = Grid(m, n)
    p, q = np.array([a * m, b * n]), np.array([c * m, d * n])
    assert g.distance(p, q) == pytest.approx(brute_torus_distance(p, q, m, n), abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(m=sizes, n=sizes, a=coord, b=coord, c=coord, d=coord,
       tr=st.floats(-50, 50), tc=st.floats(-50, 50), km=st.integers(-3, 3), kn=st.integers(-3, 3))
def test_symmetry_translation_bound(m, n, a, b, c, d, tr, tc, km, kn):
    g = Grid(m, n)
    p, q = np.array([a * m, b * n]), np.array([c * m, d * n])
    dpq = g.distance(p, q)
    assert dpq == pytest.approx(g.distance(q, p), abs=1e-9)
    shift = np.array([tr, tc])
    assert g.distance(p + shift, q + shift) == pytest.approx(dpq, abs=1e-7)
    # Whole-grid translations of one point: the same point on a torus.
    assert g.distance(p + np.array([km * m, kn * n]), q) == pytest.approx(dpq, abs=1e-7)
    assert dpq <= g.max_distance + 1e-9
    assert g.max_distance == pytest.approx(np.hypot(m / 2, n / 2))


@settings(max_examples=100, deadline=None)
@given(m=sizes, n=sizes, a=coord, b=coord, c=coord, d=coord)
def test_unfold_gives_the_nearest_copy(m, n, a, b, c, d):
    g = Grid(m, n)
    p, ref = np.array([a * m, b * n]), np.array([c * m, d * n])
    u = g.unfold(p, ref)
    # The unfolded copy is a whole-grid translate of p whose plain distance is the torus one.
    k = (u - p) / np.array([m, n])
    np.testing.assert_allclose(k, np.round(k), atol=1e-9)
    assert np.hypot(*(u - ref)) == pytest.approx(g.distance(p, ref), abs=1e-9)
    np.testing.assert_allclose(g.wrap(u), p, atol=1e-9)


def test_torch_and_numpy_agree():
    g = Grid(7, 12)
    rng = np.random.default_rng(0)
    p = rng.random((50, 2)) * [7, 12]
    q = rng.random((50, 2)) * [7, 12]
    t = g.distance(torch.tensor(p), torch.tensor(q))
    np.testing.assert_allclose(t.numpy(), g.distance(p, q), atol=1e-12)


@pytest.mark.parametrize("m,n", [(7, 12), (3, 3), (20, 20)])
def test_neighbors_are_the_units_at_distance_one_or_diagonal(m, n):
    g = Grid(m, n)
    D = g.unit_distances()
    for conn, radius in ((4, 1.0), (8, np.sqrt(2))):
        nb = g.neighbors(conn)
        for u in range(g.n_units):
            expect = set(np.flatnonzero((D[u] > 0) & (D[u] <= radius + 1e-9)))
            assert set(nb[u]) == expect


def test_planar_neighbors_mark_missing_with_minus_one():
    nb = Grid(3, 3, "planar").neighbors(4)
    assert sorted(nb[0]) == [-1, -1, 1, 3]
    assert sorted(nb[4]) == [1, 3, 5, 7]


def test_index_round_trip_and_nearest_unit():
    g = Grid(7, 12)
    idx = np.arange(g.n_units)
    np.testing.assert_array_equal(g.rc_to_index(g.index_to_rc(idx)), idx)
    # a real point near (6.6, 11.7) is nearest unit (0, 0) across the wrap
    assert g.nearest_unit(np.array([6.6, 11.7])) == 0
    with pytest.raises(ValueError):
        g.index_to_rc(np.array([84]))


@pytest.mark.parametrize("m,n", [(1, 5), (5, 1), (0, 0)])
def test_grid_smaller_than_two_by_two_is_refused(m, n):
    with pytest.raises(ValueError, match="at least 2"):
        Grid(m, n)


def test_unknown_topology():
    with pytest.raises(ValueError, match="torus"):
        Grid(3, 3, "sphere")

"""The map: BMUs, errors, U-matrix, persistence and bad input (somprobe.som.map)."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from somprobe.errors import SOMError
from somprobe.som import SOM, Grid


def fitted(m=4, n=5, dim=6, metric="cosine", seed=0):
    som = SOM(m, n, dim, metric=metric, device="cpu")
    g = torch.Generator().manual_seed(seed)
    som.weights = torch.randn(m * n, dim, generator=g)
    return som


def brute_distances(X, W, metric):
    X, W = np.asarray(X, np.float64), np.asarray(W, np.float64)
    if metric == "cosine":
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
        return 1.0 - Xn @ Wn.T
    return np.sqrt(((X[:, None, :] - W[None, :, :]) ** 2).sum(-1))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(1, 20), metric=st.sampled_from(["cosine", "euclidean"]),
       batch=st.integers(1, 40))
def test_topk_sorted_and_equal_to_brute_force(seed, k, metric, batch):
    som = fitted(metric=metric, seed=seed)
    X = np.random.default_rng(seed).standard_normal((37, 6)).astype(np.float32)
    idx, dist = som.bmus(X, k=k, batch_size=batch)
    assert idx.shape == dist.shape == (37, k) and idx.dtype == np.int64 and dist.dtype == np.float32
    assert np.all(np.diff(dist, axis=1) >= -1e-6)
    B = brute_distances(X, som.weights.numpy(), metric)
    expect = np.sort(B, axis=1)[:, :k]
    np.testing.assert_allclose(dist, expect, atol=2e-5)
    # indices: each returned unit's true distance is its reported one (ties may swap order)
    np.testing.assert_allclose(np.take_along_axis(B, idx, axis=1), dist, atol=2e-5)
    assert all(len(set(r)) == k for r in idx)


def test_quantization_error_is_mean_bmu_distance():
    som = fitted(metric="euclidean")
    X = np.random.default_rng(1).standard_normal((50, 6))
    B = brute_distances(X, som.weights.numpy(), "euclidean")
    assert som.quantization_error(X) == pytest.approx(B.min(1).mean(), rel=1e-5)


def onehot_som(m, n):
    som = SOM(m, n, m * n, device="cpu")
    som.weights = torch.eye(m * n)
    return som


def test_topographic_error_hand_worked_on_torus():
    som = onehot_som(4, 4)
    g = som.grid
    u = lambda r, c: int(g.rc_to_index(np.array([r, c])))  # noqa: E731
    pairs = [
        (u(0, 0), u(0, 1)),  # side neighbours
        (u(0, 0), u(0, 3)),  # side neighbours across the wrap
        (u(0, 0), u(3, 3)),  # diagonal across both wraps: adjacent only with 8-connectivity
        (u(1, 1), u(2, 2)),  # diagonal
        (u(0, 0), u(2, 2)),  # far apart
    ]
    X = np.zeros((len(pairs), 16), np.float32)
    for i, (a, b) in enumerate(pairs):
        X[i, a], X[i, b] = 1.0, 0.5  # BMU a, second b
    idx, _ = som.bmus(X, k=2)
    np.testing.assert_array_equal(idx, np.array(pairs))
    assert som.topographic_error(X) == pytest.approx(1 / 5)
    assert som.topographic_error(X, connectivity=4) == pytest.approx(3 / 5)


def test_umatrix_hand_worked():
    # 3×4 torus, 1-D weights equal to the column index, euclidean, 4-neighbourhood:
    # up/down neighbours differ by 0, left/right by 1 except across the wrap (3).
    som = SOM(3, 4, 1, metric="euclidean", device="cpu")
    som.weights = torch.tensor(np.tile(np.arange(4.0), 3)[:, None], dtype=torch.float32)
    U = som.umatrix(connectivity=4)
    np.testing.assert_allclose(U, np.tile([1.0, 0.5, 0.5, 1.0], (3, 1)))
    # planar: border units average only the neighbours they have
    som = SOM(3, 4, 1, metric="euclidean", topology="planar", device="cpu")
    som.weights = torch.tensor(np.tile(np.arange(4.0), 3)[:, None], dtype=torch.float32)
    U = som.umatrix(connectivity=4)
    assert U[0, 0] == pytest.approx(1 / 2)      # right (1) and down (0)
    assert U[1, 1] == pytest.approx(2 / 4)      # left 1, right 1, up 0, down 0


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.random((120, 8)).astype(np.float32)
    som = SOM(5, 6, 8, epochs=2, seed=3, device="cpu").fit(X)
    path = tmp_path / "CL1-5x6.pt"
    side = som.save(path, meta={"layer": "CL1"})
    raw = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert raw["weights"].device.type == "cpu" and raw["m"] == 5 and raw["n"] == 6
    info = json.loads(side.read_text())
    assert info["topology"] == "torus" and info["metric"] == "cosine" and info["complete"]
    assert info["hparams"]["sigma"] == 10.0 and info["meta"]["layer"] == "CL1"
    back = SOM.load(path)
    assert back.get_params() | {"device": "cpu"} == som.get_params() | {"device": "cpu"}
    assert torch.equal(back.weights, som.weights)
    i1, d1 = som.bmus(X)
    i2, d2 = back.bmus(X)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    assert back.curve_.equals(som.curve_)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left nothing behind


def test_load_rejects_foreign_file(tmp_path):
    torch.save({"hello": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(SOMError, match="not a somprobe SOM"):
        SOM.load(tmp_path / "x.pt")
    with pytest.raises(SOMError, match="somprobe fit"):
        SOM.load(tmp_path / "missing.pt")


def test_real_digits_map_beats_random_map():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    som = SOM(10, 10, 64, epochs=3, batch_size=10, sigma=5.0, seed=0, device="cpu").fit(X)
    # random map: the same SOM's initial weights (quicksom's standard normal init), untrained
    rnd = SOM(10, 10, 64, device="cpu")
    rnd.weights = torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    assert som.quantization_error(X) < 0.25 * rnd.quantization_error(X)
    # random data rows as weights quantize well but have no topology
    rows = SOM(10, 10, 64, device="cpu")
    rows.weights = torch.from_numpy(X[np.random.default_rng(0).choice(len(X), 100, replace=False)])
    assert som.topographic_error(X) < 0.1 < 0.5 < rows.topographic_error(X)

    # same-class samples land closer on the torus than random pairs
    idx, _ = som.bmus(X, k=1)
    g = som.grid
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, len(X), (2, 20000))
    d = g.unit_distance(idx[a, 0], idx[b, 0])
    same = y[a] == y[b]
    assert d[same].mean() < 0.6 * d[~same].mean()
    # the curve falls
    loss = som.epoch_loss_["loss"].to_numpy()
    assert loss[-1] < loss[0]


# bad input ----------------------------------------------------------------------------------

def test_dimension_mismatch_names_both_dims():
    som = SOM(3, 3, 5, device="cpu")
    with pytest.raises(SOMError, match=r"dim=5.*7 features"):
        som.fit(np.ones((10, 7), np.float32))
    som = fitted(3, 3, 5)
    with pytest.raises(SOMError, match=r"dim=5.*4 features"):
        som.bmus(np.ones((10, 4), np.float32), k=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_rows_counted_with_first_row(bad):
    X = np.random.default_rng(0).random((30, 4)).astype(np.float32)
    X[7, 2] = bad
    X[20, 0] = bad
    with pytest.raises(SOMError, match=r"2 row\(s\) with NaN or Inf \(first at row 7\)"):
        SOM(3, 3, 4, device="cpu").fit(X)
    with pytest.raises(SOMError, match="first at row 7"):
        fitted(3, 3, 4).bmus(X, k=2)


def test_zero_rows_under_cosine():
    X = np.random.default_rng(0).random((30, 4)).astype(np.float32)
    X[[3, 11, 12]] = 0
    with pytest.raises(SOMError, match=r"3 all-zero row\(s\) \(first at row 3\).*euclidean"):
        SOM(3, 3, 4, device="cpu").fit(X)
    # the euclidean metric has no problem with them
    SOM(3, 3, 4, metric="euclidean", epochs=1, device="cpu").fit(X)


def test_k_larger_than_units():
    som = fitted(3, 3, 4)
    X = np.ones((2, 4), np.float32)
    with pytest.raises(SOMError, match=r"between 1 and the number of units \(9"):
        som.bmus(X, k=10)
    with pytest.raises(SOMError):
        som.bmus(X, k=0)
    assert som.bmus(X, k=9)[0].shape == (2, 9)


@pytest.mark.parametrize("m,n", [(1, 5), (5, 1), (1, 1)])
def test_grid_smaller_than_two_by_two(m, n):
    with pytest.raises(SOMError, match="at least 2"):
        SOM(m, n, 4)


def test_empty_data():
    with pytest.raises(SOMError, match="empty"):
        SOM(3, 3, 4, device="cpu").fit(np.zeros((0, 4), np.float32))
    with pytest.raises(SOMError, match="empty"):
        fitted(3, 3, 4).bmus(torch.zeros(0, 4), k=2)


def test_bad_hyperparameters_and_unfitted_map():
    for kw in ({"metric": "manhattan"}, {"decay": "cosine"}, {"mode": "mixed"}, {"init": "zeros"},
               {"sigma": 0}, {"alpha": -1}, {"epochs": 0}, {"batch_size": 0}, {"topology": "sphere"}):
        with pytest.raises(SOMError):
            SOM(3, 3, 4, **kw)
    with pytest.raises(SOMError, match="fit"):
        SOM(3, 3, 4).bmus(np.ones((2, 4)), k=2)
    with pytest.raises(SOMError, match=r"shape \(9, 4\)"):
        SOM(3, 3, 4, device="cpu").fit(np.ones((5, 4)), init_weights=np.ones((8, 4)))


def test_hyperparameters_stored_unchanged():
    som = SOM(20, 20, 2048, sigma=10, alpha=0.1, epochs=5, batch_size=10)
    p = som.get_params()
    assert p["sigma"] == 10 and isinstance(p["sigma"], int) and p["device"] == "auto"
    assert som.grid == Grid(20, 20, "torus")

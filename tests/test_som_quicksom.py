"""somprobe's online rule against quicksom 1.0.0, the implementation study 003 used.

Only square grids are compared. quicksom builds its torus distance table for an m×n grid by
rotating the first m rows (``SOM.compute_all``), which is only right when m divides n in the
right way — for a 7×12 torus its table differs from the true shortest distance over the 9 tiles
(shown in ``test_quicksom_torus_table_is_wrong_on_non_square_grids``). There quicksom is the
one that is wrong, so somprobe is checked against brute force instead (test_som_grid.py).
"""
import numpy as np
import pytest
import torch

qs = pytest.importorskip("quicksom.som")

from somprobe.som import SOM, Grid  # noqa: E402


def cosine_metric(a, b):
    """quicksom's ``metric`` argument: (…, D) × (G, D) → (…, G) cosine distances."""
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    return 1.0 - a @ b.T


def run_quicksom(X, W0, order, *, m, epochs, metric, batch_size=10, sched="exp"):
    q = qs.SOM(m, m, X.shape[1], alpha=0.1, sigma=10.0, n_epoch=epochs, sched=sched, periodic=True,
               metric=metric, centroids=torch.from_numpy(W0.copy()))
    # A DataLoader over the pre-ordered rows fixes quicksom's batch order (no shuffling).
    loader = torch.utils.data.DataLoader(qs.ArrayDataset(X[order]), batch_size=batch_size,
                                         shuffle=False, num_workers=0)
    errors = q.fit(loader, batch_size=batch_size, n_epoch=epochs, do_compute_all_dists=False,
                   logfile=None, print_each=10**9)
    return q, np.array([float(e) for e in errors])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_same_weights_and_bmus_as_quicksom_on_square_torus(metric, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # quicksom may write som.log to the working directory
    rng = np.random.default_rng(0)
    N, D, m, E = 200, 64, 20, 2
    X = rng.random((N, D)).astype(np.float32)
    W0 = rng.standard_normal((m * m, D)).astype(np.float32)
    order = rng.permutation(N)
    q, q_err = run_quicksom(X, W0, order, m=m, epochs=E,
                            metric=cosine_metric if metric == "cosine" else None)

    som = SOM(m, m, D, metric=metric, epochs=E, batch_size=10, sigma=10.0, alpha=0.1,
              decay="exp", device="cpu")
    som.fit(X, init_weights=W0, order=order, log_every=1)
    Wq, Ws = q.centroids.numpy(), som.weights.numpy()
    assert np.abs(Wq - Ws).max() <= 1e-4 * np.abs(Wq).max()
    assert not np.allclose(Ws, W0, atol=1e-2)  # training did move the weights

    q_bmu, _ = q.inference_call(torch.from_numpy(X), n_bmu=1)
    idx, _ = som.bmus(X, k=1)
    np.testing.assert_array_equal(idx[:, 0], q_bmu.numpy().ravel())

    # The training curve is quicksom's per-batch mean BMU distance.
    np.testing.assert_allclose(som.curve_["loss"].to_numpy(), q_err, rtol=1e-4, atol=1e-5)
    assert list(som.curve_["samples"]) == list(range(10, N * E + 1, 10))
    assert not (tmp_path / "som.log").exists()


@pytest.mark.parametrize("decay", ["exp", "linear", "half"])
def test_decay_schedules_are_quicksoms(decay):
    from somprobe.som.train import decay_factor

    q = qs.SOM(2, 2, 3, sched=decay, periodic=True)
    for t in [0, 1, 7, 49, 50, 99]:
        assert decay_factor(decay, t, 100) == pytest.approx(q.scheduler(t, 100), rel=1e-12)


def test_quicksom_torus_table_is_wrong_on_non_square_grids():
    m, n = 7, 12
    q = qs.SOM(m, n, 3, periodic=True, precompute=True)
    truth = Grid(m, n).unit_sq_distances(dtype=torch.float64).numpy()
    assert not np.allclose(q.distance_mat.numpy(), truth)
    # …while on a square grid quicksom's table is right, which is why we compare there.
    q = qs.SOM(6, 6, 3, periodic=True, precompute=True)
    np.testing.assert_allclose(q.distance_mat.numpy(), Grid(6, 6).unit_sq_distances(dtype=torch.float64).numpy())

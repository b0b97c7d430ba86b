"""Training: the online step against a literal per-sample reference, schedules, determinism,
streaming from memmaps, the batch map, checkpoint/resume, and the run-level fit job."""
import numpy as np
import pandas as pd
import pytest
import torch

from somprobe.errors import SOMError
from somprobe.som import SOM, Grid
from somprobe.som import map as som_map
from somprobe.som import train as T


def reference_step(W, X, sqd, alpha, sigma, metric):
    """quicksom's rule written out literally (B×G×D), float64."""
    W, X = W.astype(np.float64), X.astype(np.float64)
    if metric == "cosine":
        Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        D = 1 - Xn @ Wn.T
    else:
        D = np.sqrt(((X[:, None] - W[None]) ** 2).sum(-1))
    bmu = D.argmin(1)
    H = np.exp(-sqd[bmu] / (2 * sigma ** 2 + 1e-5))
    delta = alpha * H[:, :, None] * (X[:, None, :] - W[None, :, :])
    return W + delta.mean(0), D.min(1)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("B", [1, 7, 40])  # 40 > INCREMENTAL_NORMS_MAX_BATCH: the other norm path
def test_online_step_equals_literal_rule(metric, B):
    rng = np.random.default_rng(B)
    g = Grid(5, 6)
    sqd = g.unit_sq_distances(dtype=torch.float64).numpy()
    W = rng.standard_normal((30, 12)).astype(np.float32)
    Wt = torch.from_numpy(W.copy())
    wsq = (Wt * Wt).sum(1)
    for step in range(3):
        X = rng.random((B, 12)).astype(np.float32)
        W_ref, d_ref = reference_step(Wt.numpy(), X, sqd, 0.3, 2.0, metric)
        d = T.online_step(Wt, wsq, torch.from_numpy(X), g.unit_sq_distances(), 0.3, 2.0, metric)
        np.testing.assert_allclose(Wt.numpy(), W_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d.numpy(), d_ref, rtol=1e-4, atol=1e-5)
        # the incrementally updated squared norms are those of the new weights
        np.testing.assert_allclose(wsq.numpy(), (Wt.double() ** 2).sum(1).numpy(), rtol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("B,n", [(1, 37), (7, 100), (10, 45), (32, 70)])
def test_blocked_pass_equals_step_by_step_updates(metric, B, n):
    # online_block reads and writes W once per block and tracks the block's scores between
    # steps; it must give the weights, norms, losses and schedule of one online_step per batch.
    rng = np.random.default_rng(B + n)
    g = Grid(6, 7)
    sqd = g.unit_sq_distances()
    W0 = torch.from_numpy(rng.standard_normal((42, 9)).astype(np.float32))
    X = torch.from_numpy(rng.random((n, 9)).astype(np.float32))
    total = 3 * n
    kw = dict(total=total, alpha0=0.3, sigma0=3.0, decay="exp", metric=metric)
    steps = -(-n // B)
    Wb, wsq_b = W0.clone(), torch.empty(42)
    losses_b, lrs_b = torch.zeros(steps), np.zeros(steps)
    assert T.block_rows(B, 9) == B * max(1, 18 // B) and T.block_rows(B, 9) < n
    t = T.online_pass(Wb, wsq_b, X, sqd, batch_size=B, t0=n, step0=0, losses=losses_b, lrs=lrs_b, **kw)
    assert t == 2 * n
    Ws, wsq_s = W0.clone(), (W0.double() ** 2).sum(1).float()
    losses_s, lrs_s = torch.zeros(steps), np.zeros(steps)
    t = n
    for i, a in enumerate(range(0, n, B)):
        s = T.decay_factor("exp", t, total)
        lrs_s[i] = s
        wsq_s = (Ws.double() ** 2).sum(1).float()  # exact norms before every step
        losses_s[i] = T.online_step(Ws, wsq_s, X[a:a + B], sqd, 0.3 * s, 3.0 * s, metric).sum()
        t += X[a:a + B].shape[0]
    np.testing.assert_allclose(lrs_b, lrs_s)
    torch.testing.assert_close(Wb, Ws, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses_b, losses_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wsq_b, (Wb.double() ** 2).sum(1).float(), rtol=1e-5, atol=1e-6)


def test_blocks_do_not_apply_above_the_incremental_batch_limit():
    assert T.block_rows(T.INCREMENTAL_NORMS_MAX_BATCH + 1, 512) == T.INCREMENTAL_NORMS_MAX_BATCH + 1
    assert T.block_rows(10, 2048) == T.BLOCK_ROWS and T.block_rows(10, 4) == 10


@pytest.mark.parametrize("sigma", [0.05, 0.3, 2.0, 10.0])
def test_neighbourhood_is_quicksoms_gaussian_cut_below_float_resolution(sigma):
    g = Grid(30, 30)
    bmu = torch.tensor([0, 17, 450, 899])
    H = T.neighbourhood(g.unit_sq_distances(), bmu, sigma).double().numpy()
    ref = np.exp(-g.unit_sq_distances(dtype=torch.float64).numpy()[bmu.numpy()]
                 / (2 * sigma ** 2 + 1e-5))
    keep = ref > T.NEIGHBOURHOOD_CUTOFF * 1.001
    np.testing.assert_allclose(H[keep], ref[keep], rtol=1e-5)
    assert (H[ref < T.NEIGHBOURHOOD_CUTOFF * 0.999] == 0).all()
    tiny = np.finfo(np.float32).tiny
    assert not ((H > 0) & (H < tiny)).any()  # no subnormal weights


def test_time_advances_by_actual_batch_size_and_alpha_stays_positive():
    X = np.random.default_rng(0).random((25, 4)).astype(np.float32)
    som = SOM(3, 3, 4, epochs=2, batch_size=10, alpha=0.1, sigma=2.0, decay="linear", device="cpu")
    som.fit(X, log_every=1)
    c = som.curve_
    assert list(c["samples"]) == [10, 20, 25, 35, 45, 50]
    assert list(c["step"]) == [1, 2, 3, 4, 5, 6]
    t_before = np.array([0, 10, 20, 25, 35, 45])
    np.testing.assert_allclose(c["alpha"], 0.1 * (1 - t_before / 50))
    np.testing.assert_allclose(c["sigma"], 2.0 * (1 - t_before / 50))
    assert (c["alpha"] > 0).all()
    assert som.samples_ == 50 and som.step_ == 6 and som.epoch_ == 2


def test_fixed_seed_gives_bit_identical_weights_and_seed_matters():
    X = np.random.default_rng(0).random((300, 16)).astype(np.float32)
    a = SOM(6, 6, 16, epochs=2, seed=5, device="cpu").fit(X).weights
    b = SOM(6, 6, 16, epochs=2, seed=5, device="cpu").fit(X).weights
    c = SOM(6, 6, 16, epochs=2, seed=6, device="cpu").fit(X).weights
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_memmap_tensor_and_chunked_reads_give_the_same_map(tmp_path, monkeypatch):
    X = np.random.default_rng(0).random((230, 16)).astype(np.float32)
    np.save(tmp_path / "CL1.npy", X)
    mm = np.load(tmp_path / "CL1.npy", mmap_mode="r")
    ref = SOM(4, 5, 16, epochs=2, device="cpu").fit(X).weights
    assert torch.equal(SOM(4, 5, 16, epochs=2, device="cpu").fit(mm).weights, ref)
    assert torch.equal(SOM(4, 5, 16, epochs=2, device="cpu").fit(torch.from_numpy(X)).weights, ref)
    # many small chunks (a multiple of the batch size each) change nothing
    monkeypatch.setattr(som_map, "_CHUNK_BYTES", 16 * 4 * 3)
    assert SOM(4, 5, 16, device="cpu").fit(mm, shuffle=False).weights.shape == (20, 16)
    assert torch.equal(SOM(4, 5, 16, epochs=2, device="cpu").fit(mm).weights, ref)
    # batch map: chunks only change the order of float sums
    # (σ0 small: a wide neighbourhood collapses all units onto the mean, where BMUs become near-ties
    # that rounding may flip)
    monkeypatch.setattr(som_map, "_CHUNK_BYTES", 64 << 20)
    big = SOM(4, 5, 16, epochs=2, sigma=1.0, mode="batch", device="cpu").fit(mm)
    monkeypatch.setattr(som_map, "_CHUNK_BYTES", 16 * 4 * 7)
    small = SOM(4, 5, 16, epochs=2, sigma=1.0, mode="batch", device="cpu").fit(mm)
    torch.testing.assert_close(small.weights, big.weights, rtol=1e-5, atol=1e-6)


def test_explicit_order_and_no_shuffle():
    X = np.random.default_rng(0).random((50, 8)).astype(np.float32)
    a = SOM(3, 4, 8, epochs=2, device="cpu").fit(X, shuffle=False).weights
    b = SOM(3, 4, 8, epochs=2, device="cpu").fit(X, order=np.arange(50)).weights
    c = SOM(3, 4, 8, epochs=2, device="cpu").fit(X, order=np.stack([np.arange(50), np.arange(50)[::-1]])).weights
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(SOMError, match="order"):
        SOM(3, 4, 8, device="cpu").fit(X, order=np.arange(49))


def test_batch_map_epoch_equals_hand_computed_update():
    rng = np.random.default_rng(0)
    X = rng.random((40, 5)).astype(np.float32)
    W0 = rng.standard_normal((12, 5)).astype(np.float32)
    som = SOM(3, 4, 5, mode="batch", epochs=2, sigma=1.5, decay="exp", metric="euclidean", device="cpu")
    som.fit(X, init_weights=W0)
    sqd = Grid(3, 4).unit_sq_distances(dtype=torch.float64).numpy()
    W = W0.astype(np.float64)
    for e in range(2):
        sigma = 1.5 * np.exp(-5 * e / 2)
        bmu = np.sqrt(((X[:, None] - W[None]) ** 2).sum(-1)).argmin(1)
        H = np.exp(-sqd[bmu] / (2 * sigma ** 2 + 1e-5))
        W = (H.T @ X) / H.sum(0)[:, None]
    np.testing.assert_allclose(som.weights.numpy(), W, rtol=1e-4, atol=1e-5)
    assert list(som.curve_["epoch"]) == [1, 2]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("mode,init", [("online", "normal"), ("online", "sample"), ("batch", "pca")])
def test_resume_after_interruption_equals_uninterrupted_fit(tmp_path, monkeypatch, mode, init):
    X = np.random.default_rng(0).random((205, 12)).astype(np.float32)
    kw = dict(epochs=3, mode=mode, init=init, seed=11, device="cpu")
    full = SOM(5, 5, 12, **kw).fit(X)

    ckpt = tmp_path / "ckpt.pt"
    name = "_online_epoch" if mode == "online" else "_batch_epoch"
    original = getattr(SOM, name)
    calls = {"n": 0}

    def dies_in_second_epoch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt  # as if the process were killed during epoch 2
        return original(self, *a, **k)

    monkeypatch.setattr(SOM, name, dies_in_second_epoch)
    with pytest.raises(Interrupt):
        SOM(5, 5, 12, **kw).fit(X, checkpoint=ckpt)
    monkeypatch.setattr(SOM, name, original)
    assert SOM.load(ckpt).epoch_ == 1

    resumed = SOM(5, 5, 12, **kw).fit(X, checkpoint=ckpt, resume=True)
    assert resumed.resumed_
    assert torch.equal(resumed.weights, full.weights)
    pd.testing.assert_frame_equal(resumed.curve_, full.curve_)
    assert SOM.load(ckpt).epoch_ == 3

    with pytest.raises(SOMError, match="other hyperparameters"):
        SOM(5, 5, 12, **(kw | {"sigma": 3.0})).fit(X, checkpoint=ckpt, resume=True)


def test_checkpoint_every_writes_only_after_that_many_seconds(tmp_path, monkeypatch):
    X = np.random.default_rng(0).random((60, 5)).astype(np.float32)
    clock = {"t": 0.0}

    def epoch_takes_ten_seconds(self, *a, **k):
        clock["t"] += 10.0
        return original(self, *a, **k)

    original = SOM._online_epoch
    monkeypatch.setattr(som_map.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(SOM, "_online_epoch", epoch_takes_ten_seconds)
    saves = []
    monkeypatch.setattr(SOM, "save", lambda self, path, **k: saves.append(self.epoch_))
    SOM(3, 3, 5, epochs=5, device="cpu").fit(X, checkpoint=tmp_path / "c.pt", checkpoint_every=25)
    assert saves == [3]  # 30 s after the start; 20 s later at the end is under 25 s
    saves.clear()
    SOM(3, 3, 5, epochs=3, device="cpu").fit(X, checkpoint=tmp_path / "c.pt")
    assert saves == [1, 2, 3]  # default: every epoch
    with pytest.raises(SOMError, match="checkpoint_every"):
        SOM(3, 3, 5, device="cpu").fit(X, checkpoint_every=-1)


def test_init_pca_and_sample_lie_on_the_data():
    X = np.random.default_rng(0).random((100, 6)).astype(np.float32) + 5
    s = SOM(4, 4, 6, epochs=1, init="sample", device="cpu")
    s._generator.manual_seed(0)
    W = s._initial_weights(som_map._Rows(X, 6, torch.device("cpu"))).numpy()
    assert all((np.abs(X - w).max(1) == 0).any() for w in W)
    p = SOM(4, 4, 6, init="pca", device="cpu")
    W = p._initial_weights(som_map._Rows(X, 6, torch.device("cpu"))).numpy()
    np.testing.assert_allclose(W.mean(0), X.mean(0), atol=1e-5)  # symmetric around the mean


# the run-level job -------------------------------------------------------------------------

def make_run(tmp_path, n_tr=120, n_val=60, dims={"CL1": 8, "CL2": 12}):
    from somprobe.run import Run
    from somprobe.store import StoreWriter

    run = Run(tmp_path / "run")
    rng = np.random.default_rng(0)
    for split, n in (("som-tr", n_tr), ("som-val", n_val)):
        w = StoreWriter(run.codes_dir(split), layers_dims=dims, n_rows=n, manifest={"split": split},
                        ids=[f"{split}-{i}" for i in range(n)])
        w.write(0, {k: rng.random((n, d)).astype(np.float32) for k, d in dims.items()},
                labels=np.arange(n) % 3, preds=np.arange(n) % 3)
        w.close()
    return run


def test_fit_run_writes_maps_curves_and_bmus(tmp_path):
    from somprobe.som.job import bmus_dist_path, fit_run, CURVES_COLUMNS

    run = make_run(tmp_path)
    paths = fit_run(run, sizes="4,3x5", epochs=2, batch_size=10, device="cpu")
    assert paths == [run.som_path(l, m, n) for l in ("CL1", "CL2") for m, n in ((4, 4), (3, 5))]
    curves = pd.read_csv(run.curves_csv)
    assert list(curves.columns) == CURVES_COLUMNS
    assert set(zip(curves["layer"], curves["size"])) == {(l, s) for l in ("CL1", "CL2") for s in ("4x4", "3x5")}
    from somprobe.store import open_store

    for split in ("som-tr", "som-val"):
        X = open_store(run.codes_dir(split)).codes("CL2")
        som = SOM.load(run.som_path("CL2", 3, 5))
        idx = np.load(run.bmus_path(split, "CL2", 3, 5))
        dist = np.load(bmus_dist_path(run, split, "CL2", 3, 5))
        assert idx.dtype == np.int64 and idx.shape == (len(X), 10) and dist.shape == idx.shape
        np.testing.assert_array_equal(idx, som.bmus(X, k=10)[0])
    assert not list(run.soms_dir.glob("*.ckpt.pt"))

    # refitting one layer keeps the other layer's curves; resume keeps finished maps untouched
    before = run.som_path("CL1", 4, 4).stat().st_mtime_ns
    fit_run(run, layers=["CL1"], sizes=4, epochs=2, batch_size=10, device="cpu", resume=True)
    assert run.som_path("CL1", 4, 4).stat().st_mtime_ns == before
    curves2 = pd.read_csv(run.curves_csv)
    assert len(curves2) == len(curves)


def test_fit_run_bad_input(tmp_path):
    from somprobe.errors import StoreError
    from somprobe.som.job import fit_run, parse_sizes

    run = make_run(tmp_path)
    with pytest.raises(StoreError):
        fit_run(run, layers=["CL9"], sizes=4, device="cpu")
    with pytest.raises(SOMError, match="7x12"):
        parse_sizes("seven")
    with pytest.raises(SOMError, match="at least 2x2"):
        parse_sizes("1x4")
    from somprobe.run import Run

    with pytest.raises(StoreError, match="somprobe extract"):
        fit_run(Run(tmp_path / "nothing"), sizes=4)

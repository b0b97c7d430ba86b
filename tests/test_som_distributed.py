"""SOMs over 2 gloo ranks on the CPU (issue 12), against one process.

* maps spread over ranks: every map file, BMU file and curves.csv byte-for-byte (bit-identical
  weights) the same as ``fit_run`` in one process;
* data-parallel online and batch modes: ranks hold disjoint parts of each global mini-batch (of
  the data, in batch mode) and all-reduce Hᵀ X and Hᵀ 1: the map equals the one-process map at
  the same global batch size to float rounding (1e-5), with the same BMUs;
* a rank whose map fails: it raises its own error, the other rank names it; finished maps stay;
* more ranks than maps; the CLI under ``python -m torch.distributed.run``.

Ranks are spawned processes that set torchrun's environment; tiny stores (N = 45, D ≤ 9).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import traceback

import numpy as np
import pandas as pd
import pytest
import torch

from somprobe.som import SOM
from somprobe.som.job import bmus_dist_path, fit_run

KW = dict(epochs=2, batch_size=7, device="cpu", seed=2, sigma=2.0, workers=1, threads=1,
          checkpoint_every=0)  # a checkpoint after each epoch: the kill test needs one
SIZES = "4x5,6"  # a 3x3 torus under sigma=2 has near-identical units: BMUs flip on rounding


def make_run(root, n=45, dims={"CL1": 6, "CL2": 9}, zero_layer=None):
    from somprobe.run import Run
    from somprobe.store import StoreWriter

    run = Run(root)
    rng = np.random.default_rng(0)
    for split in ("som-tr", "som-val"):
        codes = {k: rng.random((n, d)).astype(np.float32) for k, d in dims.items()}
        if zero_layer and split == "som-tr":
            codes[zero_layer][5] = 0.0
        w = StoreWriter(run.codes_dir(split), layers_dims=dims, n_rows=n, manifest={"split": split},
                        ids=[f"{split}-{i}" for i in range(n)])
        w.write(0, codes, labels=np.arange(n) % 3, preds=np.arange(n) % 3)
        w.close()
    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tmp):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="localhost",
                      MASTER_PORT=str(port), TQDM_DISABLE="1")
    torch.set_num_threads(1)
    from somprobe import distributed as dist
    from somprobe.run import Run

    out = {}

    def attempt(key, fn):
        try:
            fn()
            out[key] = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the parent
            out[key] = f"{type(e).__name__}: {e}"
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)  # after every scenario: the last one kills rank 1

    try:
        dist.init("cpu", timeout_s=60)
        attempt("spread", lambda: fit_run(Run(os.path.join(tmp, "spread")), sizes=SIZES, **KW))
        attempt("online", lambda: fit_run(Run(os.path.join(tmp, "online")), sizes=SIZES,
                                          data_parallel=True, **KW))
        attempt("batch", lambda: fit_run(Run(os.path.join(tmp, "batch")), sizes=SIZES,
                                         data_parallel=True, mode="batch", **KW))
        attempt("one-map", lambda: fit_run(Run(os.path.join(tmp, "one-map")), sizes="6",
                                           layers=["CL2"], **KW))
        # CL2 (the larger) goes to rank 0, CL1 (a zero row: cosine refuses it) to rank 1
        attempt("failing", lambda: fit_run(Run(os.path.join(tmp, "failing")), sizes="3", **KW))
        if rank == 1:  # rank 1 dies right after the first checkpoint of its first map
            saves = []
            real_save = SOM.save

            def save(self, path, **kw):
                saves.append(path)
                if len(saves) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_save(self, path, **kw)

            SOM.save = save
        attempt("kill", lambda: fit_run(Run(os.path.join(tmp, "kill")), sizes=SIZES, **KW))
    except Exception:  # noqa: BLE001
        out["crash"] = traceback.format_exc()
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    dist.finalize()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    for name in ("spread", "online", "batch", "one-map", "kill"):
        make_run(tmp / name)
    make_run(tmp / "failing", zero_layer="CL1")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    res = {r: json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)}
    assert not any("crash" in v for v in res.values()), res
    return tmp, res


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    run = make_run(tmp / "one")
    fit_run(run, sizes=SIZES, **KW)
    batch = make_run(tmp / "batch")
    fit_run(batch, sizes=SIZES, mode="batch", **KW)
    return run, batch


def _maps(run):
    return {p.name: SOM.load(p) for p in sorted(run.soms_dir.glob("*.pt"))}


def test_maps_spread_over_ranks_equal_one_process_bit_for_bit(two_ranks, reference):
    from somprobe.run import Run

    tmp, res = two_ranks
    assert res[0]["spread"] == res[1]["spread"] == "ok"
    one, spread = reference[0], Run(tmp / "spread")
    a, b = _maps(one), _maps(spread)
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:
        assert torch.equal(a[name].weights, b[name].weights), name
    for p in sorted(one.soms_dir.rglob("*.npy")):
        assert p.read_bytes() == (spread.soms_dir / p.relative_to(one.soms_dir)).read_bytes()
    assert one.curves_csv.read_bytes() == spread.curves_csv.read_bytes()
    assert not list(spread.soms_dir.glob("*.ckpt*"))


@pytest.mark.parametrize("name", ["online", "batch"])
def test_data_parallel_equals_one_process_at_the_same_global_batch(two_ranks, reference, name):
    from somprobe.run import Run
    from somprobe.store import open_store

    tmp, res = two_ranks
    assert res[0][name] == res[1][name] == "ok"
    one = reference[0] if name == "online" else reference[1]
    dp = Run(tmp / name)
    a, b = _maps(one), _maps(dp)
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        torch.testing.assert_close(b[key].weights, a[key].weights, atol=1e-5, rtol=1e-5)
        assert b[key].step_ == a[key].step_ and b[key].samples_ == a[key].samples_
    for layer in ("CL1", "CL2"):
        for split in ("som-tr", "som-val"):
            X = open_store(one.codes_dir(split)).codes(layer)
            i_dp = np.load(dp.bmus_path(split, layer, 4, 5))[:, 0]
            i_one = np.load(one.bmus_path(split, layer, 4, 5))[:, 0]
            np.testing.assert_allclose(np.load(bmus_dist_path(dp, split, layer, 4, 5)),
                                       np.load(bmus_dist_path(one, split, layer, 4, 5)), atol=1e-5)
            # the same BMUs, except between two units tied to rounding (a unit no sample reaches
            # takes its neighbour's weights in the batch map's last epoch)
            diff = np.flatnonzero(i_dp != i_one)
            assert len(diff) <= len(X) // 10
            if len(diff):
                idx, d = b[f"{layer}-4x5.pt"].bmus(X[diff], k=2)
                assert (idx == i_one[diff, None]).any(1).all() and np.allclose(d[:, 0], d[:, 1], atol=1e-5)
    ca, cb = pd.read_csv(one.curves_csv), pd.read_csv(dp.curves_csv)
    assert ca[["layer", "size", "epoch", "step", "samples"]].equals(cb[["layer", "size", "epoch", "step", "samples"]])
    np.testing.assert_allclose(cb["loss"], ca["loss"], rtol=1e-5)


def test_more_ranks_than_maps_leaves_a_rank_idle(two_ranks, reference):
    from somprobe.run import Run

    tmp, res = two_ranks
    assert res[0]["one-map"] == res[1]["one-map"] == "ok"
    run = Run(tmp / "one-map")
    assert [p.name for p in run.soms_dir.glob("*.pt")] == ["CL2-6x6.pt"]
    assert torch.equal(SOM.load(run.som_path("CL2", 6, 6)).weights,
                       SOM.load(reference[0].som_path("CL2", 6, 6)).weights)
    assert set(pd.read_csv(run.curves_csv)["layer"]) == {"CL2"}


def test_failing_rank_is_named_and_finished_maps_are_kept(two_ranks):
    from somprobe.run import Run

    tmp, res = two_ranks
    assert res[1]["failing"].startswith("SOMError") and "all-zero" in res[1]["failing"]
    assert res[0]["failing"].startswith("DistributedError")
    assert "rank 1" in res[0]["failing"] and "all-zero" in res[0]["failing"]
    run = Run(tmp / "failing")
    assert run.som_path("CL2", 3, 3).is_file() and not run.som_path("CL1", 3, 3).is_file()
    assert set(pd.read_csv(run.curves_csv)["layer"]) == {"CL2"}


def test_killed_rank_is_reported_and_resume_in_one_process_completes(two_ranks, reference):
    from somprobe.run import Run

    tmp, res = two_ranks
    assert "kill" not in res[1]  # it died
    assert res[0]["kill"].startswith("DistributedError") and "another rank stopped" in res[0]["kill"]
    run = Run(tmp / "kill")
    # rank 1's first map (CL1 6x6 by the longest-first assignment) left a checkpoint, no map
    assert not run.som_path("CL1", 6, 6).is_file()
    assert (run.soms_dir / "CL1-6x6.ckpt.pt").is_file()
    fit_run(run, sizes=SIZES, resume=True, **KW)
    a, b = _maps(reference[0]), _maps(run)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].weights, b[name].weights), name
    assert reference[0].curves_csv.read_bytes() == run.curves_csv.read_bytes()
    assert not list(run.soms_dir.glob("*.ckpt*"))


def test_cli_under_torchrun_spreads_maps(tmp_path, reference):
    run = make_run(tmp_path / "cli")
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "somprobe", "fit", "--out", str(run.root), "--size", SIZES, "--epochs", "2",
           "--batch-size", "7", "--seed", "2", "--sigma", "2", "--device", "cpu", "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "4 maps in" in p.stdout and p.stdout.count("maps in") == 1  # rank 0 speaks alone
    a, b = _maps(reference[0]), _maps(run)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].weights, b[name].weights), name
    assert reference[0].curves_csv.read_bytes() == run.curves_csv.read_bytes()

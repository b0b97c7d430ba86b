"""Maps fitted side by side (issue 8): the thread policy, the rank assignment, and fit_run with
worker threads or processes giving the same bytes as fitting the maps one by one."""
from __future__ import annotations

import itertools
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch

from somprobe.errors import SOMError
from somprobe.som import SOM, parallel
from somprobe.som.job import fit_run

BIG = parallel.THREADED_STEP_FLOPS


def _wt(p):
    return p.workers, p.threads


def make_run(root, n=80, dims={"CL1": 6, "CL2": 9}, zero_layer=None):
    from somprobe.run import Run
    from somprobe.store import StoreWriter

    run = Run(root)
    rng = np.random.default_rng(0)
    for split in ("som-tr", "som-val"):
        codes = {k: rng.random((n, d)).astype(np.float32) for k, d in dims.items()}
        if zero_layer and split == "som-tr":
            codes[zero_layer][7] = 0.0  # undefined under the cosine metric: the fit refuses it
        w = StoreWriter(run.codes_dir(split), layers_dims=dims, n_rows=n, manifest={"split": split},
                        ids=[f"{split}-{i}" for i in range(n)])
        w.write(0, codes, labels=np.arange(n) % 3, preds=np.arange(n) % 3)
        w.close()
    return run


# policy ---------------------------------------------------------------------------------------
def test_plan_one_thread_per_map_as_many_maps_as_cores():
    # the paper's sixteen small maps on 2 cores: 2 at once, 1 thread each; a job of a few
    # seconds in threads of this process, a long one in worker processes
    assert parallel.plan([0.2] * 16, [1e6] * 16, cores=2) == parallel.Plan(2, 1, "threads")
    assert parallel.plan([10.0] * 16, [1e6] * 16, cores=2) == parallel.Plan(2, 1, "processes")
    lim = parallel.PROCESS_MIN_SECONDS
    assert parallel.plan([lim / 2] * 2, [1e6] * 2, cores=2).backend == "processes"
    assert parallel.plan([lim / 2 - 0.01] * 2, [1e6] * 2, cores=2).backend == "threads"
    assert parallel.plan([10.0] * 3, [1e6] * 3, cores=8) == parallel.Plan(3, 1, "processes")
    # fewer maps than cores: only large steps get the spare cores as threads
    assert _wt(parallel.plan([10.0], [BIG], cores=8)) == (1, 8)
    assert _wt(parallel.plan([10.0] * 3, [BIG, 1, 1], cores=8)) == (3, 2)
    assert _wt(parallel.plan([10.0], [BIG - 1], cores=8)) == (1, 1)
    # a tiny job stays in this process
    assert parallel.plan([0.05] * 16, [1e6] * 16, cores=4).workers == 1
    # the user's choice wins; the other number follows from it
    assert _wt(parallel.plan([0.05] * 16, [1e6] * 16, cores=4, workers=3)) == (3, 1)
    assert _wt(parallel.plan([10.0] * 16, [BIG] * 16, cores=8, threads=4)) == (2, 4)
    assert parallel.plan([10.0] * 2, [1e6] * 2, cores=8, workers=5).workers == 2
    with pytest.raises(SOMError, match="workers"):
        parallel.plan([1.0], [1.0], workers=0)


def test_cost_model_counts_flops_and_steps():
    c = parallel.map_cost(20, 20, 2048, n_samples=500, epochs=5, batch_size=10, mode="online")
    expected = 5 * (50 * parallel._STEP_OVERHEAD_S + 4 * 500 * 400 * 2048 / parallel._FLOPS_PER_S)
    assert c == pytest.approx(expected)
    assert parallel.step_flops(20, 20, 2048, batch_size=10, mode="online", n_samples=500) == 2 * 10 * 400 * 2048
    assert parallel.step_flops(20, 20, 2048, batch_size=10, mode="batch", n_samples=500) >= BIG


def test_assign_is_longest_first_to_least_loaded_and_near_optimal():
    assert parallel.assign([5, 4, 3, 3, 1], 2) == [0, 1, 1, 0, 1]  # loads 8 and 8
    assert parallel.assign([1, 1, 1], 5) == [0, 1, 2]
    rng = np.random.default_rng(1)
    for _ in range(30):
        costs = list(rng.integers(1, 20, size=7).astype(float))
        owner = parallel.assign(costs, 3)
        span = max(sum(c for c, o in zip(costs, owner) if o == r) for r in range(3))
        best = min(max(sum(c for c, o in zip(costs, ow) if o == r) for r in range(3))
                   for ow in itertools.product(range(3), repeat=7))
        assert span <= 4 / 3 * best + 1e-9  # Graham's bound for longest-processing-time first


# scheduler ------------------------------------------------------------------------------------
def _whoami(task, progress):
    time.sleep(0.3)
    progress(1)
    return os.getpid()


def _dies(task, progress):
    if os.getpid() != int(os.environ["SOMPROBE_TEST_PARENT"]):
        os._exit(3)  # a worker process vanishes without a word (killed, out of memory)
    time.sleep(1.0)
    return task


def test_run_tasks_uses_the_caller_and_workers():
    threads = torch.get_num_threads()
    res = parallel.run_tasks(_whoami, list(range(6)), workers=2, threads=1, total=6)
    pids = {pid for _, pid in res}
    assert sorted(t for t, _ in res) == list(range(6))
    assert os.getpid() in pids and len(pids) == 2  # this process and one spawned worker
    assert torch.get_num_threads() == threads  # the caller's threads are restored


def _thread_of(task, progress):
    import threading

    progress(1)
    time.sleep(0.2)  # long enough for the second thread to take a task
    if task == "boom":
        raise SOMError("boom failed")
    return threading.get_ident(), os.getpid()


def test_thread_backend_runs_tasks_on_threads_of_this_process():
    import threading

    res = parallel.run_tasks(_thread_of, list(range(6)), workers=2, threads=1, total=6,
                             backend="threads")
    assert sorted(t for t, _ in res) == list(range(6))
    assert {pid for _, (_, pid) in res} == {os.getpid()}
    idents = {ident for _, (ident, _) in res}
    assert threading.get_ident() in idents and len(idents) == 2
    # an error in one thread surfaces as it is; the other stops at its next progress call
    with pytest.raises(SOMError, match="boom failed"):
        parallel.run_tasks(_thread_of, ["boom", 1, 2, 3, 4, 5], workers=2, threads=1,
                           backend="threads")
    with pytest.raises(SOMError, match="backend"):
        parallel.run_tasks(_thread_of, [1], backend="fork")


def test_dead_worker_is_a_clean_error(monkeypatch):
    monkeypatch.setenv("SOMPROBE_TEST_PARENT", str(os.getpid()))
    with pytest.raises(SOMError, match=r"worker process fitting (a|b|c) died.*--resume"):
        parallel.run_tasks(_dies, ["a", "b", "c"], workers=2, threads=1)


# fit_run ------------------------------------------------------------------------------------
def _files(run):
    out = {}
    for p in sorted(run.soms_dir.rglob("*")):
        if p.suffix == ".npy":
            out[str(p.relative_to(run.soms_dir))] = p.read_bytes()
        elif p.name.endswith(".pt") and not p.name.endswith(".ckpt.pt"):
            out[p.name] = SOM.load(p).weights
    return out


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_workers_give_the_same_bytes_as_one_by_one(tmp_path, monkeypatch, backend):
    chosen = []
    original = parallel.run_tasks

    def spy(*a, **k):
        chosen.append(k["backend"])
        return original(*a, **k)

    monkeypatch.setattr(parallel, "run_tasks", spy)
    # this job is tiny: threads by the cost rule; a zero threshold forces processes
    monkeypatch.setattr(parallel, "PROCESS_MIN_SECONDS", 0.0 if backend == "processes" else 1e9)
    kw = dict(sizes="3,4x5", epochs=2, batch_size=7, device="cpu", seed=4, threads=1)
    serial = make_run(tmp_path / "serial")
    fit_run(serial, workers=1, **kw)
    par = make_run(tmp_path / "par")
    paths = fit_run(par, workers=2, **kw)
    assert chosen[-1] == backend
    assert paths == [par.som_path(layer, m, n) for layer in ("CL1", "CL2") for m, n in ((3, 3), (4, 5))]
    a, b = _files(serial), _files(par)
    assert a.keys() == b.keys() and len(a) == 4 + 4 * 2 * 2
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
        else:
            assert a[name] == b[name], name
    assert serial.curves_csv.read_bytes() == par.curves_csv.read_bytes()
    # one map by hand, one thread: the same weights again
    from somprobe.store import open_store

    X = open_store(serial.codes_dir("som-tr")).codes("CL2")
    with parallel.torch_threads(1):
        alone = SOM(4, 5, 9, epochs=2, batch_size=7, device="cpu", seed=4).fit(X)
    assert torch.equal(alone.weights, b["CL2-4x5.pt"])

    # resume with workers keeps every finished map untouched and the curves the same
    before = {p: p.stat().st_mtime_ns for p in par.soms_dir.glob("*.pt")}
    fit_run(par, workers=2, resume=True, **kw)
    assert {p: p.stat().st_mtime_ns for p in par.soms_dir.glob("*.pt")} == before
    assert serial.curves_csv.read_bytes() == par.curves_csv.read_bytes()


def test_error_in_a_worker_surfaces_and_finished_maps_are_kept(tmp_path):
    run = make_run(tmp_path / "run", zero_layer="CL1")
    with pytest.raises(SOMError, match="all-zero row"):
        fit_run(run, sizes="3,4", epochs=1, batch_size=7, device="cpu", workers=2, threads=1)
    assert not list(run.soms_dir.glob("CL1-*.pt"))
    if run.curves_csv.is_file():  # whatever finished before the error was recorded
        curves = pd.read_csv(run.curves_csv)
        assert set(curves["layer"]) <= {"CL2"}
        for size in set(curves["size"]):
            assert run.som_path("CL2", *map(int, size.split("x"))).is_file()


def test_progress_counts_every_sample_of_every_map(tmp_path, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total=None, **kw):
            self.total, self.n = total, 0
            bars.append(self)

        def refresh(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    run = make_run(tmp_path / "run", n=50)
    fit_run(run, sizes="3,4", epochs=2, batch_size=10, device="cpu", workers=2, threads=1,
            progress=True)
    # 2 layers x 2 sizes x 50 samples x 2 epochs, whether a map ran here or in the worker
    assert len(bars) == 1 and bars[0].total == bars[0].n == 400

"""Sixteen maps at once: ``somprobe fit`` vs quicksom one by one; maps and data over torchrun ranks.

The paper's sixteen maps per model (study 003): 4 layers × torus sizes 10, 20, 30, 40, cosine,
σ0 = 10, α0 = 0.1, exp decay, batch 10, 5 epochs, on SOM-tr (50 per class × 10 classes = 500
codes). The codes are synthetic (non-negative, ReLU-like) with resnet18's CL1–CL4 widths after
2×2 pooling, D = 256, 512, 1024, 2048, written as a code store in a temporary run.

Part 1 (issue 8): ``fit_run`` with its defaults (no thread or worker setting) vs the same sixteen
maps fitted one by one with quicksom (its default threads), in one run; the same on a machine
with one core held by a busy-loop process. Also ``fit_run`` one map at a time with one thread
(``workers=1, threads=1``) and with torch's default threads, the pre-issue-8 behaviour.

Part 2 (issue 12): the sixteen maps spread over 2 ranks × 1 thread vs 1 rank × 1 thread (the
timed part is ``fit_run`` after the process group is up, launched with
``python -m torch.distributed.run``); and one 20×20 map of D = 2,048 fitted data-parallel on 2
ranks vs 1 at batch 10 and 1,000 (where all-reducing [G, D] per step stops the scaling).

    python benchmarks/som_parallel.py                     # everything (~5 min on 2 cores)
    python benchmarks/som_parallel.py --quicksom-epochs 1 # quicksom timed on 1 epoch, ×5
    python benchmarks/som_parallel.py --skip-ranks        # part 1 only
    python benchmarks/som_parallel.py --epochs 1 --skip-threaded   # a loaded machine
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

DIMS = {"CL1": 256, "CL2": 512, "CL3": 1024, "CL4": 2048}
SIZES = (10, 20, 30, 40)
PAPER = dict(metric="cosine", sigma=10.0, alpha=0.1, decay="exp", batch_size=10, mode="online",
             seed=0, device="cpu")


def make_run(root, n, dims=DIMS):
    from somprobe.run import Run
    from somprobe.store import StoreWriter

    run = Run(root)
    rng = np.random.default_rng(0)
    w = StoreWriter(run.codes_dir("som-tr"), layers_dims=dims, n_rows=n, manifest={"split": "som-tr"},
                    ids=[f"s{i}" for i in range(n)])
    w.write(0, {k: rng.random((n, d), dtype=np.float32) for k, d in dims.items()},
            labels=np.arange(n) % 10, preds=np.arange(n) % 10)
    w.close()
    return run


def time_fit_run(run, *, epochs, **kw):
    from somprobe.som.job import fit_run

    t = time.perf_counter()
    fit_run(run, sizes=",".join(map(str, SIZES)), splits=["som-tr"], epochs=epochs, **PAPER, **kw)
    return time.perf_counter() - t


def time_quicksom(run, *, epochs):
    """The sixteen maps one after the other with quicksom 1.0.0 (``epochs`` each)."""
    import quicksom.som as qs

    from somprobe.store import open_store

    def cosine(a, b):
        a = torch.nn.functional.normalize(a, dim=-1)
        b = torch.nn.functional.normalize(b, dim=-1)
        return 1.0 - a @ b.T

    store = open_store(run.codes_dir("som-tr"))
    cwd = os.getcwd()
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # quicksom writes som.log into the working directory
        try:
            for layer in DIMS:
                X = np.array(store.codes(layer))
                for s in SIZES:
                    torch.manual_seed(0)
                    t = time.perf_counter()
                    q = qs.SOM(s, s, X.shape[1], alpha=0.1, sigma=10.0, n_epoch=epochs, sched="exp",
                               periodic=True, metric=cosine, device="cpu")
                    loader = torch.utils.data.DataLoader(qs.ArrayDataset(X), batch_size=10,
                                                         shuffle=True, num_workers=0)
                    with contextlib.redirect_stdout(io.StringIO()):  # quicksom prints progress
                        q.fit(loader, batch_size=10, n_epoch=epochs, do_compute_all_dists=False,
                              logfile=None, print_each=10**9)
                    total += time.perf_counter() - t
        finally:
            os.chdir(cwd)
    return total


@contextlib.contextmanager
def busy_core():
    """A process spinning on one core for the duration (another user's job: its own session,
    so under Linux's autogroup scheduling it competes with this job as another user would)."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    time.sleep(0.5)
    try:
        yield
    finally:
        p.kill()
        p.wait()


def part1(a, tmp):
    run = make_run(os.path.join(tmp, "p1"), a.n)
    torch_default = torch.get_num_threads()
    print(f"\n== Part 1: sixteen maps (4 layers x {SIZES}), N={a.n}, D={list(DIMS.values())}, "
          f"{a.epochs} epochs, batch 10; cores: {os.cpu_count()}, torch default threads {torch_default}")
    rows = {}
    for label, ctx in (("quiet", contextlib.nullcontext), ("one core busy", busy_core)):
        with ctx():
            load = os.getloadavg()[0]
            t_def = time_fit_run(run, epochs=a.epochs)  # the defaults: what a user gets
            t_one = time_fit_run(run, epochs=a.epochs, workers=1, threads=1)
            torch.set_num_threads(torch_default)
            t_old = float("nan") if a.skip_threaded else \
                time_fit_run(run, epochs=a.epochs, workers=1, threads=torch_default)
            t_qs = time_quicksom(run, epochs=a.qs_epochs) * a.epochs / a.qs_epochs
        rows[label] = (t_def, t_one, t_old, t_qs, load)
        print(f"[{label}] (1-min load before: {load:.1f})")
        print(f"  somprobe fit, defaults (workers x 1 thread)   {t_def:7.2f} s")
        print(f"  somprobe, one map at a time, 1 thread         {t_one:7.2f} s")
        print(f"  somprobe, one map at a time, {torch_default} threads        {t_old:7.2f} s")
        print(f"  quicksom, one map at a time ({torch_default} threads)       {t_qs:7.2f} s"
              + (f"  (timed on {a.qs_epochs} epoch(s), x{a.epochs / a.qs_epochs:g})"
                 if a.qs_epochs != a.epochs else ""))
        print(f"  speed-up somprobe fit / quicksom: {t_qs / t_def:.1f}x (target >= 30x); "
              f"vs somprobe one by one (1 thread): {t_one / t_def:.2f}x, ({torch_default} threads): "
              f"{t_old / t_def:.2f}x")
    return rows


# ---------------------------------------------------------------------------------------------
# part 2: ranks
# ---------------------------------------------------------------------------------------------
def rank_job(a):
    """Run under torch.distributed.run: time fit_run after the process group is up."""
    from somprobe import distributed as dist
    from somprobe.run import Run
    from somprobe.som.job import fit_run

    torch.set_num_threads(1)
    ctx = dist.init("cpu")
    run = Run(a.run)
    kw = dict(PAPER, epochs=a.epochs, workers=1, threads=1, splits=["som-tr"])
    if a.rank_job == "spread":
        kw["sizes"] = ",".join(map(str, SIZES))
        dist.barrier()
        t = time.perf_counter()
        fit_run(run, **kw)
    elif a.dp_fit_run:
        kw.update(sizes="20", layers=["CL4"], batch_size=a.batch, data_parallel=True)
        dist.barrier()
        t = time.perf_counter()
        fit_run(run, **kw)
    else:
        # the training alone (what is data-parallel); fit_run adds the BMU files
        from somprobe.som import SOM
        from somprobe.store import open_store

        X = open_store(run.codes_dir("som-tr")).codes("CL4")
        hp = dict(PAPER, batch_size=a.batch, epochs=a.epochs)
        dist.barrier()
        t = time.perf_counter()
        SOM(20, 20, X.shape[1], **hp).fit(X, shard=(ctx.rank, ctx.world_size))
    dist.barrier()
    dt = time.perf_counter() - t
    if ctx.is_main:
        print(json.dumps({"seconds": dt, "world": ctx.world_size}))
    dist.finalize()


def launch(a, job, ranks, run, **extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(ranks), __file__, "--rank-job", job, "--run-dir", run, "--epochs", str(extra.get("epochs", a.epochs)),
           "--batch", str(extra.get("batch", 10))] + (["--dp-fit-run"] if a.dp_fit_run else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{job} on {ranks} rank(s) failed:\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)["seconds"]


def part2(a, tmp):
    print("\n== Part 2: torchrun ranks x 1 thread (gloo, CPU)")
    if not a.only_dp:
        run = make_run(os.path.join(tmp, "p2"), a.n)
        t1 = launch(a, "spread", 1, str(run.root))
        t2 = launch(a, "spread", 2, str(run.root))
        print(f"sixteen maps, 1 rank: {t1:.2f} s; 2 ranks (maps spread): {t2:.2f} s; "
              f"speed-up {t1 / t2:.2f}x (target >= 1.7x)")
    dp = make_run(os.path.join(tmp, "dp"), a.n_dp, dims={"CL4": 2048})
    print(f"data-parallel 20x20 map, D=2048, N={a.n_dp}, 1 epoch "
          f"({'fit_run: training and BMU files' if a.dp_fit_run else 'SOM.fit alone'}):")
    for batch in (10, 1000):
        s1 = launch(a, "data", 1, str(dp.root), epochs=1, batch=batch)
        s2 = launch(a, "data", 2, str(dp.root), epochs=1, batch=batch)
        print(f"  batch {batch:5d}: 1 rank {s1:6.2f} s ({a.n_dp / s1:7.0f} samples/s), 2 ranks "
              f"{s2:6.2f} s ({a.n_dp / s2:7.0f} samples/s): {s1 / s2:.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="codes per layer (SOM-tr: 50 x 10 classes)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--quicksom-epochs", dest="qs_epochs", type=int, default=None,
                   help="time quicksom on this many epochs and scale (default: --epochs)")
    p.add_argument("--n-dp", type=int, default=5000, help="samples of the data-parallel map")
    p.add_argument("--skip-threaded", action="store_true",
                   help="skip somprobe one by one with torch's default threads (slow under load)")
    p.add_argument("--skip-ranks", action="store_true")
    p.add_argument("--only-ranks", action="store_true")
    p.add_argument("--only-dp", action="store_true", help="part 2's data-parallel map only")
    p.add_argument("--dp-fit-run", action="store_true",
                   help="time the data-parallel map through fit_run (BMU files included)")
    p.add_argument("--rank-job", choices=["spread", "data"], help=argparse.SUPPRESS)
    p.add_argument("--run-dir", dest="run", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=10, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.qs_epochs = a.qs_epochs or a.epochs
    if a.rank_job:
        return rank_job(a)
    with tempfile.TemporaryDirectory() as tmp:
        if not (a.only_ranks or a.only_dp):
            part1(a, tmp)
        if not a.skip_ranks:
            part2(a, tmp)


if __name__ == "__main__":
    main()

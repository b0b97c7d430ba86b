"""SOM training speed: somprobe vs quicksom, and as a fraction of the machine's matmul throughput.

Paper configuration (study 003): N = 5,000 codes of D = 2,048, 20×20 torus, cosine distance,
batch 10, 'exp' decay, 1 epoch. Both trainers run in this process on the same data.

* quicksom vs somprobe, online rule, batch 10: samples/s and their ratio (target ≥ 10×).
* somprobe batch sizes 10, 100, 1000 and the batch map: samples/s and the fraction of the matrix
  product throughput measured here (a [1000, D] × [D, G] product); one sample costs 4·G·D flops
  (the BMU scores X·Wᵀ and the update Hᵀ·X). Target ≥ 60% at batch 1000.

Times are whole ``fit`` calls (input checks and data reads included). Run with
``OMP_NUM_THREADS=1`` for single-core numbers; on a shared machine take the best of ``--repeat``.

    python benchmarks/som_fit.py            # full (quicksom on 5,000 samples, ~20 s)
    python benchmarks/som_fit.py --quick    # quicksom on 500 samples, somprobe on 2,000
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

import numpy as np
import torch

from somprobe.som import SOM


def matmul_flops(G: int, D: int, device: torch.device, repeat: int = 5) -> float:
    """Best-of flops/s of a [1000, D] × [D, G] float32 product."""
    A = torch.rand(1000, D, device=device)
    W = torch.rand(G, D, device=device)
    best = float("inf")
    for _ in range(repeat + 1):
        _sync(device)
        t = time.perf_counter()
        for _ in range(5):
            torch.mm(W, A.t())
        _sync(device)
        best = min(best, (time.perf_counter() - t) / 5)
    return 2.0 * 1000 * D * G / best


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_somprobe(X, m, *, batch_size, mode, device, repeat):
    best = float("inf")
    for r in range(repeat):
        som = SOM(m, m, X.shape[1], metric="cosine", sigma=10.0, alpha=0.1, decay="exp", epochs=1,
                  batch_size=batch_size, mode=mode, seed=r, device=device)
        _sync(device)
        t = time.perf_counter()
        som.fit(X)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return len(X) / best


def time_quicksom(X, m, *, device, repeat):
    import quicksom.som as qs

    def cosine(a, b):
        a = torch.nn.functional.normalize(a, dim=-1)
        b = torch.nn.functional.normalize(b, dim=-1)
        return 1.0 - a @ b.T

    best = float("inf")
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # quicksom writes som.log into the working directory
        try:
            for _ in range(repeat):
                q = qs.SOM(m, m, X.shape[1], alpha=0.1, sigma=10.0, n_epoch=1, sched="exp",
                           periodic=True, metric=cosine, device=str(device))
                loader = torch.utils.data.DataLoader(qs.ArrayDataset(X), batch_size=10, shuffle=True,
                                                     num_workers=0)
                _sync(device)
                t = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):  # quicksom prints progress
                    q.fit(loader, batch_size=10, n_epoch=1, do_compute_all_dists=False,
                          logfile=None, print_each=10**9)
                _sync(device)
                best = min(best, time.perf_counter() - t)
        finally:
            os.chdir(cwd)
    return len(X) / best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples (quicksom 500, somprobe 2000)")
    p.add_argument("--n", type=int, default=None, help="samples for somprobe (default 5000)")
    p.add_argument("--n-quicksom", type=int, default=None, help="samples for quicksom (default = --n)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--size", type=int, default=20)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-quicksom", action="store_true")
    a = p.parse_args(argv)
    n = a.n or (2000 if a.quick else 5000)
    n_qs = a.n_quicksom or (500 if a.quick else n)
    device = torch.device(a.device)
    G, D = a.size * a.size, a.dim
    # non-negative, ReLU-like codes
    X = np.random.default_rng(0).random((n, D), dtype=np.float32)
    print(f"device={device} torch threads={torch.get_num_threads()} N={n} D={D} grid={a.size}x{a.size} "
          f"(G={G}) cosine, exp decay, 1 epoch; best of {a.repeat}")
    peak = matmul_flops(G, D, device)
    print(f"matmul throughput ([1000,{D}]x[{D},{G}]): {peak / 1e9:.1f} GFLOP/s "
          f"-> ceiling {peak / (4 * G * D):.0f} samples/s at 4*G*D flops/sample")

    rows = []
    for label, bs, mode in (("online B=10", 10, "online"), ("online B=100", 100, "online"),
                            ("online B=1000", 1000, "online"), ("batch map", 10, "batch")):
        sps = time_somprobe(X, a.size, batch_size=bs, mode=mode, device=device, repeat=a.repeat)
        rows.append((label, sps, sps * 4 * G * D / peak))
    print(f"{'somprobe':16s} {'samples/s':>10s} {'of matmul peak':>15s}")
    for label, sps, frac in rows:
        print(f"{label:16s} {sps:10.0f} {100 * frac:14.1f}%")
    peak2 = matmul_flops(G, D, device)
    print(f"(matmul throughput re-measured after the runs: {peak2 / 1e9:.1f} GFLOP/s)")

    if not a.no_quicksom:
        qsps = time_quicksom(X[:n_qs], a.size, device=device, repeat=1)
        print(f"quicksom online B=10 on {n_qs} samples: {qsps:.0f} samples/s")
        print(f"speed-up somprobe/quicksom at the paper configuration (B=10): {rows[0][1] / qsps:.1f}x "
              f"(target >= 10x)")


if __name__ == "__main__":
    main()

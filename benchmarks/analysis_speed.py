"""Speed of the SOM analyses (issue 4, Performance): 50,000 samples × 10 BMUs × 4 layers < 10 s.

Builds a synthetic run on disk (code stores with labels/preds/ids, 20×20 SOMs, clustered top-10
BMUs for SOM-tr and SOM-val, 50,000 inputs each by default), then times

* ``analyze_run`` end to end, without and with writing the CSV tables;
* the centre + D_class step against a naive reference: a Python loop over classes, each BMU
  moved to the nearest of its 9 copies by an explicit search (timed on a subset of classes and
  scaled linearly to all), and checks both give the same centres and D_class;
* the G×G weight cosine distances at the widest ResNet18 code (2048-D).

Run: ``python benchmarks/analysis_speed.py`` (``--quick`` for 5,000 samples; ``--classes 10``).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from somprobe.analysis import analyze_run, class_centres, d_class, weight_cosine_distances
from somprobe.run import Run
from somprobe.som.grid import Grid
from somprobe.store import StoreWriter

LAYERS = ("CL1", "CL2", "CL3", "CL4")
DIM = 16  # code width of the synthetic stores; the analyses never read the codes themselves


def clustered_bmus(labels, n_classes, grid, k, spread, rng):
    base = rng.integers(0, [grid.m, grid.n], (n_classes, 2))
    off = np.rint(rng.normal(0, spread, (labels.size, k, 2))).astype(int)
    rc = (base[labels][:, None, :] + off) % [grid.m, grid.n]
    return (rc[..., 0] * grid.n + rc[..., 1]).astype(np.int64)


def build(root: Path, n: int, n_classes: int, k: int, m: int, seed: int = 0) -> Run:
    run = Run(root)
    rng = np.random.default_rng(seed)
    g = Grid(m, m)
    for split in ("som-tr", "som-val"):
        labels = np.arange(n) % n_classes
        preds = np.where(rng.random(n) < 0.7, labels, rng.integers(0, n_classes, n))
        w = StoreWriter(run.codes_dir(split), layers_dims={l: DIM for l in LAYERS}, n_rows=n,
                        manifest={"split": split}, ids=[f"{split}-{i}" for i in range(n)])
        w.write(0, {l: np.ones((n, DIM), np.float32) for l in LAYERS}, labels, preds)
        w.close()
        for li, layer in enumerate(LAYERS):
            p = run.bmus_path(split, layer, m, m)
            p.parent.mkdir(parents=True, exist_ok=True)
            # deeper layers: tighter classes, as in study 003
            np.save(p, clustered_bmus(labels, n_classes, g, k, spread=3.0 - 0.6 * li, rng=np.random.default_rng(li)))
    for layer in LAYERS:
        run.soms_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": torch.randn(m * m, DIM, generator=torch.Generator().manual_seed(1))},
                   run.som_path(layer, m, m))
    return run


def naive_centres_dclass(bmus, labels, m, n, classes):
    """Reference: loop over classes; explicit 9-tile search for unfolding and distances."""
    # copies in the original tile first: on an even axis a BMU half the grid from the mode has
    # two equally near copies, and Grid.delta keeps the one in the original tile
    tiles = sorted(((a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)), key=lambda t: abs(t[0]) + abs(t[1]))
    offs = np.array([(a * m, b * n) for a, b in tiles], float)
    centres, dists = {}, {}
    for c in classes:
        b = bmus[labels == c]
        cnt = Counter(b[:, 0].tolist())
        top = max(cnt.values())
        mode = min(u for u, v in cnt.items() if v == top)
        ref = np.array(divmod(mode, n), float)
        pts = np.stack(np.divmod(b.ravel(), n), -1).astype(float)
        cand = pts[:, None, :] + offs[None]  # [P, 9, 2]
        best = cand[np.arange(len(pts)), ((cand - ref) ** 2).sum(-1).argmin(1)]
        cen = best.mean(0) % [m, n]
        cen = np.where(cen >= [m, n], 0.0, cen)
        centres[c] = cen
        d = np.sqrt(((pts[:, None, :] + offs[None] - cen) ** 2).sum(-1)).min(1)
        dists[c] = d.reshape(b.shape).mean(1)
    return centres, dists


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=50_000, help="inputs per split")
    ap.add_argument("--classes", type=int, nargs="+", default=[1000, 10])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--m", type=int, default=20)
    ap.add_argument("--naive-classes", type=int, default=50, help="classes timed for the naive reference")
    ap.add_argument("--quick", action="store_true", help="5,000 samples")
    a = ap.parse_args()
    n = 5_000 if a.quick else a.samples
    g = Grid(a.m, a.m)
    print(f"{n} samples per split (som-tr, som-val) × {a.k} BMUs × {len(LAYERS)} layers, {a.m}×{a.m} torus")
    for C in a.classes:
        with tempfile.TemporaryDirectory() as tmp:
            run = build(Path(tmp) / "run", n, C, a.k, a.m)
            t0 = time.perf_counter()
            tabs = analyze_run(run, write=False)
            t_mem = time.perf_counter() - t0
            t0 = time.perf_counter()
            analyze_run(run, write=True)
            t_all = time.perf_counter() - t0
            rows = sum(len(t) for t in tabs.values())
            print(f"classes={C:5d}: analyze_run {t_mem:6.2f} s in memory, {t_all:6.2f} s with CSV tables "
                  f"({rows} rows)  [target < 10 s]")

            b = np.load(run.bmus_path("som-tr", "CL2", a.m, a.m))
            y = np.load(run.codes_dir("som-tr") / "labels.npy")
            t0 = time.perf_counter()
            cen = class_centres(b, y, g)
            d = d_class(b, y, cen, g)
            t_vec = time.perf_counter() - t0
            sub = np.unique(y)[: a.naive_classes]
            t0 = time.perf_counter()
            ref_c, ref_d = naive_centres_dclass(b, y, a.m, a.m, sub)
            t_naive = (time.perf_counter() - t0) * (np.unique(y).size / sub.size)
            ci = cen.set_index("class")
            err_c = max(float(g.distance(ci.loc[c, ["row", "col"]].to_numpy(float), ref_c[c])) for c in sub)
            err_d = max(float(np.abs(d[y == c] - ref_d[c]).max()) for c in sub)
            print(f"  centre+D_class (one layer): vectorised {t_vec * 1e3:7.1f} ms, naive class loop "
                  f"{t_naive * 1e3:8.1f} ms (scaled from {sub.size} classes) → {t_naive / t_vec:5.1f}× faster; "
                  f"max |Δcentre| {err_c:.1e}, max |ΔD_class| {err_d:.1e}")
    w = np.random.default_rng(0).normal(size=(a.m * a.m, 2048)).astype(np.float32)
    t0 = time.perf_counter()
    weight_cosine_distances(w)
    print(f"weight cosine distances {a.m * a.m}×{a.m * a.m} at D=2048: {(time.perf_counter() - t0) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

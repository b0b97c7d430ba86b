"""Time of somprobe's figures and report on paper-sized tables, against plain seaborn.

The tables have the pinned schemas and study 003's sizes (50 samples × 10 classes per split,
top-10 BMUs, 20×20 torus, 4 CL layers or 12 CLS layers, PGD + noise shifts); their values are
random, which does not change the drawing cost. Reference: the same box plots drawn with
seaborn's figure-level ``sns.catplot`` + ``savefig`` (what a user would write by hand).

    python benchmarks/figures_report.py            # CL1–CL4 and CLS1–CLS12
    python benchmarks/figures_report.py --quick    # CL1–CL4, 10×10
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from somprobe import plots, report  # noqa: E402
from somprobe.run import Run, atomic_write_json, som_key  # noqa: E402


def make_run(root: Path, layers: list[str], m: int, per_class: int = 50, k: int = 10,
             seed: int = 0) -> Run:
    rng = np.random.default_rng(seed)
    run = Run(root)
    run.analysis_dir.mkdir(parents=True, exist_ok=True)
    size, G = f"{m}x{m}", m * m
    n = per_class * 10
    splits = ["som-tr", "som-val"]
    rows = lambda **kw: pd.DataFrame(kw)  # noqa: E731
    t = {}
    t["dclass_samples"] = pd.concat([rows(
        layer=l, size=size, split=s, sample_id=np.arange(n).astype(str),
        label=np.repeat(np.arange(10), per_class), pred=rng.integers(0, 10, n),
        correct=rng.random(n) < 0.8, d_class=rng.random(n) * m / 2)
        for l in layers for s in splits])
    t["dclass"] = (t["dclass_samples"].groupby(["layer", "size", "split", "label"])["d_class"]
                   .agg(d_class="mean", n_samples="size").reset_index()
                   .rename(columns={"label": "class"}))
    r, c = np.divmod(np.arange(G), m)
    t["density"] = pd.concat([rows(layer=l, size=size, split=s, row=r, col=c,
                                   density=rng.random(G) / G) for l in layers for s in splits])
    t["class_bmus"] = pd.concat([rows(layer=l, size=size, split=s, **{"class": cl}, unit=np.arange(G),
                                      row=r, col=c, count=rng.integers(0, 20, G))
                                 for l in layers for s in splits for cl in range(4)])
    q = np.sort(rng.random((len(layers), 5)), 1)
    t["weight_similarity"] = rows(layer=layers, size=size, mean=q[:, 2], median=q[:, 2], std=0.1,
                                  q05=q[:, 0], q25=q[:, 1], q75=q[:, 3], q95=q[:, 4])
    t["centre_similarity"] = pd.concat([rows(layer=l, size=size, class_a=0, class_b=1, unit_a=0,
                                             unit_b=1, cosine_distance=rng.random(4950))
                                        for l in layers])
    t["shifts"] = pd.concat([rows(layer=l, size=size, perturbation=p,
                                  sample_id=np.repeat(np.arange(n), k).astype(str),
                                  rank=np.tile(np.arange(k), n), distance=rng.random(n * k) * m / 2)
                             for l in layers for p in ("adv-pgd", "noise")])
    t["attacks"] = rows(attack=["pgd", "noise"], norm="linf", eps=4 / 255, steps=[50, 0], n=n,
                        clean_acc=0.8, perturbed_acc=[0.04, 0.79], success_rate=[0.95, 0.02])
    for name, df in t.items():
        df.to_csv(run.table(name), index=False)
    (run.analysis_dir / "weight_distances").mkdir(exist_ok=True)
    for l in layers:
        a = rng.random((G, G)).astype(np.float32)
        np.save(run.analysis_dir / "weight_distances" / f"{som_key(l, m, m)}.npy", (a + a.T) / 2)
    atomic_write_json(run.model_meta, {"model": "resnet18", "dataset": "fashion-mnist"})
    return run


def reference_boxes(run: Run, out: Path) -> float:
    """Plain seaborn: the three box-plot figures with sns.catplot + savefig."""
    import seaborn as sns

    t0 = time.perf_counter()
    for name, y, hue in (("dclass", "d_class", "split"), ("shifts", "distance", "perturbation"),
                         ("centre_similarity", "cosine_distance", "size")):
        df = pd.read_csv(run.table(name))
        order = plots.natural_sorted(df["layer"])
        g = sns.catplot(data=df, x="layer", y=y, hue=hue, kind="box", order=order, height=3.8,
                        aspect=1.6)
        g.savefig(out / f"ref-{name}.png", dpi=plots.DPI)
        import matplotlib.pyplot as plt

        plt.close(g.figure)
    return time.perf_counter() - t0


def ours_boxes(run: Run, out: Path) -> float:
    t0 = time.perf_counter()
    plots.save_figure(plots.plot_dclass(pd.read_csv(run.table("dclass"))), out / "dclass.png")
    plots.save_figure(plots.plot_shifts(pd.read_csv(run.table("shifts"))), out / "shifts.png")
    plots.save_figure(plots.plot_centre_similarity(pd.read_csv(run.table("centre_similarity"))),
                      out / "centres.png")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CL1–CL4 on a 10×10 grid only")
    args = ap.parse_args()
    cases = [("CL1-CL4", [f"CL{i}" for i in range(1, 5)], 10 if args.quick else 20)]
    if not args.quick:
        cases.append(("CLS1-CLS12", [f"CLS{i}" for i in range(1, 13)], 20))
    for label, layers, m in cases:
        with tempfile.TemporaryDirectory() as tmp:
            run = make_run(Path(tmp) / "run", layers, m)
            out = Path(tmp) / "cmp"
            out.mkdir()
            # best of 3, alternating, so font caches and CPU contention hit both alike
            ref, ours = np.inf, np.inf
            for _ in range(3):
                ref = min(ref, reference_boxes(run, out))
                ours = min(ours, ours_boxes(run, out))
            t0 = time.perf_counter()
            paths = plots.plot_run(run)
            t_all = time.perf_counter() - t0
            t0 = time.perf_counter()
            rep = report.write_report(run)
            t_rep = time.perf_counter() - t0
            print(f"{label}, {m}x{m} torus, {len(layers)} layers:")
            print(f"  3 box-plot figures: somprobe {ours:.2f} s, plain sns.catplot {ref:.2f} s, "
                  f"ratio somprobe/seaborn {ours / ref:.2f}")
            print(f"  plot_run: {len(paths)} figures in {t_all:.2f} s "
                  f"({t_all / max(len(paths), 1):.2f} s per figure)")
            print(f"  write_report: {t_rep:.2f} s, {rep.stat().st_size / 1e6:.2f} MB HTML")


if __name__ == "__main__":
    main()

"""Report size (issue 8): a many-layer run's report stays under 5 MB.

The run is faked from tables with the pinned schemas, filled with noise: noise heat maps are the
worst case for PNG compression, so a real run's report is smaller still.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from somprobe.analysis.job import TABLE_COLUMNS
from somprobe.run import Run, atomic_write_json, som_key

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LAYERS = [f"CLS{i}" for i in range(1, 13)]
SPLITS = ("som-tr", "som-val")


def _frame(name, rows):
    return pd.DataFrame(rows)[TABLE_COLUMNS[name]]


def fake_run(root, sizes, *, n_samples=200, classes=10, seed=0) -> Run:
    """Every table ``somprobe report`` draws, for 12 layers × ``sizes`` (square m), as noise."""
    rng = np.random.default_rng(seed)
    run = Run(root)
    atomic_write_json(run.model_meta, {"model": "vit_base_patch16_224", "dataset": "digits"})
    for s in SPLITS:
        atomic_write_json(run.codes_dir(s) / "manifest.json",
                          {"dataset": "digits", "split": s, "n_rows": n_samples,
                           "layers": LAYERS, "complete": True})
    t = {k: [] for k in ("curves", "density", "class_bmus", "dclass", "dclass_samples",
                         "weight_similarity", "centre_similarity", "correct_incorrect", "shifts",
                         "shift_summary")}
    labels = np.arange(n_samples) % classes
    ids = [str(i) for i in range(n_samples)]
    (run.analysis_dir / "weight_distances").mkdir(parents=True, exist_ok=True)
    for layer, m in itertools.product(LAYERS, sizes):
        size, g = f"{m}x{m}", m * m
        row, col = np.divmod(np.arange(g), m)
        steps = np.arange(1, 51)
        t["curves"].append(pd.DataFrame({"layer": layer, "size": size, "epoch": (steps - 1) // 10,
                                         "step": steps, "samples": steps * 10, "alpha": 0.1 / steps,
                                         "sigma": 10.0 / steps, "loss": rng.random(50)}))
        for s in SPLITS:
            d = rng.random(g)
            t["density"].append(_frame("density", {"layer": layer, "size": size, "split": s,
                                                   "row": row, "col": col, "density": d / d.sum()}))
            for c in range(classes):
                t["class_bmus"].append(_frame("class_bmus", {
                    "layer": layer, "size": size, "split": s, "class": c, "unit": np.arange(g),
                    "row": row, "col": col, "count": rng.poisson(1.0, g)}))
            dc = rng.random(n_samples) * m / 2
            t["dclass_samples"].append(_frame("dclass_samples", {
                "layer": layer, "size": size, "split": s, "sample_id": ids, "label": labels,
                "pred": rng.integers(0, classes, n_samples), "correct": rng.random(n_samples) < 0.8,
                "d_class": dc}))
            t["dclass"].append(_frame("dclass", {
                "layer": layer, "size": size, "split": s, "class": np.arange(classes),
                "d_class": np.bincount(labels, dc) / np.bincount(labels),
                "n_samples": np.bincount(labels)}))
        for ok in (True, False):
            v = rng.random(50) * m / 2
            t["correct_incorrect"].append(_frame("correct_incorrect", {
                "layer": [layer], "size": size, "correct": ok, "n": 50, "mean": v.mean(),
                "median": np.median(v), "q25": np.quantile(v, 0.25), "q75": np.quantile(v, 0.75)}))
        wd = rng.random((g, g)).astype(np.float32)
        np.save(run.analysis_dir / "weight_distances" / f"{som_key(layer, m, m)}.npy", wd)
        q = np.quantile(wd, [0.05, 0.25, 0.5, 0.75, 0.95])
        t["weight_similarity"].append(_frame("weight_similarity", {
            "layer": [layer], "size": size, "mean": wd.mean(), "median": q[2], "std": wd.std(),
            "q05": q[0], "q25": q[1], "q75": q[3], "q95": q[4]}))
        a, b = np.triu_indices(classes, 1)
        t["centre_similarity"].append(_frame("centre_similarity", {
            "layer": layer, "size": size, "class_a": a, "class_b": b,
            "unit_a": rng.integers(0, g, len(a)), "unit_b": rng.integers(0, g, len(a)),
            "cosine_distance": rng.random(len(a))}))
        for p in ("adv-pgd", "noise"):
            dist = rng.random((n_samples, 10)) * m / 2
            t["shifts"].append(_frame("shifts", {
                "layer": layer, "size": size, "perturbation": p,
                "sample_id": np.repeat(ids, 10), "rank": np.tile(np.arange(1, 11), n_samples),
                "distance": dist.ravel()}))
            t["shift_summary"].append(_frame("shift_summary", {
                "layer": [layer], "size": size, "perturbation": p, "n": n_samples, "n_missing": 0,
                "mean": dist.mean(), "median": np.median(dist), "q25": np.quantile(dist, 0.25),
                "q75": np.quantile(dist, 0.75)}))
    run.soms_dir.mkdir(parents=True, exist_ok=True)
    pd.concat(t.pop("curves")).to_csv(run.curves_csv, index=False)
    for name, parts in t.items():
        pd.concat(parts, ignore_index=True).to_csv(run.table(name), index=False)
    pd.DataFrame({"name": ["adv-pgd", "noise"], "attack": ["pgd", "noise"], "norm": "linf",
                  "eps": 4 / 255, "steps": [50, 1], "n": n_samples, "clean_acc": 0.9,
                  "perturbed_acc": [0.1, 0.88], "success_rate": [0.9, 0.02],
                  "success_rate_correct": [0.9, 0.02], "labels": "dataset", "backend": "builtin",
                  "seed": 0}).to_csv(run.table("attacks"), index=False)
    return run


def test_twelve_layer_report_stays_under_5_mb(tmp_path):
    """12 layers at the largest paper size (40x40: 1600×1600 weight-distance heat maps), every
    figure kind drawn; the paper's four sizes (10, 20, 30, 40) would hold four such sets."""
    from PIL import Image

    from somprobe.plots import plot_run
    from somprobe.report import write_report

    run = fake_run(tmp_path / "run", sizes=(40,))
    figs = plot_run(run)
    assert {p.stem for p in figs} >= {
        "curves", "density-40x40", "class-bmus-40x40", "dclass-40x40", "weight-distances-40x40",
        "weight-similarity", "centre-similarity", "correct-incorrect-40x40", "shifts-40x40",
        "attacks"}
    per_size = sum(p.stat().st_size for p in figs if p.stem.endswith("-40x40"))
    shared = sum(p.stat().st_size for p in figs if not p.stem.endswith("-40x40"))
    html = write_report(run).stat().st_size
    assert html < 5e6, f"report is {html / 1e6:.2f} MB"
    # four sizes as big as the 40x40 one, base64 (4/3) in the page
    assert (4 * per_size + shared) * 4 / 3 < 5e6, (per_size, shared)
    for p in figs:  # still sharp: nothing drawn below MIN_DPI, palette PNGs
        with Image.open(p) as im:
            assert im.mode == "P" and min(im.size) >= 300, (p.name, im.size, im.mode)

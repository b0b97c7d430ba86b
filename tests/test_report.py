"""The HTML report: embeds every figure, escapes file text, writes atomically, says what is
missing, and on a tiny real run (sklearn digits) shows the numbers of the data."""
from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pytest

from somprobe import plots, report
from somprobe.errors import AnalysisError
from somprobe.run import Run, atomic_write_json, som_key
from somprobe.som.grid import Grid

B64 = "data:image/png;base64,"


def _tiny_png(path):
    # A real PNG written by matplotlib, not by the code under test.
    import matplotlib.image as mpimg

    path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(path, np.arange(12, dtype=float).reshape(3, 4))


def _leftovers(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def run(tmp_path):
    run = Run(tmp_path / "r")
    atomic_write_json(run.model_meta, {"model": "test_resnet", "classes": ["a", "b"],
                                       "val_accuracy": 0.5})
    atomic_write_json(run.codes_dir("som-tr") / "manifest.json", {
        "dataset": "digits <script>alert('x')</script>", "n_rows": 20,
        "layers": {"CL1": 64}, "checkpoint_sha256": "abc123"})
    atomic_write_json(run.codes_dir("som-val") / "manifest.json", {"dataset": "digits", "n_rows": 20})
    atomic_write_json(run.som_meta("CL1", 4, 4), {"m": 4, "n": 4, "metric": "cosine",
                                                  "topology": "torus", "sigma": 10.0})
    run.analysis_dir.mkdir(parents=True)
    pd.DataFrame({"attack": ["pgd"], "norm": ["linf"], "eps": [4 / 255], "steps": [50], "n": [10],
                  "clean_acc": [0.9], "perturbed_acc": [0.125], "success_rate": [0.8]}
                 ).to_csv(run.table("attacks"), index=False)
    pd.DataFrame({"layer": ["CL1"] * 7, "size": ["4x4"] * 7, "split": ["som-tr"] * 7,
                  "sample_id": [f"s{i}" for i in range(7)], "label": 0, "pred": 0,
                  "correct": True, "d_class": np.arange(7.0)}
                 ).to_csv(run.table("dclass_samples"), index=False)
    for name in ("curves", "density-4x4", "dclass-4x4", "shifts-4x4", "mystery"):
        _tiny_png(run.figure(name))
    run.commands_log.write_text('somprobe fit --layers "CL1<2" r\nsomprobe analyze r\n')
    return run


def test_embeds_every_figure_and_orders_sections(run):
    html = (report.write_report(run)).read_text()
    n_png = len(list(run.figures_dir.glob("*.png")))
    assert html.count(B64) == n_png == 5
    # each embedded image decodes to the very bytes of its file
    for p in run.figures_dir.glob("*.png"):
        import base64

        assert B64 + base64.b64encode(p.read_bytes()).decode() in html
    pos = [html.index(f'id="{s}"') for s in ("model", "soms", "density", "dclass", "attacks",
                                              "shifts", "other")]
    assert pos == sorted(pos)
    other = html[html.index('id="other"'):]
    assert 'id="fig-mystery"' in other
    assert html.index('id="fig-curves"') < html.index('id="density"')
    # self-contained: no scripts, no external resources
    assert "<script" not in html.lower()
    assert not re.search(r'(src|href)="(https?:)?//', html)


def test_escapes_text_from_files(run):
    html = report.write_report(run).read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<script>" not in html
    assert "CL1&lt;2" in html  # the command log is escaped too
    assert "somprobe analyze r" in html
    assert "abc123" in html and "test_resnet" in html and "cosine" in html


def test_tables_small_in_full_big_linked(run):
    html = report.write_report(run).read_text()
    attacks = html[html.index('id="attacks"'):html.index('id="shifts"')]
    assert "0.125" in attacks and "pgd" in attacks
    assert 'href="analysis/attacks.csv"' in attacks
    dclass = html[html.index('id="dclass"'):html.index('id="weights"')]
    assert 'href="analysis/dclass_samples.csv"' in dclass and "7 rows" in dclass
    assert "s6" not in html  # big tables are linked, not dumped


def test_missing_parts_say_which_command(tmp_path):
    run = Run(tmp_path / "only-model")
    atomic_write_json(run.model_meta, {"model": "test_vit"})
    html = report.write_report(run).read_text()
    for cmd in ("somprobe extract", "somprobe fit", "somprobe analyze", "somprobe attack",
                "somprobe shift"):
        assert f"not run yet: run <code>{cmd}</code>" in html
    assert "commands.txt" in html


def test_empty_run_is_an_error(tmp_path):
    with pytest.raises(AnalysisError, match="somprobe extract.*somprobe fit.*somprobe analyze"):
        report.write_report(tmp_path / "nothing")
    assert not (tmp_path / "nothing" / "report.html").exists()


def test_broken_json_is_reported_not_fatal(run):
    run.som_meta("CL2", 4, 4).write_text("{not json")
    html = report.write_report(run).read_text()
    assert "could not read CL2-4x4.json" in html


def test_atomic_write_keeps_old_report(run, monkeypatch):
    path = report.write_report(run, title="first")
    old = path.read_bytes()
    assert b"<title>first</title>" in old
    assert _leftovers(run.root) == []

    def boom(*a, **k):
        raise OSError("disk full")

    with monkeypatch.context() as mp:  # failing at the rename
        mp.setattr(os, "replace", boom)
        with pytest.raises(OSError, match="disk full"):
            report.write_report(run, title="second")
    assert path.read_bytes() == old
    assert _leftovers(run.root) == []
    with monkeypatch.context() as mp:  # failing half-way through the figures
        calls = []
        real = report._figure_html

        def flaky(p):
            calls.append(p)
            if len(calls) == 3:
                raise RuntimeError("unreadable figure")
            return real(p)

        mp.setattr(report, "_figure_html", flaky)
        with pytest.raises(RuntimeError):
            report.write_report(run, title="third")
    assert path.read_bytes() == old
    assert _leftovers(run.root) == []


# a tiny real run from sklearn digits -------------------------------------------------------
def _cosine_distances(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 1.0 - a @ b.T


def _digits_run(root):
    """Codes = digit pixels (CL1) and a fixed random projection of them (CL2); SOM weights =
    random SOM-tr rows; BMUs by brute-force nearest neighbours; tables with the pinned schemas."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(3)
    idx = {s: [] for s in ("som-tr", "som-val")}
    for c in range(10):
        pick = rng.permutation(np.flatnonzero(y == c))[:40]
        idx["som-tr"] += list(pick[:20])
        idx["som-val"] += list(pick[20:])
    proj = rng.normal(size=(64, 24))
    layers = {"CL1": lambda x: x + 1e-3, "CL2": lambda x: np.tanh(x @ proj / 16)}
    run = Run(root)
    grid, m, n, k, size = Grid(4, 4), 4, 4, 3, "4x4"
    rc = grid.coords()
    # the "model" for correct/incorrect: nearest class mean of SOM-tr pixels
    means = np.stack([X[idx["som-tr"]][y[idx["som-tr"]] == c].mean(0) for c in range(10)])
    preds = {s: np.argmin(((X[i][:, None] - means[None]) ** 2).sum(-1), 1) for s, i in idx.items()}
    noisy = X[idx["som-val"]] + rng.uniform(0, 4, size=(len(idx["som-val"]), 64))
    noisy_pred = np.argmin(((noisy[:, None] - means[None]) ** 2).sum(-1), 1)

    atomic_write_json(run.model_meta, {"model": "nearest-class-mean", "dataset": "digits"})
    for s, i in idx.items():
        atomic_write_json(run.codes_dir(s) / "manifest.json",
                          {"dataset": "digits", "split": s, "n_rows": len(i),
                           "layers": {l: (64 if l == "CL1" else 24) for l in layers}})
    t = {name: [] for name in ("dclass", "dclass_samples", "density", "class_bmus",
                               "weight_similarity", "correct_incorrect", "shifts")}
    for layer, f in layers.items():
        codes = {s: f(X[i]) for s, i in idx.items()}
        W = codes["som-tr"][rng.choice(len(idx["som-tr"]), size=16, replace=False)]
        atomic_write_json(run.som_meta(layer, m, n), {"m": m, "n": n, "metric": "cosine"})
        bmus = {s: np.argsort(_cosine_distances(c, W), 1)[:, :k] for s, c in codes.items()}
        top1 = bmus["som-tr"][:, 0]
        ytr = y[idx["som-tr"]]
        centre = {c: np.bincount(top1[ytr == c], minlength=16).argmax() for c in range(10)}
        for s, b in bmus.items():
            lab = y[idx[s]]
            cen = rc[[centre[c] for c in lab]]
            d = grid.distance(rc[b], cen[:, None, :]).mean(1)
            correct = preds[s] == lab
            t["dclass_samples"].append(pd.DataFrame({
                "layer": layer, "size": size, "split": s, "sample_id": [str(i) for i in idx[s]],
                "label": lab, "pred": preds[s], "correct": correct, "d_class": d}))
            for c in range(10):
                t["dclass"].append(pd.DataFrame({"layer": [layer], "size": size, "split": s,
                                                 "class": c, "d_class": d[lab == c].mean(),
                                                 "n_samples": (lab == c).sum()}))
                cnt = np.bincount(b[lab == c].ravel(), minlength=16)
                u = np.flatnonzero(cnt)
                t["class_bmus"].append(pd.DataFrame({
                    "layer": layer, "size": size, "split": s, "class": c, "unit": u,
                    "row": rc[u, 0], "col": rc[u, 1], "count": cnt[u]}))
            dens = np.bincount(b[:, 0], minlength=16) / len(b)
            t["density"].append(pd.DataFrame({"layer": layer, "size": size, "split": s,
                                              "row": rc[:, 0], "col": rc[:, 1], "density": dens}))
            if s == "som-val":
                for ok in (True, False):
                    v = d[correct == ok]
                    t["correct_incorrect"].append(pd.DataFrame({
                        "layer": [layer], "size": size, "correct": ok, "n": len(v),
                        "mean": v.mean(), "median": np.median(v),
                        "q25": np.quantile(v, 0.25), "q75": np.quantile(v, 0.75)}))
        wd = _cosine_distances(W, W).astype(np.float32)
        (run.analysis_dir / "weight_distances").mkdir(parents=True, exist_ok=True)
        np.save(run.analysis_dir / "weight_distances" / f"{som_key(layer, m, n)}.npy", wd)
        off = wd[~np.eye(16, dtype=bool)]
        t["weight_similarity"].append(pd.DataFrame({
            "layer": [layer], "size": size, "mean": off.mean(), "median": np.median(off),
            "std": off.std(), **{f"q{q:02d}": np.quantile(off, q / 100) for q in (5, 25, 75, 95)}}))
        nb = np.argsort(_cosine_distances(f(noisy), W), 1)[:, :k]
        dist = grid.distance(rc[bmus["som-val"]], rc[nb])
        t["shifts"].append(pd.DataFrame({
            "layer": layer, "size": size, "perturbation": "noise",
            "sample_id": np.repeat([str(i) for i in idx["som-val"]], k),
            "rank": np.tile(np.arange(k), len(nb)), "distance": dist.ravel()}))
    for name, parts in t.items():
        pd.concat(parts, ignore_index=True).to_csv(run.table(name), index=False)
    shifts = pd.read_csv(run.table("shifts"))
    summ = shifts.groupby(["layer", "size", "perturbation"])["distance"].agg(
        n="size", mean="mean", median="median",
        q25=lambda v: v.quantile(0.25), q75=lambda v: v.quantile(0.75)).reset_index()
    summ.to_csv(run.table("shift_summary"), index=False)
    lab_val = y[idx["som-val"]]
    pd.DataFrame({"attack": ["noise"], "norm": ["linf"], "eps": [4.0], "steps": [1],
                  "n": [len(lab_val)], "clean_acc": [(preds["som-val"] == lab_val).mean()],
                  "perturbed_acc": [(noisy_pred == lab_val).mean()],
                  "success_rate": [np.nan]}).to_csv(run.table("attacks"), index=False)
    return run


def test_real_digits_run_figures_and_report(tmp_path):
    run = _digits_run(tmp_path / "digits")
    paths = plots.plot_run(run)
    names = sorted(p.stem for p in paths)
    assert names == sorted(["density-4x4", "class-bmus-4x4", "dclass-4x4", "weight-distances-4x4",
                            "weight-similarity", "correct-incorrect-4x4", "shifts-4x4", "attacks"])
    html = report.write_report(run).read_text()
    assert html.count(B64) == len(list(run.figures_dir.glob("*.png"))) == len(paths)

    fmt = report.FLOAT_FORMAT.format
    ws = pd.read_csv(run.table("weight_similarity"))
    # the medians the test computed from the weights appear in the weights section
    sec = html[html.index('id="weights"'):html.index('id="centres"')]
    for layer in ("CL1", "CL2"):
        W = np.load(run.analysis_dir / "weight_distances" / f"{layer}-4x4.npy")
        med = np.median(W[~np.eye(16, dtype=bool)])
        assert ws.set_index("layer").loc[layer, "median"] == pytest.approx(med, rel=1e-6)
        assert f"<td>{fmt(med)}</td>" in sec
    # median over classes of D_class per layer and split, from the per-sample distances
    samples = pd.read_csv(run.table("dclass_samples"))
    sec = html[html.index('id="dclass"'):html.index('id="weights"')]
    for (layer, split), g in samples.groupby(["layer", "split"]):
        per_class = g.groupby("label")["d_class"].mean()
        assert f"<td>{fmt(np.median(per_class))}</td>" in sec
    assert "4x4 som-tr" in sec and "4x4 som-val" in sec
    # accuracy of the nearest-class-mean model under noise, in the attacks table
    acc = pd.read_csv(run.table("attacks"))["perturbed_acc"][0]
    assert f"<td>{fmt(acc)}</td>" in html[html.index('id="attacks"'):]
    shifts = pd.read_csv(run.table("shifts"))
    med = shifts[shifts.layer == "CL2"]["distance"].median()
    assert f"<td>{fmt(med)}</td>" in html[html.index('id="shifts"'):]
    # the SOM sidecars are listed; the part not made (class-centre similarity) says how
    assert "CL2-4x4" in html and "cosine" in html and "digits" in html
    sec = html[html.index('id="centres"'):html.index('id="correct"')]
    assert "not run yet: run <code>somprobe analyze</code>" in sec


def test_summary_tables_in_natural_layer_order(tmp_path):
    run = Run(tmp_path / "r")
    run.analysis_dir.mkdir(parents=True)
    pd.DataFrame({"layer": ["CL10", "CL2", "CL1"], "size": "5x5", "mean": [0.3, 0.2, 0.1],
                  "median": [0.31, 0.21, 0.11], "std": 0.0, "q05": 0.0, "q25": 0.0, "q75": 1.0,
                  "q95": 1.0}).to_csv(run.table("weight_similarity"), index=False)
    html = report.write_report(run).read_text()
    pos = [html.index(f"<td>{v}</td>") for v in ("0.11", "0.21", "0.31")]
    assert pos == sorted(pos)
    assert html.count(B64) == 0
    assert "not run yet: run <code>somprobe train</code>" in html

"""Figures from tidy tables: files are made, panels/boxes/ticks follow the data and natural layer
order, bad tables give clear errors. Tables are small synthetic frames with the pinned schemas."""
from __future__ import annotations

import os

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from somprobe import plots
from somprobe.errors import AnalysisError
from somprobe.run import Run, som_key

RNG = np.random.default_rng(0)
LAYERS_SHUFFLED = ["CL10", "CL2", "CL1", "CL3"]
LAYERS_NATURAL = ["CL1", "CL2", "CL3", "CL10"]


def _dclass(layers=LAYERS_SHUFFLED, splits=("som-val", "som-tr"), size="5x5", n_classes=7):
    return pd.DataFrame([
        {"layer": l, "size": size, "split": s, "class": c, "d_class": RNG.random() * 3,
         "n_samples": 50}
        for l in layers for s in splits for c in range(n_classes)])


def _density(layers=LAYERS_SHUFFLED, m=4, n=5, splits=("som-tr", "som-val")):
    return pd.DataFrame([
        {"layer": l, "size": f"{m}x{n}", "split": s, "row": r, "col": c, "density": RNG.random()}
        for l in layers for s in splits for r in range(m) for c in range(n)])


def _ticks(ax):
    return [t.get_text() for t in ax.get_xticklabels()]


def _boxes(ax):
    return {c.get_label(): c for c in ax.containers if hasattr(c, "boxes")}


def test_natural_sort():
    assert plots.natural_sorted(["CL10", "CL2", "CL1", "CL2"]) == ["CL1", "CL2", "CL10"]
    cls = [f"CLS{i}" for i in range(12, 0, -1)]
    assert plots.natural_sorted(cls) == [f"CLS{i}" for i in range(1, 13)]
    assert plots.natural_sorted(["20x20", "5x5", "10x10"]) == ["5x5", "10x10", "20x20"]
    # mixed shapes must still compare (text at even positions, numbers at odd ones)
    assert plots.natural_sorted(["1a", "a1", "CL1", "module:layer1.0"])[0] == "1a"


def test_dclass_boxes_follow_layers_and_splits():
    df = _dclass()
    fig = plots.plot_dclass(df)
    ax = fig.axes[0]
    assert _ticks(ax) == LAYERS_NATURAL
    conts = list(ax.containers)
    assert len(conts) == 2  # one per split (hue)
    assert sum(len(c.boxes) for c in conts) == len(LAYERS_NATURAL) * 2
    # medians drawn = medians of the data, in natural layer order; SOM-tr is the first hue
    for cont, split in zip(conts, ["som-tr", "som-val"]):
        want = [df[(df.layer == l) & (df.split == split)].d_class.median() for l in LAYERS_NATURAL]
        got = [m.get_ydata()[0] for m in cont.medians]
        np.testing.assert_allclose(got, want)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SOM-tr", "SOM-val"]
    assert "D_class" in ax.get_ylabel() and "grid units" in ax.get_ylabel()
    assert ax.get_xlabel() == "layer" and "5x5" in ax.get_title()


def test_vit_cls_layers_in_natural_order():
    layers = [f"CLS{i}" for i in (12, 3, 1, 10, 2, 11, 4, 5, 6, 7, 8, 9)]
    fig = plots.plot_dclass(_dclass(layers=layers, splits=("som-tr",)))
    assert _ticks(fig.axes[0]) == [f"CLS{i}" for i in range(1, 13)]


def test_nan_and_inf_do_not_crash(tmp_path):
    df = _dclass()
    df.loc[df.index[:5], "d_class"] = np.nan
    df.loc[df.index[5], "d_class"] = np.inf
    df.loc[df.layer == "CL3", "d_class"] = np.nan  # a whole layer without values
    fig = plots.plot_dclass(df)
    assert _ticks(fig.axes[0]) == LAYERS_NATURAL
    out = plots.save_figure(fig, tmp_path / "d.png")
    assert mpimg.imread(out).shape[0] > 0


def test_density_panels_and_values():
    df = _density()
    df.loc[0, "density"] = np.nan
    fig = plots.plot_density(df)
    panels = [a for a in fig.axes if a.images and a.get_visible() and a.get_title()]
    assert len(panels) == 4 * 2
    titles = [a.get_title() for a in panels]
    assert titles[:4] == [f"{l} · SOM-tr" for l in LAYERS_NATURAL]
    assert titles[4:] == [f"{l} · SOM-val" for l in LAYERS_NATURAL]
    # the CL2 / SOM-val image is the table's density laid on the 4×5 grid
    ax = panels[5]
    img = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    sub = df[(df.layer == "CL2") & (df.split == "som-val")]
    want = np.full((4, 5), np.nan)
    want[sub.row, sub.col] = sub.density
    np.testing.assert_allclose(img, want)
    assert img.shape == (4, 5)
    # one shared colour scale
    lims = {a.images[0].get_clim() for a in panels}
    assert len(lims) == 1


def test_density_at_finer_resolution():
    # analysis may evaluate the density at r points per unit: rows/cols at multiples of 1/r
    r, m, n = 2, 3, 4
    pts_r, pts_c = np.arange(m * r) / r, np.arange(n * r) / r
    vals = RNG.random((m * r, n * r))
    df = pd.DataFrame({"layer": "CL1", "size": f"{m}x{n}", "split": "som-tr",
                       "row": np.repeat(pts_r, pts_c.size), "col": np.tile(pts_c, pts_r.size),
                       "density": vals.ravel()})
    ax = [a for a in plots.plot_density(df).axes if a.images][0]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), vals)
    left, right, bottom, top = ax.images[0].get_extent()
    assert (left, right, bottom, top) == (-0.25, n - 0.25, m - 0.25, -0.25)  # grid units


def test_density_wraps_many_layers():
    layers = [f"CLS{i}" for i in range(1, 13)]
    fig = plots.plot_density(_density(layers=layers, m=3, n=3, splits=("som-tr",)), col_wrap=6)
    panels = [a for a in fig.axes if a.images and a.get_visible()]
    assert [a.get_title().split(" ")[0] for a in panels] == layers


def test_class_bmus_tr_above_val():
    rows = []
    for l in ["CL2", "CL1"]:
        for s in ["som-val", "noise", "som-tr"]:
            for k in (3, 1):
                for u in RNG.choice(9, size=4, replace=False):
                    rows.append({"layer": l, "size": "3x3", "split": s, "class": k, "unit": u,
                                 "row": u // 3, "col": u % 3, "count": int(RNG.integers(1, 9))})
    df = pd.DataFrame(rows)
    fig = plots.plot_class_bmus(df)
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == 2 * 2 * 2
    labels = [a.get_ylabel() for a in panels[::2]]
    assert labels == ["CL1\nSOM-tr", "CL1\nSOM-val", "CL2\nSOM-tr", "CL2\nSOM-val"]
    assert [a.get_title() for a in panels[:2]] == ["class 1", "class 3"]
    # CL2 / SOM-val / class 3: counts on the grid, zero where no BMU fell
    img = np.asarray(panels[7].images[0].get_array())
    sub = df[(df.layer == "CL2") & (df.split == "som-val") & (df["class"] == 3)]
    want = np.zeros((3, 3))
    want[sub.row, sub.col] = sub["count"]
    np.testing.assert_array_equal(img, want)
    every = plots.plot_class_bmus(df, splits=None, classes=[3])
    assert [a.get_ylabel() for a in every.axes if a.images][:3] == [
        "CL1\nSOM-tr", "CL1\nSOM-val", "CL1\nnoise"]
    with pytest.raises(AnalysisError, match="classes \\[7\\]"):
        plots.plot_class_bmus(df, classes=[1, 7])


def test_weight_distances_from_run_files(tmp_path):
    run = Run(tmp_path)
    folder = run.analysis_dir / "weight_distances"
    folder.mkdir(parents=True)
    mats = {}
    for l in LAYERS_SHUFFLED:
        a = RNG.random((9, 9)).astype(np.float32)
        mats[l] = (a + a.T) / 2
        np.save(folder / f"{som_key(l, 3, 3)}.npy", mats[l])
    np.save(folder / f"{som_key('CL1', 4, 4)}.npy", np.zeros((16, 16), np.float32))
    assert plots.weight_distance_sizes(run) == ["3x3", "4x4"]
    loaded = plots.load_weight_distances(run, "3x3")
    assert list(loaded) == LAYERS_NATURAL
    fig = plots.plot_weight_distances(loaded, size="3x3")
    panels = [a for a in fig.axes if a.images and a.get_title()]
    assert [a.get_title() for a in panels] == LAYERS_NATURAL
    np.testing.assert_allclose(np.asarray(panels[3].images[0].get_array()), mats["CL10"])
    with pytest.raises(AnalysisError, match="square"):
        plots.plot_weight_distances({"CL1": np.zeros((3, 4))})
    with pytest.raises(AnalysisError, match="somprobe analyze"):
        plots.plot_weight_distances({})


def test_weight_similarity_points_are_the_table_medians():
    rows = []
    for s in ["20x20", "5x5"]:
        for l in LAYERS_SHUFFLED:
            q = np.sort(RNG.random(5))
            rows.append({"layer": l, "size": s, "mean": q[2], "median": q[2], "std": 0.1,
                         "q05": q[0], "q25": q[1], "q75": q[3], "q95": q[4]})
    df = pd.DataFrame(rows)
    fig = plots.plot_weight_similarity(df)
    ax = fig.axes[0]
    assert _ticks(ax) == LAYERS_NATURAL
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["5x5", "20x20"]
    # the first errorbar line is 5x5's medians in layer order
    want = df[df["size"] == "5x5"].set_index("layer").loc[LAYERS_NATURAL]
    bars = ax.containers[0]  # ErrorbarContainer of the first size
    np.testing.assert_allclose(bars.lines[0].get_ydata(), want["median"])
    segs = bars.lines[2][0].get_segments()  # IQR bars: q25 → q75
    np.testing.assert_allclose([s[:, 1] for s in segs], want[["q25", "q75"]].to_numpy())


def test_centre_similarity_hue_is_size():
    df = pd.DataFrame([
        {"layer": l, "size": s, "class_a": 0, "class_b": 1, "unit_a": 0, "unit_b": 1,
         "cosine_distance": RNG.random()}
        for l in LAYERS_SHUFFLED for s in ["40x40", "10x10", "20x20"] for _ in range(8)])
    fig = plots.plot_centre_similarity(df)
    ax = fig.axes[0]
    assert _ticks(ax) == LAYERS_NATURAL
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["10x10", "20x20", "40x40"]
    assert sum(len(c.boxes) for c in ax.containers) == 4 * 3


@pytest.mark.parametrize("as_text", [False, True])
def test_correct_incorrect_from_samples(tmp_path, as_text):
    df = pd.DataFrame([
        {"layer": l, "size": "5x5", "split": sp, "sample_id": f"s{i}", "label": 0, "pred": 0,
         "correct": i % 3 != 0, "d_class": RNG.random()}
        for l in ["CL2", "CL1"] for sp in ["som-tr", "som-val"] for i in range(30)])
    if as_text:  # the CSV round trip gives bools; other writers may give strings
        df["correct"] = df["correct"].map({True: "True", False: "False"})
    fig = plots.plot_correct_incorrect(df)
    ax = fig.axes[0]
    assert _ticks(ax) == ["CL1", "CL2"]
    conts = list(ax.containers)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["correct", "incorrect"]
    val = df[df.split == "som-val"]
    ok = val["correct"].astype(str) == "True"
    want = [val[(val.layer == l) & ~ok].d_class.median() for l in ["CL1", "CL2"]]
    np.testing.assert_allclose([m.get_ydata()[0] for m in conts[1].medians], want)


def test_correct_incorrect_from_summary():
    df = pd.DataFrame([
        {"layer": l, "size": "5x5", "correct": c, "n": 10, "mean": 1.0, "median": m,
         "q25": m - 0.2, "q75": m + 0.3}
        for l, base in (("CL2", 1.0), ("CL1", 2.0)) for c, m in ((True, base), (False, base + 1))])
    ax = plots.plot_correct_incorrect(df).axes[0]
    assert _ticks(ax) == ["CL1", "CL2"]
    data = [c.lines[0].get_ydata() for c in ax.containers]  # ErrorbarContainers, hue order
    np.testing.assert_allclose(data, [[2.0, 1.0], [3.0, 2.0]])


@pytest.mark.parametrize("kind", ["box", "violin"])
def test_shifts_adv_before_noise(kind, tmp_path):
    df = pd.DataFrame([
        {"layer": l, "size": "5x5", "perturbation": p, "sample_id": f"s{i}", "rank": r,
         "distance": RNG.random() * 4}
        for l in LAYERS_SHUFFLED for p in ["noise", "adv-pgd"] for i in range(10) for r in range(2)])
    fig = plots.plot_shifts(df, kind=kind)
    ax = fig.axes[0]
    assert _ticks(ax) == LAYERS_NATURAL
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["adv-pgd", "noise"]
    assert "shift" in ax.get_ylabel()
    assert mpimg.imread(plots.save_figure(fig, tmp_path / "s.png")).size > 0
    with pytest.raises(ValueError, match="box"):
        plots.plot_shifts(df, kind="swarm")


def test_attacks_bars_are_the_accuracies():
    df = pd.DataFrame([
        {"attack": "pgd", "norm": "linf", "eps": 4 / 255, "steps": 50, "n": 100,
         "clean_acc": 0.81, "perturbed_acc": 0.04, "success_rate": 0.95},
        {"attack": "noise", "norm": "linf", "eps": 4 / 255, "steps": 1, "n": 100,
         "clean_acc": 0.81, "perturbed_acc": 0.79, "success_rate": 0.02}])
    ax = plots.plot_attacks(df).axes[0]
    heights = [[b.get_height() for b in c] for c in ax.containers]
    np.testing.assert_allclose(heights, [[0.81, 0.81], [0.04, 0.79]])
    assert _ticks(ax)[0].startswith("pgd") and "4/255" in _ticks(ax)[0]


def test_curves_one_line_per_layer_and_size():
    df = pd.DataFrame([
        {"layer": l, "size": s, "m": 5, "n": 5, "epoch": st // 10, "step": st,
         "samples": st * 10, "alpha": 0.1, "sigma": 1.0, "loss": 1 / (st + 1) + i}
        for i, l in enumerate(LAYERS_SHUFFLED) for s in ["10x10", "5x5"] for st in range(20)])
    fig = plots.plot_curves(df)
    assert [a.get_title() for a in fig.axes] == ["SOM 5x5", "SOM 10x10"]
    ax = fig.axes[0]
    data_lines = [l for l in ax.lines if len(l.get_xdata()) == 20]
    assert len(data_lines) == 4
    legend = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert legend == LAYERS_NATURAL
    # the CL10 curve is drawn with its own losses
    cl10 = df[(df.layer == "CL10") & (df["size"] == "5x5")].sort_values("samples")
    assert any(np.allclose(l.get_ydata(), cl10.loss) for l in data_lines)
    with pytest.raises(ValueError, match="samples"):
        plots.plot_curves(df, x="time")


def test_bad_tables():
    with pytest.raises(AnalysisError, match="d_class.*somprobe analyze"):
        plots.plot_dclass(_dclass().drop(columns="d_class"))
    two = pd.concat([_dclass(size="5x5"), _dclass(size="10x10")])
    with pytest.raises(AnalysisError, match="size="):
        plots.plot_dclass(two)
    with pytest.raises(AnalysisError, match="no rows for SOM size '7x7'"):
        plots.plot_dclass(two, size="7x7")
    assert len(plots.plot_dclass(two, size="10x10").axes) == 1
    bad = _density(m=3, n=3)
    bad.loc[0, "row"] = 9
    with pytest.raises(AnalysisError, match="not a point of the 3x3 grid"):
        plots.plot_density(bad)
    with pytest.raises(TypeError):
        plots.plot_dclass([1, 2, 3])


def test_save_figure_atomic(tmp_path, monkeypatch):
    target = tmp_path / "figs" / "x.png"
    out = plots.save_figure(plots.plot_dclass(_dclass()), target)
    assert out == target
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    old = target.read_bytes()
    fig = plots.plot_dclass(_dclass())

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(RuntimeError):
        plots.save_figure(fig, target)
    assert target.read_bytes() == old
    assert sorted(os.listdir(target.parent)) == ["x.png"]


def test_plot_run_makes_what_it_can(tmp_path):
    run = Run(tmp_path / "run")
    assert plots.plot_run(run) == []  # nothing there yet: nothing to draw, no error
    run.analysis_dir.mkdir(parents=True)
    _dclass().to_csv(run.table("dclass"), index=False)
    pd.concat([_density(m=5, n=5), _density(m=5, n=5).assign(size="10x10")]).to_csv(
        run.table("density"), index=False)
    run.table("shifts").write_text("")  # an empty file is skipped, not an error
    paths = plots.plot_run(run)
    assert sorted(p.name for p in paths) == ["dclass-5x5.png", "density-10x10.png",
                                              "density-5x5.png"]
    assert all(mpimg.imread(p).shape[0] > 0 for p in paths)
    assert [p.name for p in plots.plot_run(run, sizes=["10x10"])] == ["density-10x10.png"]
    _dclass().drop(columns="split").to_csv(run.table("dclass"), index=False)
    with pytest.raises(AnalysisError, match="split"):
        plots.plot_run(run)

"""Class centres, D_class and correct-vs-incorrect: hand-worked cases and brute-force references."""
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from somprobe.analysis import class_centres, class_means, correct_vs_incorrect, d_class
from somprobe.errors import AnalysisError
from somprobe.som.grid import Grid


def rc_unit(g, r, c):
    return r * g.n + c


def brute_torus_distance(p, q, m, n):
    """Shortest Euclidean distance over the 9 tiles, written out (study 003, Fig. 2A)."""
    return min(math.hypot(q[0] + a * m - p[0], q[1] + b * n - p[1]) for a in (-1, 0, 1) for b in (-1, 0, 1))


def brute_centres(bmus, labels, m, n, k_centre=None):
    """Per-class loop: mode of top-1 BMUs, nearest of 9 copies to it, mean, wrap."""
    out = {}
    for c in sorted(set(labels.tolist())):
        rows = bmus[labels == c]
        top1 = Counter(rows[:, 0].tolist())
        best = max(top1.values())
        mode = min(u for u, v in top1.items() if v == best)
        mr, mc = divmod(mode, n)
        pts = []
        for u in rows[:, : k_centre or rows.shape[1]].ravel():
            r, cc = divmod(int(u), n)
            cand = [(r + a * m, cc + b * n) for a in (-1, 0, 1) for b in (-1, 0, 1)]
            pts.append(min(cand, key=lambda p: (p[0] - mr) ** 2 + (p[1] - mc) ** 2))
        pr, pc = np.mean(pts, axis=0)
        out[c] = (mode, pr % m, pc % n)
    return out


def test_seam_centre_hand_worked():
    # 5×5 torus, row 2: BMUs at columns 4, 4, 0, 0, 0. The mode is column 0; the two BMUs at
    # column 4 unfold to column -1, so the centre is (-1-1+0+0+0)/5 = -0.4 → 4.6 after wrapping,
    # on the seam; a planar mean would put it at column 1.6, in the middle of nowhere.
    g = Grid(5, 5)
    b = np.array([[rc_unit(g, 2, 4)], [rc_unit(g, 2, 4)], [rc_unit(g, 2, 0)], [rc_unit(g, 2, 0)], [rc_unit(g, 2, 0)]])
    cen = class_centres(b, np.zeros(5, int), g)
    assert cen.loc[0, "mode_unit"] == rc_unit(g, 2, 0)
    assert cen.loc[0, "row"] == pytest.approx(2.0)
    assert cen.loc[0, "col"] == pytest.approx(4.6)
    assert cen.loc[0, "unit"] == rc_unit(g, 2, 0)  # 4.6 rounds to column 5 ≡ 0
    assert cen.loc[0, "n_samples"] == 5


def test_corner_centre_hand_worked():
    # The four corners of a 5×5 torus are neighbours. Mode (0,0) twice; (4,4)→(-1,-1),
    # (0,4)→(0,-1), (4,0)→(-1,0); mean (-0.4, -0.4) → (4.6, 4.6).
    g = Grid(5, 5)
    b = np.array([[0], [rc_unit(g, 4, 4)], [rc_unit(g, 0, 4)], [rc_unit(g, 4, 0)], [0]])
    cen = class_centres(b, np.full(5, 7), g)
    assert cen.loc[0, "class"] == 7
    assert (cen.loc[0, "row"], cen.loc[0, "col"]) == pytest.approx((4.6, 4.6))


def test_circular_centre_hand_worked():
    g = Grid(5, 5)
    b = np.array([[rc_unit(g, 2, 4)], [rc_unit(g, 2, 4)], [rc_unit(g, 2, 0)], [rc_unit(g, 2, 0)], [rc_unit(g, 2, 0)]])
    cen = class_centres(b, np.zeros(5, int), g, method="circular")
    a = 2 * math.pi * 4 / 5
    ang = math.atan2(2 * math.sin(a), 2 * math.cos(a) + 3)
    assert cen.loc[0, "col"] == pytest.approx((ang / (2 * math.pi) * 5) % 5)
    assert cen.loc[0, "row"] == pytest.approx(2.0)
    assert cen.loc[0, "method"] == "circular"


def test_mode_tie_takes_lowest_unit():
    g = Grid(4, 4)
    b = np.array([[5], [3], [5], [3]])
    assert class_centres(b, np.zeros(4, int), g).loc[0, "mode_unit"] == 3


@pytest.mark.parametrize("k_centre", [None, 1, 2])
def test_unfold_centres_match_bruteforce_non_square(k_centre):
    rng = np.random.default_rng(1)
    # odd sizes: no BMU lies exactly half a grid from the mode, where two copies tie
    m, n = 7, 9
    g = Grid(m, n)
    labels = rng.integers(0, 7, 300)
    # compact-ish clusters around a per-class unit, some crossing the seams
    base = rng.integers(0, [m, n], (7, 2))
    off = rng.integers(-2, 3, (300, 3, 2))
    rc = (base[labels][:, None, :] + off) % [m, n]
    bmus = rc[..., 0] * n + rc[..., 1]
    got = class_centres(bmus, labels, g, k_centre=k_centre)
    ref = brute_centres(bmus, labels, m, n, k_centre)
    assert got["class"].tolist() == sorted(ref)
    for _, r in got.iterrows():
        mode, pr, pc = ref[r["class"]]
        assert r["mode_unit"] == mode
        assert g.distance(np.array([r["row"], r["col"]]), np.array([pr, pc])) == pytest.approx(0, abs=1e-9)
    assert (got["n_samples"].to_numpy() == np.bincount(labels)).all()


def test_circular_and_unfold_agree_for_compact_clusters():
    rng = np.random.default_rng(2)
    g = Grid(20, 20)
    labels = np.repeat(np.arange(30), 40)
    base = rng.integers(0, 20, (30, 2))
    rc = (base[labels][:, None, :] + rng.integers(-1, 2, (1200, 10, 2))) % 20  # spread ±1 unit
    bmus = rc[..., 0] * 20 + rc[..., 1]
    a = class_centres(bmus, labels, g)
    b = class_centres(bmus, labels, g, method="circular")
    d = g.distance(a[["row", "col"]].to_numpy(), b[["row", "col"]].to_numpy())
    assert d.max() < 0.05
    # centres land within the cluster (the base unit), including clusters across the seam
    assert g.distance(a[["row", "col"]].to_numpy(), base.astype(float)).max() < 0.5


def test_d_class_matches_bruteforce():
    rng = np.random.default_rng(3)
    m, n = 7, 5
    g = Grid(m, n)
    labels = rng.integers(0, 4, 60)
    bmus = rng.integers(0, m * n, (60, 10))
    cen = class_centres(bmus, labels, g)
    d = d_class(bmus, labels, cen, g)
    table = cen.set_index("class")
    for i in range(60):
        c = (table.loc[labels[i], "row"], table.loc[labels[i], "col"])
        ref = np.mean([brute_torus_distance(divmod(int(u), n), c, m, n) for u in bmus[i]])
        assert d[i] == pytest.approx(ref)
    # k limits the ranks used
    d1 = d_class(bmus, labels, cen, g, k=1)
    i = 0
    c = (table.loc[labels[i], "row"], table.loc[labels[i], "col"])
    assert d1[i] == pytest.approx(brute_torus_distance(divmod(int(bmus[i, 0]), n), c, m, n))


def test_d_class_hand_worked_across_seam():
    g = Grid(5, 5)
    cen = pd.DataFrame({"class": [0], "row": [2.0], "col": [4.6]})
    # unit (2,0) is 0.4 away across the seam, unit (2,2) is 2.6 away the short way round
    d = d_class(np.array([[rc_unit(g, 2, 0), rc_unit(g, 2, 2)]]), np.array([0]), cen, g)
    assert d[0] == pytest.approx((0.4 + 2.4) / 2)


def test_class_without_samples_is_named():
    g = Grid(4, 4)
    with pytest.raises(AnalysisError, match=r"class 3 has no SOM-tr samples"):
        class_centres(np.array([[0], [1], [2]]), np.array([0, 1, 2]), g, classes=[0, 1, 2, 3])


def test_labels_absent_from_centres():
    g = Grid(4, 4)
    cen = class_centres(np.array([[0], [1]]), np.array([0, 1]), g)
    with pytest.raises(AnalysisError, match=r"som-val labels \[5\] are absent from SOM-tr"):
        d_class(np.array([[0], [3]]), np.array([0, 5]), cen, g, split="som-val")


def test_bmus_from_another_grid_rejected():
    with pytest.raises(AnalysisError, match="another size"):
        class_centres(np.array([[0], [16]]), np.array([0, 0]), Grid(4, 4))


def test_unknown_method_and_bad_k_centre():
    g = Grid(4, 4)
    with pytest.raises(AnalysisError, match="unknown centre method"):
        class_centres(np.array([[0]]), np.array([0]), g, method="mean")
    with pytest.raises(AnalysisError, match="k_centre"):
        class_centres(np.array([[0, 1]]), np.array([0]), g, k_centre=3)


def test_class_means_and_correct_vs_incorrect_vs_pandas():
    rng = np.random.default_rng(4)
    v = rng.random(200)
    y = rng.integers(0, 9, 200)
    ok = rng.random(200) < 0.7
    cm = class_means(v, y)
    ref = pd.DataFrame({"y": y, "v": v}).groupby("y")["v"].agg(["mean", "size"])
    assert np.allclose(cm["d_class"], ref["mean"]) and (cm["n_samples"].to_numpy() == ref["size"].to_numpy()).all()
    ci = correct_vs_incorrect(v, ok).set_index("correct")
    for flag in (True, False):
        sel = v[ok == flag]
        assert ci.loc[flag, "n"] == sel.size
        assert ci.loc[flag, "mean"] == pytest.approx(sel.mean())
        assert ci.loc[flag, "median"] == pytest.approx(np.median(sel))
        assert ci.loc[flag, "q75"] == pytest.approx(np.percentile(sel, 75))
    empty = correct_vs_incorrect(v, np.ones(200, bool)).set_index("correct")
    assert empty.loc[False, "n"] == 0 and np.isnan(empty.loc[False, "mean"])

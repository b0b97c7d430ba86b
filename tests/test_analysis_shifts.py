"""BMU shifts rank by rank and id alignment of clean and perturbed stores."""
import math

import numpy as np
import pytest

from somprobe.analysis import align_ids, bmu_shifts, shift_summary, shift_table
from somprobe.errors import AnalysisError
from somprobe.som.grid import Grid


def test_shifts_hand_worked_and_bruteforce():
    g = Grid(5, 5)
    # unit 0 = (0,0) and unit 4 = (0,4) are neighbours across the seam; 0 → 12 = (2,2)
    assert bmu_shifts(np.array([[0, 0]]), np.array([[4, 12]]), g).tolist() == [[1.0, math.hypot(2, 2)]]
    rng = np.random.default_rng(0)
    m, n = 6, 4
    g = Grid(m, n)
    c = rng.integers(0, 24, (20, 5))
    p = rng.integers(0, 24, (20, 5))
    d = bmu_shifts(c, p, g)
    for i in range(20):
        for r in range(5):
            (a, b), (x, y) = divmod(int(c[i, r]), n), divmod(int(p[i, r]), n)
            ref = min(math.hypot(x + s * m - a, y + t * n - b) for s in (-1, 0, 1) for t in (-1, 0, 1))
            assert d[i, r] == pytest.approx(ref)


def test_shift_shape_mismatch():
    with pytest.raises(AnalysisError, match="differ in shape"):
        bmu_shifts(np.zeros((3, 2), int), np.zeros((3, 3), int), Grid(3, 3))


def test_align_ids_subset_any_order():
    clean = ["a", "b", "c", "d"]
    assert align_ids(clean, ["c", "a"]).tolist() == [2, 0]
    assert align_ids(clean, clean).tolist() == [0, 1, 2, 3]


def test_align_ids_names_first_missing_and_duplicates():
    with pytest.raises(AnalysisError, match=r"perturbed sample 1 has id 'x'.*2 such ids"):
        align_ids(["a", "b"], ["a", "x", "y"], clean_name="som-val", perturbed_name="adv-pgd")
    with pytest.raises(AnalysisError, match="appears 2 times"):
        align_ids(["a", "b"], ["a", "a"])


def test_table_and_summary():
    d = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    t = shift_table(d, ["i0", "i1", "i2"])
    assert t["rank"].tolist() == [1, 2] * 3 and t["sample_id"].tolist()[:3] == ["i0", "i0", "i1"]
    assert t["distance"].tolist() == d.ravel().tolist()
    s = shift_summary(d)
    assert s["n"] == 3 and s["mean"] == 2.5 and s["median"] == 2.5 and s["q25"] == 1.25

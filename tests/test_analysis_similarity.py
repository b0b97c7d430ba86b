"""Cosine distances between unit weights and between class-centre units, against scipy."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import cdist, pdist

from somprobe.analysis import (
    centre_similarity, choose_classes, weight_cosine_distances, weight_similarity_summary,
)
from somprobe.errors import AnalysisError
from somprobe.som.grid import Grid


def test_weight_distances_match_scipy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(30, 17)) + 0.5
    d = weight_cosine_distances(w)
    assert d.dtype == np.float32 and d.shape == (30, 30)
    assert np.allclose(d, cdist(w, w, "cosine"), atol=1e-6)
    assert (np.diag(d) == 0).all()
    # torch weights in, same answer
    assert np.allclose(weight_cosine_distances(torch.as_tensor(w, dtype=torch.float32)), d, atol=1e-5)


def test_summary_over_distinct_pairs():
    rng = np.random.default_rng(1)
    w = rng.random((12, 5))
    d = weight_cosine_distances(w)
    s = weight_similarity_summary(d)
    off = pdist(w, "cosine")  # each unordered pair once
    assert s["mean"] == pytest.approx(off.mean(), abs=1e-6)
    assert s["median"] == pytest.approx(np.median(off), abs=1e-6)
    assert s["std"] == pytest.approx(off.std(), abs=1e-6)
    assert s["q05"] == pytest.approx(np.quantile(off, 0.05), abs=1e-6)
    assert s["q95"] == pytest.approx(np.quantile(off, 0.95), abs=1e-6)
    with pytest.raises(AnalysisError, match="square"):
        weight_similarity_summary(np.zeros((3, 4)))


def test_identical_weights_have_zero_distance_and_nan_rejected():
    w = np.array([[1.0, 2.0], [2.0, 4.0], [-1.0, -2.0]])
    d = weight_cosine_distances(w)
    assert d[0, 1] == pytest.approx(0, abs=1e-7) and d[0, 2] == pytest.approx(2.0)
    with pytest.raises(AnalysisError, match="NaN"):
        weight_cosine_distances(np.array([[np.nan, 1.0], [1.0, 1.0]]))


def test_choose_classes_seeded_subset():
    a = choose_classes(np.arange(1000), n=100, seed=3)
    assert a.size == 100 and np.unique(a).size == 100 and (np.diff(a) > 0).all()
    assert (a == choose_classes(np.arange(1000)[::-1], n=100, seed=3)).all()  # order of input irrelevant
    assert not (a == choose_classes(np.arange(1000), n=100, seed=4)).all()
    assert (choose_classes([3, 1, 2, 3], n=100) == [1, 2, 3]).all()


def test_centre_similarity_matches_cdist():
    rng = np.random.default_rng(2)
    g = Grid(6, 5)
    w = rng.normal(size=(30, 8))
    cen = pd.DataFrame({"class": [4, 0, 7, 9], "row": [0.2, 5.7, 3.4, 2.0], "col": [4.6, 0.1, 2.5, 2.0]})
    t = centre_similarity(w, cen, g, classes=[0, 4, 7])
    # nearest units: class 0 (5.7, 0.1) → (0, 0) across the row seam; class 4 (0.2, 4.6) → (0, 0)
    # across the column seam; class 7 (3.4, 2.5) → (3, 2) (numpy rounds half to even)
    assert t[["class_a", "class_b"]].values.tolist() == [[0, 4], [0, 7], [4, 7]]
    assert t["unit_a"].tolist() == [0, 0, 0] and t["unit_b"].tolist() == [0, 17, 17]
    ref = cdist(w[[0, 0, 0]], w[[0, 17, 17]], "cosine").diagonal()
    assert np.allclose(t["cosine_distance"], ref, atol=1e-6)
    assert t["cosine_distance"].iloc[0] == pytest.approx(0, abs=1e-7)
    with pytest.raises(AnalysisError, match="no centre"):
        centre_similarity(w, cen, g, classes=[0, 5])

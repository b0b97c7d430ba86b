"""Run-level analyses on real data: sklearn digits → code store → SOMs → tables; bad inputs."""
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist
from sklearn.datasets import load_digits

from somprobe.analysis import (
    TABLE_COLUMNS, analyze_run, bmu_shifts, class_centres, d_class, find_soms, shift_run,
)
from somprobe.errors import AnalysisError
from somprobe.run import Run
from somprobe.som.grid import Grid
from somprobe.som.map import SOM
from somprobe.store import StoreWriter

M = N = 8
LAYERS = ("CL1", "CLS2", "CLS12")  # ViT names are plain layer names


def layer_codes(X):
    rng = np.random.default_rng(0)
    R = rng.normal(size=(64, 24)).astype(np.float32)
    return {"CL1": X, "CLS2": np.tanh(X @ R), "CLS12": np.maximum(X @ R, 0) + 0.01}


def write_store(run, split, codes, labels, preds, ids):
    w = StoreWriter(run.codes_dir(split), layers_dims={k: v.shape[1] for k, v in codes.items()},
                    n_rows=len(labels), manifest={"split": split}, ids=ids)
    w.write(0, codes, labels, preds)
    w.close()


def build_run(root: Path, *, drop_train_class=None) -> Run:
    """digits split per class (even rows SOM-tr, odd SOM-val); nearest-centroid predictions;
    a batch SOM per layer; top-10 BMUs of both splits."""
    run = Run(root)
    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    idx = np.arange(len(y))
    tr, va = idx[idx % 2 == 0], idx[idx % 2 == 1]
    if drop_train_class is not None:
        tr = tr[y[tr] != drop_train_class]
    means = np.stack([X[tr][y[tr] == c].mean(0) for c in np.unique(y[tr])])
    cls = np.unique(y[tr])
    preds = cls[cdist(X, means).argmin(1)]
    codes = layer_codes(X)
    for split, rows in (("som-tr", tr), ("som-val", va)):
        write_store(run, split, {k: v[rows] for k, v in codes.items()}, y[rows], preds[rows],
                    [f"digits-{i}" for i in rows])
    for layer in LAYERS:
        som = SOM(M, N, codes[layer].shape[1], mode="batch", epochs=8, sigma=3.0, init="sample",
                  seed=0, device="cpu").fit(codes[layer][tr])
        som.save(run.som_path(layer, M, N), meta={"layer": layer})
        for split, rows in (("som-tr", tr), ("som-val", va)):
            p = run.bmus_path(split, layer, M, N)
            p.parent.mkdir(parents=True, exist_ok=True)
            np.save(p, som.bmus(codes[layer][rows], k=10)[0])
    return run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("digits") / "run")


@pytest.fixture(scope="module")
def tables(digits_run):
    return analyze_run(digits_run, seed=0)


def test_table_columns_match_interfaces_doc(tables):
    doc = (Path(__file__).parents[1] / "docs" / "interfaces.md").read_text()
    pinned = {}
    for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \| analysis", doc, re.M):
        cols = re.sub(r"\(.*?\)", "", m[2])  # drop remarks such as "(of d_class, split som-val)"
        pinned[m[1]] = [c.strip() for c in cols.split(",")]
    assert set(pinned) == set(TABLE_COLUMNS)
    for name, cols in pinned.items():
        assert TABLE_COLUMNS[name] == cols, name
    for name, df in tables.items():
        assert list(df.columns) == TABLE_COLUMNS[name]


def test_tables_written_and_consistent(digits_run, tables):
    run = digits_run
    for name, df in tables.items():
        back = pd.read_csv(run.table(name))
        assert len(back) == len(df) and list(back.columns) == list(df.columns)
    assert not list(run.analysis_dir.glob(".*.tmp"))
    # natural layer order, ViT names included
    assert tables["weight_similarity"]["layer"].tolist() == ["CL1", "CLS2", "CLS12"]
    tr, va = (pd.read_json(run.codes_dir(s) / "ids.json") for s in ("som-tr", "som-val"))
    ds = tables["dclass_samples"]
    assert len(ds) == len(LAYERS) * (len(tr) + len(va))
    # recompute one layer's centres and D_class directly from the stored BMUs and labels
    g = Grid(M, N)
    for layer in LAYERS:
        b_tr = np.load(run.bmus_path("som-tr", layer, M, N))
        y_tr = np.load(run.codes_dir("som-tr") / "labels.npy")
        cen = class_centres(b_tr, y_tr, g)
        got = tables["centres"][tables["centres"]["layer"] == layer].reset_index(drop=True)
        assert np.allclose(got[["row", "col"]], cen[["row", "col"]])
        b_va = np.load(run.bmus_path("som-val", layer, M, N))
        y_va = np.load(run.codes_dir("som-val") / "labels.npy")
        d = d_class(b_va, y_va, cen, g)
        sel = ds[(ds["layer"] == layer) & (ds["split"] == "som-val")]
        assert np.allclose(sel["d_class"], d)
        dc = tables["dclass"]
        per = dc[(dc["layer"] == layer) & (dc["split"] == "som-val")]
        assert np.allclose(per["d_class"], pd.Series(d).groupby(y_va).mean())
        W = SOM.load(run.som_path(layer, M, N)).weights.numpy()
        wd = np.load(run.weight_distances_path(layer, M, N))
        assert wd.shape == (M * N, M * N) and np.allclose(wd, cdist(W, W, "cosine"), atol=1e-5)
    # density integrates to 1 over the grid for every layer and split
    dens = tables["density"].groupby(["layer", "size", "split"])["density"].sum()
    assert np.allclose(dens, 1.0) and len(dens) == len(LAYERS) * 2
    # 10 digit classes → 45 centre pairs per SOM; 4 chosen classes × 64 units × 2 splits
    assert (tables["centre_similarity"].groupby("layer").size() == 45).all()
    cb = tables["class_bmus"]
    assert len(cb) == len(LAYERS) * 2 * 4 * M * N
    assert (cb.groupby(["layer", "split", "class"])["count"].sum() % 10 == 0).all()
    ci = tables["correct_incorrect"]
    assert (ci.groupby("layer")["n"].sum() == len(va)).all()
    ok = ds[ds["split"] == "som-val"]
    assert (ok["correct"] == (ok["pred"] == ok["label"])).all() and 0 < ok["correct"].mean() < 1


def test_real_digits_classes_cluster_on_the_map(digits_run, tables):
    # a SOM trained on digit images groups each digit: the BMUs sit much closer to their own
    # class centre than to the centre of a randomly permuted label (real behaviour, not a fixture)
    g = Grid(M, N)
    rng = np.random.default_rng(0)
    for layer in ("CL1", "CLS2"):
        ds = tables["dclass_samples"]
        sel = ds[(ds["layer"] == layer) & (ds["split"] == "som-val")]
        b_va = np.load(digits_run.bmus_path("som-val", layer, M, N))
        cen = tables["centres"][tables["centres"]["layer"] == layer]
        shuffled = d_class(b_va, rng.permutation(sel["label"].to_numpy()), cen, g)
        assert sel["d_class"].mean() < 0.75 * shuffled.mean()


def test_before_fit_says_run_fit(tmp_path):
    run = Run(tmp_path / "r")
    X, y = load_digits(return_X_y=True)
    write_store(run, "som-tr", {"CL1": X[:20].astype(np.float32)}, y[:20], y[:20], [str(i) for i in range(20)])
    with pytest.raises(AnalysisError, match=r"run `somprobe fit` first"):
        analyze_run(run)
    with pytest.raises(AnalysisError, match=r"somprobe fit"):
        shift_run(run, perturbed_splits=["noise"])


def test_som_and_store_from_different_dimensions_or_layers(digits_run, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(digits_run.root, root)
    run = Run(root)
    # a 24-dim CLS2 map saved as the CL1 map (64-dim codes)
    shutil.copy(run.som_path("CLS2", M, N), run.som_path("CL1", M, N))
    with pytest.raises(AnalysisError, match=r"24-dimensional weights but layer 'CL1'.*64-dimensional"):
        analyze_run(run, layers=["CL1"], write=False)
    # a map for a layer the store does not hold
    shutil.copy(run.som_path("CLS2", M, N), run.som_path("CL3", M, N))
    with pytest.raises(AnalysisError, match=r"layer 'CL3' but the som-tr code store holds layers"):
        analyze_run(run, layers=["CL3"], write=False)
    with pytest.raises(AnalysisError, match=r"no fitted SOM matches"):
        analyze_run(run, sizes=[20], write=False)


def test_bmus_not_matching_store(digits_run, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(digits_run.root, root)
    run = Run(root)
    p = run.bmus_path("som-val", "CL1", M, N)
    np.save(p, np.load(p)[:-3])
    with pytest.raises(AnalysisError, match=r"rows but its code store has"):
        analyze_run(run, layers=["CL1"], write=False)


@pytest.fixture(scope="module")
def run_without_nines(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("no9") / "run", drop_train_class=9)


def test_class_without_train_samples_named(run_without_nines):
    with pytest.raises(AnalysisError, match=r"class 9 has no SOM-tr samples"):
        analyze_run(run_without_nines, classes=range(10), layers=["CL1"], write=False)


def test_val_labels_absent_from_train(run_without_nines):
    with pytest.raises(AnalysisError, match=r"som-val labels \[9\] are absent from SOM-tr"):
        analyze_run(run_without_nines, layers=["CL1"], write=False)


def test_find_soms_filters(digits_run):
    assert [e.layer for e in find_soms(digits_run)] == ["CL1", "CLS2", "CLS12"]
    assert [e.layer for e in find_soms(digits_run, layers=["CLS12"], sizes="8x8")] == ["CLS12"]
    assert len(find_soms(digits_run, sizes=8)) == 3
    assert len(find_soms(digits_run, sizes="5,8x8")) == 3  # the CLI's comma-separated --size
    with pytest.raises(AnalysisError, match="cannot read SOM size"):
        find_soms(digits_run, sizes="big")


def test_shift_run_noise_vs_adversarial_like(digits_run, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(digits_run.root, root)
    run = Run(root)
    va = run.codes_dir("som-val")
    ids = pd.read_json(va / "ids.json")[0].tolist()
    labels = np.load(va / "labels.npy")
    preds = np.load(va / "preds.npy")
    X, _ = load_digits(return_X_y=True)
    rows = np.array([int(i.split("-")[1]) for i in ids])
    Xv = (X[rows] / 16).astype(np.float32)
    rng = np.random.default_rng(0)
    sub = rng.permutation(len(ids))[:300]  # a subset, shuffled: aligned by id
    noisy = Xv[sub] + rng.uniform(0, 0.02, Xv[sub].shape).astype(np.float32)
    other = Xv[(sub + 7) % len(ids)]  # a different digit's code: a big move
    for split, x in (("noise", noisy), ("adv-pgd", other)):
        write_store(run, split, layer_codes(x), labels[sub], preds[sub], [ids[i] for i in sub])
    # BMUs only for the noise split on disk; adv-pgd's are computed from the SOM in memory
    for layer in LAYERS:
        som = SOM.load(run.som_path(layer, M, N))
        p = run.bmus_path("noise", layer, M, N)
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, som.bmus(layer_codes(noisy)[layer], k=10)[0])
    out = shift_run(run)
    s, summ = out["shifts"], out["shift_summary"]
    assert list(s.columns) == TABLE_COLUMNS["shifts"] and list(summ.columns) == TABLE_COLUMNS["shift_summary"]
    assert len(s) == len(LAYERS) * 2 * 300 * 10
    g = Grid(M, N)
    clean = np.load(run.bmus_path("som-val", "CL1", M, N))[sub]
    noise_b = np.load(run.bmus_path("noise", "CL1", M, N))
    got = s[(s["layer"] == "CL1") & (s["perturbation"] == "noise")]
    assert np.allclose(got["distance"], bmu_shifts(clean, noise_b, g).ravel())
    assert got["sample_id"].iloc[0] == ids[sub[0]]
    med = summ.set_index(["layer", "perturbation"])["median"]
    for layer in LAYERS:
        assert med[(layer, "noise")] < med[(layer, "adv-pgd")]
    assert pd.read_csv(run.table("shift_summary"))["n"].eq(300).all()


def test_shift_ids_mismatch_names_first(digits_run, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(digits_run.root, root)
    run = Run(root)
    x = layer_codes(np.ones((2, 64), np.float32))
    write_store(run, "noise", x, np.array([0, 1]), np.array([0, 1]), ["digits-1", "elsewhere-5"])
    with pytest.raises(AnalysisError, match=r"perturbed sample 1 has id 'elsewhere-5'"):
        shift_run(run, perturbed_splits=["noise"])

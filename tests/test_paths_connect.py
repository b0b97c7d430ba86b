"""Pairs and ``somprobe connect`` on real data (sklearn digits, a tiny trained timm ResNet).

Pairs: same class, both ends correct, disjoint, prefix-stable, counts of what was skipped; the
job's files and Table 1; resume; each bad input ends with exit status 1 and a message naming
the fix.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from somprobe.cli import main
from somprobe.errors import PathError
from somprobe.paths import adversarial_pairs, pairs_from_table, same_class_pairs
from somprobe.paths.job import PATHS_COLUMNS, TABLE1_COLUMNS, connectivity_table
from somprobe.run import Run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------- pairs (pure)
def _labels(seed=1, n=40):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    preds = labels.copy()
    preds[:6] = (preds[:6] + 1) % 3
    return labels, preds


def test_same_class_pairs_are_correct_disjoint_and_prefix_stable():
    labels, preds = _labels()
    df, counts = same_class_pairs(labels, preds, seed=0)
    assert counts["misclassified"] == 6 and counts["samples"] == 40
    a, b = df["a"].to_numpy(), df["b"].to_numpy()
    assert (labels[a] == labels[b]).all() and (labels[a] == df["class"]).all()
    assert (preds[a] == labels[a]).all() and (preds[b] == labels[b]).all()
    assert len(set(a) | set(b)) == 2 * len(df)
    # Every correct sample is used but at most one per class: floor(n_c / 2) pairs per class.
    correct = labels[preds == labels]
    assert counts["available"] == len(df) == sum(np.bincount(correct) // 2)
    few, _ = same_class_pairs(labels, preds, n_pairs=4, seed=0)
    assert few.equals(df.iloc[:4])
    other, _ = same_class_pairs(labels, preds, seed=1)
    assert not other.equals(df)


def test_too_many_pairs_says_how_many_exist():
    labels, preds = _labels()
    n = same_class_pairs(labels, preds)[1]["available"]
    with pytest.raises(PathError, match=f"only {n} same-class pairs.*6 misclassified.*--pairs {n}"):
        same_class_pairs(labels, preds, n_pairs=n + 1)


def test_adversarial_pairs_join_clean_c_with_perturbed_predicted_c():
    labels, preds = _labels()
    adv_labels = np.array([0, 1, 2, 0, 1, 2, 0])
    adv_preds = np.array([0, 2, 0, 1, 1, 1, 2])  # positions 0 and 4: the attack failed
    df, counts = adversarial_pairs(labels, preds, adv_labels, adv_preds, seed=0)
    assert counts["unsuccessful"] == int((adv_preds == adv_labels).sum()) == 2
    b = df["b"].to_numpy()
    assert (adv_preds[b] == df["class"]).all() and (adv_preds[b] != adv_labels[b]).all()
    assert (labels[df["a"]] == df["class"]).all() and (preds[df["a"]] == df["class"]).all()
    assert len(df) == counts["available"] == 5
    with pytest.raises(PathError, match="no usable perturbed image"):
        adversarial_pairs(labels, preds, adv_labels, adv_labels)


def test_pairs_from_table_skips_and_counts_bad_pairs():
    labels, preds = _labels()
    ids = [f"s{i}" for i in range(40)]
    same = [i for i in range(6, 40) if labels[i] == labels[6]]
    diff = next(i for i in range(6, 40) if labels[i] != labels[6])
    mis = 0  # misclassified (see _labels)
    mis_partner = next(i for i in range(6, 40) if labels[i] == labels[mis])
    table = pd.DataFrame({"id_a": [ids[same[0]], ids[6], ids[mis]],
                          "id_b": [ids[same[1]], ids[diff], ids[mis_partner]]})
    df, counts = pairs_from_table(table, ids, labels, preds)
    assert df["status"].tolist() == ["ok", "ends of different classes", "an end is misclassified"]
    assert counts == {"given": 3, "different_class": 1, "misclassified": 1, "available": 1}
    with pytest.raises(PathError, match="not in the split"):
        pairs_from_table(pd.DataFrame({"id_a": ["zz"], "id_b": ["s1"]}), ids, labels, preds)


def test_table1_counts():
    paths = pd.DataFrame({
        "pair": ["p", "q", "r"] * 2, "space": "input", "method": ["linear"] * 3 + ["neb"] * 3,
        "linear_ok": [True, False, False] * 2, "path_ok": [True, False, False, True, True, False],
        "failed": [False] * 5 + [True],
    })
    t = connectivity_table(paths)
    assert list(t.columns) == TABLE1_COLUMNS
    assert t.iloc[0][["pairs", "linear", "nonlinear_only", "no_path", "failed"]].tolist() == [3, 1, 1, 1, 1]
    only_linear = connectivity_table(paths[paths["method"] == "linear"])
    assert pd.isna(only_linear.loc[0, "nonlinear_only"])


# ----------------------------------------------------------------------------- the run job
def _ok(runner, args):
    res = runner.invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def _fails(runner, args, *words):
    res = runner.invoke(main, args)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    for w in words:
        assert w in res.output, res.output
    return res


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    runner = CliRunner()
    out = str(tmp_path_factory.mktemp("connect") / "run")
    _ok(runner, ["train", "--out", out, "--quiet", "--device", "cpu", "--model", "test_resnet",
                 "--data", "digits", "--epochs", "2", "--image-size", "16"])
    base = ["connect", "--out", out, "--quiet", "--device", "cpu"]
    res = _ok(runner, [*base, "--space", "input,CL2", "--pairs", "4", "--steps", "15", "--points", "20"])
    return Run(out), runner, base, res.output


def test_connect_writes_tables_points_and_table1(trained):
    run, _runner, _base, output = trained
    d = run.paths_dir("default")
    pairs = pd.read_csv(d / "pairs.csv", dtype={"id_a": str, "id_b": str})
    assert len(pairs) == 4 and pairs["pair"].is_unique
    paths = pd.read_csv(d / "paths.csv")
    assert list(paths.columns[:len(PATHS_COLUMNS)]) == PATHS_COLUMNS
    assert len(paths) == 4 * 2 * 2 and set(paths["method"]) == {"linear", "neb"}
    lin = paths[paths["method"] == "linear"].set_index(["space", "pair"])["path_ok"]
    neb = paths[paths["method"] == "neb"].set_index(["space", "pair"])
    assert (neb["linear_ok"] == lin.reindex(neb.index)).all()
    assert (neb["length_ratio"] >= 1 - 1e-6).all() and (neb["iterations"] <= 15).all()
    t1 = pd.read_csv(d / "table1.csv")
    assert t1["space"].tolist() == ["input", "CL2"]
    assert (t1["linear"] + t1["nonlinear_only"] + t1["no_path"] == t1["pairs"]).all()
    with np.load(d / "points" / "input__neb.npz") as z:
        assert z["anchors"].shape == (4, 12, 3, 16, 16) and list(z["pair"]) == pairs["pair"].tolist()
        assert z["anchors"].min() >= 0 and z["anchors"].max() <= 1
    with np.load(d / "points" / "CL2__linear.npz") as z:
        assert z["anchors"].shape[:2] == (4, 2)
    prof = pd.read_csv(d / "profiles.csv")
    assert {"pair", "space", "method", "t", "pred", "p_target", "loss", "p_0", "p_9"} <= set(prof.columns)
    assert np.allclose(prof.filter(like="p_").drop(columns="p_target").sum(1), 1, atol=1e-4)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["pairs"] == 4 and summary["counts"]["pool"] > 0
    assert "Table 1" in output


def test_connect_resume_keeps_what_is_done(trained):
    run, runner, base, _ = trained
    d = run.paths_dir("default")
    before = (d / "points" / "input__neb.npz").stat().st_mtime_ns
    _ok(runner, [*base, "--space", "input,CL2,CL4", "--pairs", "4", "--steps", "15", "--points", "20",
                 "--method", "linear", "--resume"])
    assert (d / "points" / "input__neb.npz").stat().st_mtime_ns == before
    paths = pd.read_csv(d / "paths.csv")
    assert set(paths["space"]) == {"input", "CL2", "CL4"} and len(paths) == 4 * 2 * 2 + 4
    _fails(runner, [*base, "--pairs", "3", "--resume"], "differ")
    _fails(runner, [*base, "--pairs", "3"], "already exists", "--resume")


def test_connect_bad_inputs(trained, tmp_path):
    run, runner, base, _ = trained
    _fails(runner, [*base, "--name", "bad", "--space", "input,CL9"], "CL9", "CL1")
    res = _fails(runner, [*base, "--name", "bad", "--pairs", "100000"], "only ", "exist", "--pairs ")
    import re

    n = int(re.search(r"only (\d+) same-class pairs", res.output).group(1))
    assert f"--pairs {n} or fewer" in res.output and 0 < n < 359 // 2
    _fails(runner, [*base, "--name", "bad", "--pair-source", "adversarial:nope"],
           "no perturbed images", "somprobe attack")
    _fails(runner, [*base, "--name", "bad", "--method", "teleport"], "unknown method", "neb")
    _fails(runner, [*base, "--name", "bad", "--pivots", "0"], "pivots", ">= 1")
    _fails(runner, [*base, "--name", "bad", "--spring", "-1"], "--spring")
    assert not run.paths_dir("bad").exists()  # nothing half-written
    _fails(runner, [*base, "--name", "bad", "--pair-source", str(tmp_path / "none.csv")], "CSV")


def test_connect_pairs_from_a_file_skips_bad_ones(trained, tmp_path):
    run, runner, base, _ = trained
    good = pd.read_csv(run.paths_dir("default") / "pairs.csv", dtype={"id_a": str, "id_b": str})
    from somprobe.data import load_dataset

    ds = load_dataset("digits", split="test")
    label = dict(zip(ds.ids, ds.labels))
    other = next(i for i in ds.ids if label[i] != good["class"][0])
    table = pd.DataFrame({"id_a": [good["id_a"][0], good["id_a"][1]], "id_b": [good["id_b"][0], other]})
    f = tmp_path / "pairs.csv"
    table.to_csv(f, index=False)
    _ok(runner, [*base, "--name", "file", "--pair-source", str(f), "--method", "linear", "--pairs", "1"])
    summary = json.loads((run.paths_dir("file") / "summary.json").read_text())
    assert summary["pairs"] == 1 and summary["counts"]["different_class"] == 1
    bad = tmp_path / "bad.csv"
    table.iloc[1:].to_csv(bad, index=False)
    _fails(runner, [*base, "--name", "file2", "--pair-source", str(bad)], "different classes")


def test_connect_natural_adversarial_pairs(trained):
    run, runner, base, _ = trained
    from somprobe.attacks.job import attack_run
    from somprobe.classifier import load_trained
    from somprobe.data import load_dataset

    model = load_trained(run)
    ds = load_dataset("digits", split="test", image_size=16)
    attack_run(run, model=model, dataset=ds, indices=np.arange(40), name="adv", eps=0.3, steps=5,
               extract=False)
    _ok(runner, [*base, "--name", "adv", "--pair-source", "adversarial:adv", "--pairs", "3",
                 "--method", "linear", "--space", "input,CL3"])
    d = run.paths_dir("adv")
    pairs = pd.read_csv(d / "pairs.csv", dtype={"id_a": str, "id_b": str})
    assert pairs["id_b"].str.startswith("adv:").all() and (pairs["source"] == "adversarial:adv").all()
    adv_ids = json.loads((run.attack_dir("adv") / "ids.json").read_text())
    preds = np.load(run.attack_dir("adv") / "preds.npy")
    pred_of = dict(zip(adv_ids, preds))
    assert all(pred_of[b.split(":", 1)[1]] == c for b, c in zip(pairs["id_b"], pairs["class"]))
    assert len(pd.read_csv(d / "paths.csv")) == 3 * 2


# ----------------------------------------------------------------------------- figures and report
def test_connect_figures_and_report_section(trained):
    import matplotlib

    matplotlib.use("Agg")
    from somprobe.plots import paths as path_plots
    from somprobe.report import write_report

    run, *_ = trained
    jobs = dict(path_plots.figure_jobs(run))
    assert {"paths-default-table1", "paths-default-loss", "paths-default-softmax-input",
            "paths-default-softmax-CL2"} <= set(jobs)
    for name, make in jobs.items():
        fig = make()
        assert fig.axes, name
    # Pixel images along the first paths are saved for the input space; CL2 has no decoder.
    imgs = path_plots.read_images(run.paths_dir("default"))
    assert imgs[("input", "neb")]["images"].shape[:2] == (4, 8)
    summary = json.loads((run.paths_dir("default") / "summary.json").read_text())
    assert "somprobe decoder" in summary["images"]["CL2/neb"]
    html = write_report(run).read_text()
    assert "Connectivity: linear and NEB paths" in html and "paths/default/table1" in html


def test_softmax_figure_picks_a_pair_the_line_misses():
    import matplotlib

    matplotlib.use("Agg")
    from somprobe.plots.paths import pick_pair, plot_path_softmax

    rows = []
    for pair, line_pred in (("p~q", [0, 0, 0]), ("r~s", [0, 1, 0])):
        for method, preds in (("linear", line_pred), ("neb", [0, 0, 0])):
            for t, pred in zip((0.0, 0.5, 1.0), preds):
                rows.append({"pair": pair, "space": "CL1", "method": method, "class": 0, "t": t,
                             "pred": pred, "p_target": 0.9 if pred == 0 else 0.2, "loss": 0.1,
                             "p_0": 0.9 if pred == 0 else 0.2, "p_1": 0.1 if pred == 0 else 0.8})
    prof = pd.DataFrame(rows)
    assert pick_pair(prof, "CL1") == "r~s"
    fig = plot_path_softmax(prof, space="CL1", n_show=3)
    assert len(fig.axes) == 2 * 3
    with pytest.raises(Exception, match="connect --space CL9"):
        plot_path_softmax(prof, space="CL9")

"""The detection benchmark on real sklearn digits with a tiny trained model (short)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from somprobe.classifier import load_trained, train_classifier
from somprobe.cli import main
from somprobe.data import som_splits
from somprobe.detect.job import SCORES_COLUMNS, detect_run
from somprobe.errors import DetectError
from somprobe.extract import extract
from somprobe.run import Run
from somprobe.som.job import fit_run

FAST = dict(n=60, seeds=(0, 1), device="cpu", batch_size=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """test_resnet trained 3 epochs on real digits (16 px), with SOM-tr/-val codes and 5×5 SOMs."""
    root = tmp_path_factory.mktemp("detect") / "run"
    run = Run(root)
    train_classifier("test_resnet", "digits", out=run, epochs=3, image_size=16, device="cpu",
                     seed=0)
    net = load_trained(run)
    for split, (ds, idx) in som_splits("digits", per_class=6, seed=0, image_size=16).items():
        extract(net, ds, idx, layers="all", out=run, split=split, device="cpu")
    fit_run(run, sizes=(5,), epochs=1, device="cpu")
    return run


def _copy_model(trained, tmp_path):
    run = Run(tmp_path / "copy")
    shutil.copytree(trained.model_dir, run.model_dir)
    return run


def test_benchmark_tables_metrics_and_cache(trained):
    res = detect_run(trained, attacks="fgsm,pgd",
                     detectors="loss_curve,som_distance,input_mfs,mahalanobis,max_softmax", **FAST)
    scores = pd.read_csv(trained.detect_dir / "scores.csv")
    assert list(scores.columns) == SCORES_COLUMNS
    assert len(scores) == 2 * 5 * 2
    att = pd.read_csv(trained.detect_dir / "attacks.csv").set_index("attack")
    samples = json.loads((trained.detect_dir / "samples.json").read_text())
    assert att.loc["pgd", "n_correct"] == samples["n_correct"] == sum(samples["correct"])
    # every pair is on one side: train + test = all successful pairs, twice (clean + adversarial)
    for a, g in scores.groupby("attack"):
        assert ((g["n_train"] + g["n_test"]) == 2 * att.loc[a, "n_success"]).all()
    # only successful attacks on correctly classified images are kept
    preds = np.load(trained.attack_dir("detect-pgd") / "preds.npy")
    labels = np.load(trained.attack_dir("detect-pgd") / "labels.npy")
    assert att.loc["pgd", "n_success"] == int((preds != labels).sum())
    assert (np.load(trained.attack_dir("detect-pgd") / "clean_preds.npy") == labels).all()
    ok = scores.dropna(subset=["auc"])
    assert ok[["auc", "accuracy", "tpr_at_5fpr"]].apply(lambda c: c.between(0, 1)).all().all()
    assert scores["label_recovery"].isna().all()   # none of these detectors recovers labels
    summ = res["summary"].set_index(["attack", "detector"])
    # the Linf perturbation shows in the spectrum (study 000's baseline; Harder et al.)
    assert summ.loc[("pgd", "input_mfs"), "auc_mean"] > 0.8
    assert summ.loc[("pgd", "loss_curve"), "auc_mean"] > 0.6

    # resume: same numbers from the cached characteristics, which stay untouched
    feats = trained.detect_dir / "features" / "loss_curve" / "pgd.npz"
    mtime = feats.stat().st_mtime_ns
    again = detect_run(trained, attacks="fgsm,pgd",
                       detectors="loss_curve,som_distance,input_mfs,mahalanobis,max_softmax",
                       resume=True, **FAST)
    assert feats.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(again["scores"], res["scores"])


def test_zero_successes_table_says_so(trained, tmp_path):
    run = _copy_model(trained, tmp_path)
    res = detect_run(run, attacks="fgsm", detectors="input_mfs,max_softmax",
                     attack_options={"fgsm": {"eps": 1e-6}}, **FAST)
    att = res["attacks"].iloc[0]
    assert att["n_success"] == 0 and att["success_rate"] == 0
    s = res["scores"]
    assert len(s) == 2 * 2 and (s["n_train"] == 0).all() and (s["n_test"] == 0).all()
    assert s[["auc", "accuracy", "tpr_at_5fpr"]].isna().all().all()
    assert res["summary"]["n_pairs"].eq(0).all() and res["summary"]["auc_mean"].isna().all()
    out = CliRunner().invoke(main, ["detect", "--out", str(run.root), "--attacks", "fgsm",
                                    "--detectors", "input_mfs", "--eps", "1e-6", "--samples", "30",
                                    "--seeds", "0", "--device", "cpu", "--quiet"])
    assert out.exit_code == 0, out.output
    assert "n=0" in out.output


def test_som_less_run_and_bad_names(trained, tmp_path):
    run = _copy_model(trained, tmp_path)
    with pytest.raises(DetectError, match="somprobe fit"):
        detect_run(run, attacks="fgsm", detectors="som_distance", **FAST)
    out = CliRunner().invoke(main, ["detect", "--out", str(run.root), "--attacks", "fgsm",
                                    "--detectors", "som_distance", "--device", "cpu", "--quiet"])
    assert out.exit_code == 1 and "somprobe fit" in out.output and "Traceback" not in out.output
    with pytest.raises(DetectError, match="unknown detectors"):
        detect_run(run, attacks="fgsm", detectors="nope", **FAST)
    with pytest.raises(DetectError, match="somprobe train"):
        detect_run(tmp_path / "empty", attacks="fgsm", detectors="input_mfs", **FAST)


def test_curvature_in_the_benchmark_recovers_labels(trained, tmp_path):
    run = _copy_model(trained, tmp_path)
    res = detect_run(run, attacks="pgd", detectors="curvature,max_softmax", n=30, seeds=(0,),
                     detector_options={"curvature": {"n_directions": 2}}, device="cpu")
    s = res["scores"].set_index("detector")
    assert 0.0 <= s.loc["curvature", "label_recovery"] <= 1.0
    assert np.isnan(s.loc["max_softmax", "label_recovery"])
    f = np.load(run.detect_dir / "features" / "curvature" / "clean.npz")["features"]
    assert f.shape[1] == 10 and (np.isnan(f).sum(1) == 1).all()   # NaN at the predicted class


def test_figures_and_report_section(trained):
    from somprobe.plots import SECTIONS, detect as detect_plots, plot_run
    from somprobe.report import render_report

    if not (trained.detect_dir / "scores.csv").is_file():
        detect_run(trained, attacks="fgsm", detectors="input_mfs,max_softmax", **FAST)
    assert detect_plots in SECTIONS
    written = {p.stem for p in plot_run(trained)}
    assert {"detect-roc", "detect-auc"} <= written
    html = render_report(trained)
    assert "Adversarial detection" in html and "detect/summary" in html
    # a run without the benchmark says which command makes it
    assert "somprobe detect" in render_report(_copy_model(trained, trained.root.parent / "r2"))

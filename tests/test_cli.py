"""The ``somprobe`` command end to end on real data (sklearn digits) with a tiny timm model.

Each command must leave the files its library call documents, and each bad input must end with
exit status 1 and a one-line message that names the problem and the fix (no traceback).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from somprobe.cli import main
from somprobe.run import Run
from somprobe.som.grid import Grid
from somprobe.store import open_store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ok(runner, args):
    res = runner.invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def _fails(runner, args, *words):
    res = runner.invoke(main, args)
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    for w in words:
        assert w in res.output, res.output
    return res


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """train → extract → fit → attack (pgd, noise) → analyze → shift → report on digits."""
    runner = CliRunner()
    out = str(tmp_path_factory.mktemp("cli") / "run")
    base = ["--out", out, "--quiet", "--device", "cpu"]
    _ok(runner, ["train", *base, "--model", "test_resnet", "--data", "digits", "--epochs", "1",
                 "--image-size", "16"])
    _ok(runner, ["extract", *base, "--data", "digits", "--per-class", "6", "--layers", "CL1-CL4"])
    _ok(runner, ["fit", *base, "--size", "4,3x5", "--epochs", "2"])
    _ok(runner, ["attack", *base, "--attack", "pgd", "--steps", "3", "--eps", "8/255"])
    _ok(runner, ["attack", *base, "--attack", "noise", "--eps", "8/255"])
    _ok(runner, ["fit", *base, "--size", "4,3x5", "--epochs", "2", "--resume"])
    _ok(runner, ["analyze", "--out", out, "--quiet", "--no-figures"])
    shift = _ok(runner, ["shift", "--out", out, "--quiet", "--no-figures"])
    rep = _ok(runner, ["report", "--out", out, "--quiet"])
    return Run(out), runner, shift.output, rep.output


def test_pipeline_writes_the_run_layout(pipeline):
    run, *_ = pipeline
    assert run.checkpoint.is_file() and run.model_meta.is_file()
    assert run.splits() == ["adv-pgd", "noise", "som-tr", "som-val"]
    tr = open_store(run.codes_dir("som-tr"), validate=True)
    assert tr.n_rows == 60 and np.bincount(tr.labels).tolist() == [6] * 10
    for layer in ("CL1", "CL2", "CL3", "CL4"):
        for m, n in ((4, 4), (3, 5)):
            assert run.som_path(layer, m, n).is_file()
            bmus = np.load(run.bmus_path("adv-pgd", layer, m, n))
            assert bmus.shape == (60, 10) and bmus.max() < m * n
    curves = pd.read_csv(run.curves_csv)
    assert set(curves["size"]) == {"4x4", "3x5"} and set(curves["layer"]) == {"CL1", "CL2", "CL3", "CL4"}
    assert run.report.is_file() and "data:image/png;base64" in run.report.read_text()
    log = run.commands_log.read_text().splitlines()
    assert [line.split()[2] for line in log] == [
        "train", "extract", "fit", "attack", "attack", "fit", "analyze", "shift", "report"]


def test_attack_keeps_ids_and_budget(pipeline):
    run, *_ = pipeline
    clean = open_store(run.codes_dir("som-val"))
    for name in ("adv-pgd", "noise"):
        pert = open_store(run.codes_dir(name))
        assert pert.ids == clean.ids and pert.dims == clean.dims
        summary = json.loads((run.attack_dir(name) / "summary.json").read_text())
        assert summary["n"] == clean.n_rows
    imgs = np.load(run.attack_dir("noise") / "images.npy")
    assert imgs.dtype == np.float32 and imgs.min() >= 0 and imgs.max() <= 1


def test_shift_table_is_the_torus_distance_between_bmu_files(pipeline):
    run, _, output, _ = pipeline
    assert "shift_summary" in output
    shifts = pd.read_csv(run.table("shifts"))
    sel = shifts[(shifts.layer == "CL2") & (shifts["size"] == "3x5") & (shifts.perturbation == "noise")]
    clean = np.load(run.bmus_path("som-val", "CL2", 3, 5))
    pert = np.load(run.bmus_path("noise", "CL2", 3, 5))
    # brute force over the 9 copies of a 3x5 grid
    rc = lambda u: np.stack([u // 5, u % 5], -1).astype(float)  # noqa: E731
    d = rc(pert)[..., None, :] - rc(clean)[..., None, :] + np.array(
        [[3 * i, 5 * j] for i in (-1, 0, 1) for j in (-1, 0, 1)], float)
    want = np.sqrt((d ** 2).sum(-1)).min(-1)
    got = sel.sort_values(["sample_id", "rank"])
    ids = open_store(run.codes_dir("som-val")).ids
    order = {s: i for i, s in enumerate(ids)}
    got = got.assign(row=got.sample_id.astype(str).map(order)).sort_values(["row", "rank"])
    np.testing.assert_allclose(got.distance.to_numpy(), want[:, : got["rank"].nunique()].ravel(), atol=1e-9)
    assert Grid(3, 5).max_distance >= shifts.distance.max()


def test_analyze_tables_cover_layers_and_splits(pipeline):
    run, *_ = pipeline
    dclass = pd.read_csv(run.table("dclass"))
    assert {"som-tr", "som-val"} <= set(dclass.split)
    assert set(dclass.layer) == {"CL1", "CL2", "CL3", "CL4"}
    assert (dclass.d_class >= 0).all() and (dclass.d_class <= Grid(4, 4).max_distance).all()


def test_existing_store_refused_without_overwrite(pipeline):
    run, runner, *_ = pipeline
    _fails(runner, ["extract", "--out", str(run.root), "--quiet", "--data", "digits", "--per-class", "6"],
           "--overwrite")


def test_unknown_model_lists_close_names(tmp_path):
    _fails(CliRunner(), ["extract", "--out", str(tmp_path / "r"), "--model", "resnt18", "--quiet"],
           "resnet18")


def test_unknown_layer_lists_valid_ones(tmp_path):
    _fails(CliRunner(), ["extract", "--out", str(tmp_path / "r"), "--model", "test_resnet", "--data", "digits",
                         "--per-class", "2", "--layers", "CL9", "--quiet"], "CL1")


def test_per_class_larger_than_a_class_names_it(tmp_path):
    _fails(CliRunner(), ["extract", "--out", str(tmp_path / "r"), "--model", "test_resnet", "--data", "digits",
                         "--per-class", "500", "--quiet"], "500")


def test_fit_before_extract_says_what_to_run(tmp_path):
    _fails(CliRunner(), ["fit", "--out", str(tmp_path / "r"), "--quiet"], "somprobe extract")


def test_analyze_before_fit_says_what_to_run(tmp_path):
    _fails(CliRunner(), ["analyze", "--out", str(tmp_path / "r"), "--quiet"], "somprobe")


def test_bad_size_and_eps_are_usage_errors(pipeline):
    run, runner, *_ = pipeline
    _fails(runner, ["fit", "--out", str(run.root), "--size", "1", "--quiet"], "2x2")
    _fails(runner, ["attack", "--out", str(run.root), "--eps", "four", "--quiet"], "--eps")
    _fails(runner, ["attack", "--out", str(run.root), "--eps", "-0.1", "--name", "neg", "--quiet"], "eps")


def test_demo_runs_end_to_end_on_small_settings(tmp_path):
    out = tmp_path / "demo"
    res = _ok(CliRunner(), ["demo", "--out", str(out), "--quiet", "--device", "cpu", "--model", "test_resnet",
                            "--data", "digits", "--per-class", "4", "--size", "4", "--train-epochs", "1"])
    assert "report" in res.output and (out / "report.html").is_file()
    assert Run(out).splits() == ["adv-pgd", "noise", "som-tr", "som-val"]
    assert (out / "analysis" / "shift_summary.csv").is_file()

"""``somprobe connect --method barrier,regions`` (every pair source), ``somprobe convexity``, the
figures and the report section, end to end on real digits with a tiny trained test_resnet."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from somprobe.cli import main


def _ok(runner, args):
    res = runner.invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from somprobe.attacks.job import attack_run
    from somprobe.classifier import load_trained
    from somprobe.data import load_dataset

    runner = CliRunner()
    out = str(tmp_path_factory.mktemp("bypass") / "run")
    _ok(runner, ["train", "--out", out, "--quiet", "--device", "cpu", "--model", "test_resnet",
                 "--data", "digits", "--epochs", "1", "--image-size", "16"])
    net = load_trained(out)
    ds = load_dataset("digits", split="test", image_size=16)
    attack_run(out, model=net, dataset=ds, indices=np.arange(120), name="adv-pgd", attack="pgd",
               eps=16 / 255, steps=10, extract=False, device="cpu")
    return out


FAST = ["--iters", "20", "--barrier-lr", "0.05", "--max-depth", "2", "--end-tol", "1.0", "--spacing", "0.02",
        "--region-depth", "4", "--points", "20", "--quiet", "--device", "cpu"]


def test_connect_barrier_and_regions_tables(run):
    runner = CliRunner()
    _ok(runner, ["connect", "--out", run, "--name", "nat", "--pairs", "4",
                 "--method", "linear,barrier,regions", *FAST])
    d = f"{run}/paths/nat"
    paths = pd.read_csv(f"{d}/paths.csv")
    assert set(paths["method"]) == {"linear", "barrier", "regions"}
    bar = paths[paths["method"] == "barrier"]
    reg = paths[paths["method"] == "regions"]
    assert len(bar) == len(reg) == 4
    # Extras of each method are present and consistent.
    done = ~bar["failed"].astype(bool)
    assert done.any()
    assert bar.loc[done, ["barrier_gap", "rounds", "segments", "success"]].notna().all().all()
    # A skipped pair (ends still above --end-tol after optimising) says so, with its loss.
    assert bar.loc[~done, "reason"].str.contains("end loss").all()
    assert (bar["rounds"] <= 2).all() and (bar["segments"] >= 1).all()
    assert reg[["anchors", "depth", "success"]].notna().all().all()
    assert (reg.loc[reg["success"].astype(bool), "anchors"] >= 3).all()
    # A region path that succeeded passes the job's own dense re-check too.
    ok = reg["success"].astype(bool) & ~reg["failed"].astype(bool)
    assert reg.loc[ok, "path_ok"].astype(bool).all()
    pts = np.load(f"{d}/points/input__barrier.npz")
    assert pts["anchors"].shape[0] == 4 and (pts["n_anchors"] == bar["segments"].to_numpy() + 1).all()
    prof = pd.read_csv(f"{d}/profiles.csv")
    assert {"linear", "barrier", "regions"} <= set(prof["method"])


def test_connect_adversarial_and_noise_sources(run):
    runner = CliRunner()
    _ok(runner, ["connect", "--out", run, "--name", "adv", "--pairs", "3", "--pair-source",
                 "adversarial:adv-pgd", "--method", "barrier,regions", *FAST])
    _ok(runner, ["connect", "--out", run, "--name", "noiseadv", "--pairs", "3", "--pair-source",
                 "noise-adversarial", "--method", "regions", *FAST])
    _ok(runner, ["connect", "--out", run, "--name", "noiseopt", "--pairs", "3", "--pair-source",
                 "noise-optimal", "--method", "barrier", "--ends", "keep", *FAST])
    adv = pd.read_csv(f"{run}/paths/adv/pairs.csv")
    assert (adv["source"] == "adversarial:adv-pgd").all() and adv["id_b"].str.startswith("adv-pgd:").all()
    na = pd.read_csv(f"{run}/paths/noiseadv/pairs.csv")
    assert na["id_b"].str.startswith("noise-adv:").all()
    no = pd.read_csv(f"{run}/paths/noiseopt/pairs.csv")
    assert list(no["class"]) == [0, 1, 2]
    summary = json.loads(open(f"{run}/paths/noiseopt/summary.json").read())
    assert summary["counts"]["made"] == 6


def test_convexity_command(run):
    runner = CliRunner()
    out = _ok(runner, ["convexity", "--out", run, "--k", "2,3,6", "--trials", "15", "--per-class", "6",
                       "--quiet", "--device", "cpu"])
    assert "k=6" in out
    s = pd.read_csv(f"{run}/paths/convexity/convexity_summary.csv")
    assert list(s["k"]) == [2, 3, 6] and (s["n"] == 15).all()
    assert ((s["share_in_class"] >= 0) & (s["share_in_class"] <= 1)).all()
    t = pd.read_csv(f"{run}/paths/convexity/convexity.csv")
    assert len(t) == 45 and (t["in_class"] == (t["pred"] == t["class"])).all()
    # A second run refuses to overwrite silently.
    res = runner.invoke(main, ["convexity", "--out", run, "--quiet", "--device", "cpu"])
    assert res.exit_code == 1 and "--overwrite" in res.output


def test_figures_and_report_section(run):
    from somprobe.plots import plot_run
    from somprobe.report import write_report

    names = {p.stem for p in plot_run(run)}
    assert {"barrier-gaps", "barrier-rounds", "region-paths", "convexity", "barrier-profiles-nat"} <= names
    html = open(write_report(run)).read()
    assert "Barriers, region paths and convexity" in html and "convexity_summary" in html


@pytest.mark.parametrize("args,needle", [
    (["--delta", "0"], "delta"), (["--iters", "-3"], "iters"), (["--lambda-l2", "-1"], "lambda_l2"),
    (["--spacing", "0"], "spacing"), (["--pair-source", "noise-everything"], "noise-everything"),
])
def test_bad_input_exits_1_with_the_fix(run, args, needle):
    from pathlib import Path

    res = CliRunner().invoke(main, ["connect", "--out", run, "--name", "bad", "--pairs", "2",
                                    "--method", "barrier,regions", "--quiet", "--device", "cpu", *args])
    assert res.exit_code == 1 and needle in res.output and "Traceback" not in res.output
    # Options are checked before any work: nothing half-written is left behind.
    assert not (Path(run) / "paths" / "bad").exists()


def test_demo_stage_writes_both_settings(run):
    from somprobe.classifier import load_trained
    from somprobe.data import load_dataset
    from somprobe.pipeline import DEMO_BARRIERS, _barrier_stage

    said = []
    net = load_trained(run)
    ds = load_dataset("digits", split="test", image_size=16)
    out = _barrier_stage(run, net=net, dataset=ds, indices=np.arange(120), seed=0, device="cpu",
                         progress=False, say=said.append)
    assert set(out) == {"barrier-nat", "barrier-adv"} and said
    for name in out:
        paths = pd.read_csv(f"{run}/paths/{name}/paths.csv")
        assert set(paths["method"]) == set(DEMO_BARRIERS["methods"])
        assert len(paths) == 3 * DEMO_BARRIERS["pairs"]

"""``somprobe geometry`` on real digits: tables, figures, report section, bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from somprobe.cli import main
from somprobe.data import load_dataset
from somprobe.errors import GeometryError
from somprobe.geometry.job import geometry_run
from somprobe.models import build_model
from somprobe.run import Run

torch.set_num_threads(1)
SMALL = dict(samples=6, subspace_samples=6, directions=3, k=2, batch_size=3, hsweep=(1e-3, 0.1),
             hsweep_samples=2, device="cpu")


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("digits", split="test", image_size=16)


@pytest.fixture(scope="module")
def job(digits16, tmp_path_factory):
    model = build_model("test_resnet", num_classes=10, image_size=16, seed=0)
    run = Run(tmp_path_factory.mktemp("geo") / "run")
    return run, model, geometry_run(run, model=model, dataset=digits16, **SMALL)


def test_geometry_job_tables(job):
    run, model, summary = job
    g = run.geometry_dir
    curv = pd.read_csv(g / "curvature.csv")
    assert set(curv["point"]) <= {"natural", "boundary", "adversarial"}
    assert (curv["point"] == "natural").sum() == 6
    conv = curv[(curv["point"] == "boundary") & curv["converged"]]
    assert len(conv) == (curv["point"] == "adversarial").sum()
    assert (conv["lam_max"] >= conv["lam_min"]).all()
    assert (conv["top_mean"] <= conv["lam_max"] + 1e-9).all()
    nat = curv[curv["point"] == "natural"]
    assert (nat["recovered"] != nat["clean_pred"]).all()  # Algorithm 2 never recovers k̂ itself
    ev = pd.read_csv(g / "eigenvalues.csv")
    assert len(ev) == len(conv) * 2 * 2
    sub = np.load(g / "subspace.npz")
    d = 3 * 16 * 16
    basis = sub["basis"]
    assert basis.shape == (d, summary["subspace_dim"])
    assert np.allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-4)
    assert summary["subspace_dim"] == min(d // 16, 6 * 2)
    proj = pd.read_csv(g / "projections.csv")
    assert set(proj["kind"]) >= {"random", "gradient", "x2 - x1"}
    assert proj["ratio"].between(0, 1 + 1e-6).all()
    # random vectors in d dims project ≈ sqrt(dim/d) on S
    rnd = proj.loc[proj["kind"] == "random", "ratio"].mean()
    assert abs(rnd - np.sqrt(summary["subspace_dim"] / d)) < 0.08
    t1 = pd.read_csv(g / "table1.csv")
    assert dict(zip(t1["kind"], t1["study_lenet"]))["adversarial"] == 0.64
    noise = pd.read_csv(g / "noise.csv")
    assert set(noise["subspace"]) == {"S", "S_perp"}
    assert (noise.loc[noise["magnitude"] == 0, "misclassification"] == 0).all()
    hs = pd.read_csv(g / "hsweep.csv")
    assert set(hs["method"]) == {"fd", "exact"}
    # a ReLU network: the exact Hessian is zero at almost every point
    assert (hs.loc[hs["method"] == "exact", "curvature"] == 0).all()
    assert json.loads((g / "summary.json").read_text())["samples"] == 6


def test_geometry_job_is_seeded(job, digits16, tmp_path):
    run, model, summary = job
    tiny = {**SMALL, "samples": 3, "subspace_samples": 3, "hsweep": ()}
    a, b = Run(tmp_path / "a"), Run(tmp_path / "b")
    for r in (a, b):
        geometry_run(r, model=model, dataset=digits16, **tiny)
    pd.testing.assert_frame_equal(pd.read_csv(a.geometry_dir / "curvature.csv"),
                                  pd.read_csv(b.geometry_dir / "curvature.csv"), rtol=1e-4)
    assert pd.read_csv(a.geometry_dir / "hsweep.csv").empty


def test_geometry_job_bad_input(digits16, tmp_path):
    model = build_model("test_resnet", num_classes=10, image_size=16, seed=0)
    run = Run(tmp_path / "bad")
    for kw, match in ((dict(h=0.0), "h must be"), (dict(k=1000), "k=1000 is too large"),
                      (dict(samples=10_000), "exceeds"), (dict(method="newton"), "method"),
                      (dict(subspace_dim=500), "subspace_dim"), (dict(magnitudes=[-1]), "magnitudes")):
        with pytest.raises(GeometryError, match=match):
            geometry_run(run, model=model, dataset=digits16, **{**SMALL, **kw})
    assert not (run.geometry_dir / "summary.json").exists()


def test_cli_geometry_figures_and_report(tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "run")
    base = ["--out", out, "--quiet", "--device", "cpu"]
    res = runner.invoke(main, ["train", *base, "--model", "test_resnet", "--data", "digits",
                               "--epochs", "1", "--image-size", "16"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["geometry", *base, "--samples", "4", "--subspace-samples", "4",
                               "--directions", "2", "--k", "2", "--hsweep", "0.01,0.1",
                               "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    run = Run(out)
    for name in ("geometry-curvature", "geometry-noise", "geometry-projections", "geometry-hsweep"):
        assert run.figure(name).is_file()
    res = runner.invoke(main, ["report", "--out", out, "--quiet"])
    assert res.exit_code == 0, res.output
    html = run.report.read_text()
    assert "Decision-boundary geometry" in html and "geometry-noise" in html
    bad = runner.invoke(main, ["geometry", *base, "--h", "-1"])
    assert bad.exit_code == 1 and "h must be" in bad.output and "Traceback" not in bad.output

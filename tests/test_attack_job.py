"""The run-level attack job on real digits: files, accuracies, pairing with the clean store."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from somprobe import attacks as A
from somprobe.attacks.job import attack_run
from somprobe.data import balanced_indices, load_dataset
from somprobe.errors import AttackError, StoreError
from somprobe.extract import extract
from somprobe.models import build_model
from somprobe.run import Run
from somprobe.store import open_store

torch.set_num_threads(1)
EPS = 8 / 255


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run with a clean ``som-val`` store of 30 real sklearn digits (3 per class)."""
    ds = load_dataset("digits", split="test", image_size=16)
    torch.manual_seed(0)
    model = build_model("test_resnet", num_classes=10, image_size=16)
    idx = balanced_indices(ds.labels, 3, seed=0)
    run = Run(tmp_path_factory.mktemp("run"))
    extract(model, ds, idx, layers="all", out=run, split="som-val", batch_size=16, device="cpu")
    return run, model, ds, idx


def _clean(ds, idx):
    return ds.images(idx, 16)


def test_pgd_job_files_summary_table_and_store(setup):
    run, model, ds, idx = setup
    clean_store = open_store(run.codes_dir("som-val"))
    state = torch.get_rng_state()
    s = attack_run(run, model=model, dataset=ds, attack="pgd", eps=EPS, steps=3, seed=0,
                   batch_size=7, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # the job's randomness is local
    d = run.attack_dir("adv-pgd")
    images = np.load(d / "images.npy")
    assert images.dtype == np.float32 and images.shape == (30, 3, 16, 16)
    assert json.loads((d / "ids.json").read_text()) == clean_store.ids
    labels = np.load(d / "labels.npy")
    np.testing.assert_array_equal(labels, clean_store.labels)
    # the clean pixels are the ones the clean store saw: same predictions
    np.testing.assert_array_equal(np.load(d / "clean_preds.npy"), clean_store.preds)
    x = _clean(ds, idx).numpy()
    assert np.abs(images - x).max() <= EPS + 1e-6 and images.min() >= 0 and images.max() <= 1
    preds = np.load(d / "preds.npy")
    with torch.no_grad():
        np.testing.assert_array_equal(preds, model(torch.from_numpy(images)).argmax(1).numpy())
    cp = clean_store.preds
    assert s["clean_acc"] == pytest.approx(np.mean(cp == labels))
    assert s["perturbed_acc"] == pytest.approx(np.mean(preds == labels))
    assert s["success_rate"] == pytest.approx(np.mean(preds != labels))
    ok = cp == labels
    expect = np.mean(preds[ok] != labels[ok]) if ok.any() else None
    assert s["success_rate_correct"] == (pytest.approx(expect) if expect is not None else None)
    assert s["labels"] == "dataset" and s["labels_note"] is None
    assert s["eps"] == EPS and s["steps"] == 3 and s["step_size"] == pytest.approx(EPS * 2 / 100)
    assert json.loads((d / "summary.json").read_text())["n"] == 30
    table = pd.read_csv(run.table("attacks"))
    row = table[table["name"] == "adv-pgd"].iloc[0]
    for col in ("attack", "norm", "eps", "steps", "n", "clean_acc", "perturbed_acc", "success_rate"):
        assert col in table.columns
    assert row["attack"] == "pgd" and row["n"] == 30 and row["perturbed_acc"] == pytest.approx(s["perturbed_acc"])
    # the perturbed code store pairs with the clean one id for id, layer for layer
    adv = open_store(run.codes_dir("adv-pgd"))
    assert adv.ids == clean_store.ids and adv.layers == clean_store.layers
    assert adv.dims == clean_store.dims
    np.testing.assert_array_equal(adv.labels, clean_store.labels)
    np.testing.assert_array_equal(adv.preds, preds)
    assert s["split"] == "adv-pgd" and s["layers"] == clean_store.layers


def test_job_images_equal_direct_pgd_and_advertorch_backend(setup, tmp_path):
    run, model, ds, idx = setup
    s1 = attack_run(run, model=model, dataset=ds, name="pgd-a", eps=EPS, steps=3, seed=5,
                    batch_size=30, device="cpu", extract=False)
    s2 = attack_run(run, model=model, dataset=ds, name="pgd-b", eps=EPS, steps=3, seed=5,
                    batch_size=30, device="cpu", extract=False, backend="advertorch")
    a = np.load(run.attack_dir("pgd-a") / "images.npy")
    b = np.load(run.attack_dir("pgd-b") / "images.npy")
    np.testing.assert_array_equal(a, b)
    x = _clean(ds, idx)
    y = torch.as_tensor(ds.labels[idx])
    with torch.random.fork_rng():
        torch.manual_seed(5)
        direct = A.pgd(model, x, y, eps=EPS, steps=3)
    np.testing.assert_array_equal(a, direct.numpy())
    assert s1["split"] is None and s2["backend"] == "advertorch"
    assert not run.codes_dir("pgd-a").exists()


def test_noise_job_and_overwrite(setup):
    run, model, ds, idx = setup
    s = attack_run(run, model=model, dataset=ds, attack="noise", eps=EPS, seed=1, batch_size=8,
                   device="cpu", extract=False)
    assert s["name"] == "noise" and s["steps"] == 0
    d = np.load(run.attack_dir("noise") / "images.npy") - _clean(ds, idx).numpy()
    assert d.min() >= 0 and d.max() <= EPS + 1e-6 and d.max() > 0.5 * EPS
    with pytest.raises(AttackError, match="already exists.*overwrite"):
        attack_run(run, model=model, dataset=ds, attack="noise", eps=EPS, device="cpu", extract=False)
    s2 = attack_run(run, model=model, dataset=ds, attack="noise", eps=EPS, symmetric=True, seed=1,
                    device="cpu", extract=False, overwrite=True)
    d2 = np.load(run.attack_dir("noise") / "images.npy") - _clean(ds, idx).numpy()
    assert d2.min() < 0 and s2["symmetric"] is True
    table = pd.read_csv(run.table("attacks"))
    assert (table["name"] == "noise").sum() == 1  # re-running replaces the row


def test_missing_labels_use_predictions_and_summary_says_so(setup):
    run, model, ds, idx = setup
    s = attack_run(run, model=model, dataset=ds, name="pgd-pred", eps=EPS, steps=2, labels=None,
                   device="cpu", extract=False)
    d = run.attack_dir("pgd-pred")
    assert s["labels"] == "model predictions" and "predictions" in s["labels_note"]
    assert s["clean_acc"] is None and s["perturbed_acc"] is None
    np.testing.assert_array_equal(np.load(d / "labels.npy"), np.load(d / "clean_preds.npy"))
    assert s["success_rate"] == pytest.approx(s["changed_rate"])


def test_targeted_job(setup):
    run, model, ds, idx = setup
    s = attack_run(run, model=model, dataset=ds, name="pgd-t", eps=0.1, steps=5, step_size=0.02,
                   targeted=True, device="cpu", extract=False)
    d = run.attack_dir("pgd-t")
    t, lab, p = (np.load(d / f) for f in ("targets.npy", "labels.npy", "preds.npy"))
    assert (t != lab).all() and t.min() >= 0 and t.max() < 10
    assert s["success_rate"] == pytest.approx(np.mean(p == t))


def test_bad_input(setup, tmp_path):
    run, model, ds, idx = setup
    with pytest.raises(StoreError, match="somprobe extract"):
        attack_run(Run(tmp_path / "empty"), model=model, dataset=ds, device="cpu")
    other = load_dataset("digits", split="train", image_size=16)
    with pytest.raises(AttackError, match="not in dataset.*pass the dataset the split was extracted from"):
        attack_run(run, model=model, dataset=other, name="x1", device="cpu")
    with pytest.raises(AttackError, match="unknown attack"):
        attack_run(run, model=model, dataset=ds, attack="jsma", device="cpu")
    with pytest.raises(AttackError, match="eps must be > 0"):
        attack_run(run, model=model, dataset=ds, name="x2", eps=0.0, device="cpu", extract=False)
    with pytest.raises(AttackError, match="steps must be"):
        attack_run(run, model=model, dataset=ds, name="x3", steps=0, device="cpu", extract=False)
    with pytest.raises(AttackError, match="batch_size"):
        attack_run(run, model=model, dataset=ds, name="x4", batch_size=0, device="cpu")
    with pytest.raises(AttackError, match="cannot be targeted"):
        attack_run(run, model=model, dataset=ds, attack="noise", targeted=True, device="cpu")
    for name in ("x1", "x2", "x3", "x4"):
        assert not run.attack_dir(name).exists()  # bad input is caught before anything is written


def test_advertorch_missing_job_fails_early_builtin_runs(setup, monkeypatch):
    import sys

    run, model, ds, idx = setup
    monkeypatch.setitem(sys.modules, "advertorch", None)
    monkeypatch.setitem(sys.modules, "advertorch.attacks", None)
    with pytest.raises(AttackError, match="advertorch"):
        attack_run(run, model=model, dataset=ds, name="x5", steps=1, backend="advertorch",
                   device="cpu", extract=False)
    assert not run.attack_dir("x5").exists()
    s = attack_run(run, model=model, dataset=ds, name="x5", steps=1, device="cpu", extract=False)
    assert s["backend"] == "builtin"


def test_failure_mid_run_leaves_no_half_written_files(setup):
    run, model, ds, idx = setup

    class Flaky:
        """The real dataset, failing on its third batch read (e.g. a corrupt file)."""

        def __init__(self, inner):
            self.inner, self.calls = inner, 0
            self.ids, self.labels, self.num_classes = inner.ids, inner.labels, inner.num_classes

        def __len__(self):
            return len(self.inner)

        def images(self, i, size=None):
            self.calls += 1
            if self.calls == 3:
                raise OSError("disk read failed")
            return self.inner.images(i, size)

    with pytest.raises(OSError, match="disk read failed"):
        attack_run(run, model=model, dataset=Flaky(ds), name="x6", steps=1, batch_size=8,
                   device="cpu")
    d = run.attack_dir("x6")
    assert not (d / "images.npy").exists() and not (d / "summary.json").exists()
    assert not any(p.name.endswith(".tmp") for p in d.iterdir())
    assert not run.codes_dir("x6").exists()
    table = run.table("attacks")
    assert not table.exists() or "x6" not in set(pd.read_csv(table)["name"])

"""Training a tiny timm classifier on real digits: files, reload, seeding, resume, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from somprobe import classifier as C
from somprobe.data import load_dataset
from somprobe.errors import ModelError
from somprobe.run import Run

TINY = dict(epochs=1, batch_size=64, max_train=256, max_val=128, device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = Run(tmp_path_factory.mktemp("run"))
    rng_before = torch.random.get_rng_state()
    meta = C.train_classifier("test_resnet", "digits", out=run, seed=3, **TINY)
    return run, meta, rng_before, torch.random.get_rng_state()


def test_train_writes_checkpoint_and_meta(trained):
    run, meta, *_ = trained
    assert run.checkpoint.is_file() and run.model_meta.is_file()
    on_disk = json.loads(run.model_meta.read_text())
    assert on_disk == meta
    assert meta["model"] == "test_resnet" and meta["num_classes"] == 10
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["image_size"] == 32  # 8x8 digits are upsampled to the small-input default
    assert meta["train_size"] == 256 and meta["val_size"] == 128 and meta["epochs_done"] == 1
    assert meta["complete"] and len(meta["val_accuracy"]) == 1 and 0 <= meta["val_accuracy"][0] <= 1
    ds = load_dataset("digits", split="train")
    assert meta["mean"] == pytest.approx(list(ds.mean)) and meta["std"] == pytest.approx(list(ds.std))
    assert not (run.model_dir / "train_state.pt").exists()
    assert not [p for p in run.model_dir.iterdir() if p.name.endswith(".tmp")]


def test_global_rng_untouched(trained):
    *_, before, after = trained
    assert torch.equal(before, after)


def test_reload_gives_identical_logits_and_accuracy(trained):
    run, meta, *_ = trained
    model = C.load_trained(run)
    # Independent rebuild: plain timm model + raw state dict + normalisation from meta.json.
    net = timm.create_model("test_resnet", num_classes=10)
    net.load_state_dict(torch.load(run.checkpoint, weights_only=True))
    net.eval()
    val = load_dataset("digits", split="val")
    x = val.images(np.arange(40), 32)
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net((x - mean) / std), rtol=0, atol=0)
    assert model.image_size == 32 and model.num_classes == 10
    # the accuracy recorded for epoch 1 is the reloaded model's accuracy on the same subset
    va_idx = np.sort(np.random.default_rng(3 + 1).choice(len(val), size=128, replace=False))
    acc, pred = C.evaluate(model, val, indices=va_idx, image_size=32)
    assert acc == pytest.approx(meta["val_accuracy"][0], abs=1e-6)
    assert acc == pytest.approx(float((pred == val.labels[va_idx]).mean()))
    # the checkpoint path and the model folder work too
    assert C.load_trained(run.checkpoint).num_classes == 10
    assert C.load_trained(run.model_dir).num_classes == 10


def test_same_seed_same_weights(trained, tmp_path):
    run, *_ = trained
    C.train_classifier("test_resnet", "digits", out=tmp_path, seed=3, **TINY)
    a = torch.load(run.checkpoint, weights_only=True)
    b = torch.load(Run(tmp_path).checkpoint, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    kw = dict(TINY, epochs=2, max_train=128)
    C.train_classifier("test_resnet", "digits", out=tmp_path / "full", seed=1, **kw)

    real = C.evaluate
    calls = {"n": 0}

    def crash_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(C, "evaluate", crash_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        C.train_classifier("test_resnet", "digits", out=tmp_path / "cut", seed=1, **kw)
    monkeypatch.setattr(C, "evaluate", real)
    cut = Run(tmp_path / "cut")
    half = json.loads(cut.model_meta.read_text())
    assert half["epochs_done"] == 1 and not half["complete"]
    with pytest.raises(ModelError, match="resume"):
        C.train_classifier("test_resnet", "digits", out=cut, seed=1, **kw)
    meta = C.train_classifier("test_resnet", "digits", out=cut, seed=1, resume=True, **kw)
    full = json.loads(Run(tmp_path / "full").model_meta.read_text())
    assert meta["complete"] and meta["val_accuracy"] == full["val_accuracy"]
    a = torch.load(cut.checkpoint, weights_only=True)
    b = torch.load(Run(tmp_path / "full").checkpoint, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_crop_matches_per_sample_slicing():
    rng_x = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 8, 8, generator=rng_x)
    pad = 2
    out = C._random_crop(x, pad, np.random.default_rng(7))
    r = np.random.default_rng(7)
    dy, dx = r.integers(0, 2 * pad + 1, size=5), r.integers(0, 2 * pad + 1, size=5)
    xp = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(5):
        torch.testing.assert_close(out[i], xp[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8])


def test_bad_input(tmp_path):
    with pytest.raises(ModelError, match="somprobe train"):
        C.load_trained(tmp_path)
    with pytest.raises(ModelError, match="unknown timm model"):
        C.train_classifier("resnet_does_not_exist", "digits", out=tmp_path, **TINY)
    with pytest.raises(ModelError, match="positive"):
        C.train_classifier("test_resnet", "digits", out=tmp_path, epochs=0)
    assert not Run(tmp_path).model_dir.exists()


def test_refuses_to_overwrite(trained):
    run, *_ = trained
    with pytest.raises(ModelError, match="overwrite"):
        C.train_classifier("test_resnet", "digits", out=run, seed=3, **TINY)
    # resume of a complete run is a no-op returning its metadata
    assert C.train_classifier("test_resnet", "digits", out=run, resume=True, seed=3,
                              **TINY)["complete"]


def test_one_cycle_matches_torch_and_survives_tiny_runs():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=40, pct_start=0.25)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    ours = [0.1 * C.one_cycle(t, total=40) for t in range(40)]
    np.testing.assert_allclose(ours, lrs, rtol=1e-9, atol=1e-12)
    tiny = [C.one_cycle(t, total=3) for t in range(3)]
    assert tiny[0] == pytest.approx(1.0) and tiny[-1] == pytest.approx(1 / 25e4)

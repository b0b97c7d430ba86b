"""BIM, DeepFool and Carlini–Wagner L2 against torchattacks 3.5.1 and hand-worked cases."""
from __future__ import annotations

import pytest
import torch
import torchattacks  # the reference (a test extra in setup.cfg, so never skipped)
from torch import nn

from somprobe.attacks import bim, cw_l2, deepfool, kurakin_steps
from somprobe.errors import AttackError

from _tiny_digits import digits_data, trained_mlp


class Linear2(nn.Module):
    """Two classes split by the hyperplane w·x + b = 0 (logits [0, w·x + b])."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b
        self.num_classes = 2

    def forward(self, x):
        s = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


@pytest.fixture(scope="module")
def digits():
    x, y = digits_data()
    model = trained_mlp("relu")
    xs, ys = x[1500:1532], y[1500:1532]
    keep = model(xs).argmax(1) == ys
    return model, xs[keep], ys[keep]


# --------------------------------------------------------------------------- DeepFool
def test_deepfool_matches_torchattacks_on_trained_digits_mlp(digits):
    model, x, y = digits
    ref = torchattacks.DeepFool(model, steps=50, overshoot=0.02)(x, y)
    res = deepfool(model, x, y, overshoot=0.02, max_iter=50)
    assert torch.allclose(res.images, ref, atol=1e-5)
    assert torch.allclose(res.r, ref - x, atol=1e-5)
    # clipping every step stalls some samples on saturated pixels (torchattacks' too)
    assert bool((res.preds[res.converged] != y[res.converged]).all())
    assert int(res.iterations.min()) >= 1
    free = deepfool(model, x, y, clip=None)  # no box: every sample crosses
    assert bool(free.converged.all())
    assert bool((free.preds != y).all())
    assert float(free.r.flatten(1).norm(dim=1).mean()) < 3.0


def test_deepfool_matches_torchattacks_on_test_resnet():
    from somprobe.models import build_model

    model = build_model("test_resnet", num_classes=10, seed=0)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    ref = torchattacks.DeepFool(model, steps=20, overshoot=0.02)(x, y)
    res = deepfool(model, x, max_iter=20)  # labels=None: the predictions, as y
    assert torch.allclose(res.images, ref, atol=1e-5)


def test_deepfool_on_a_linear_classifier_is_the_hyperplane_distance():
    w = torch.tensor([[0.3, -0.4], [0.0, 0.5]])
    model = Linear2(w, b=-0.1)
    x = torch.tensor([[[[0.2, 0.5], [0.5, 0.1]]], [[[0.6, 0.1], [0.5, 0.4]]]])
    s = (x.flatten(1) @ w.flatten() - 0.1)
    expected = -(s / w.flatten().pow(2).sum())[:, None] * w.flatten()  # minimal r, one step
    res = deepfool(model, x, overshoot=0.0, max_iter=5)
    assert res.iterations.tolist() == [1, 1]
    assert torch.allclose(res.r.flatten(1), expected, atol=1e-6)
    res = deepfool(model, x, overshoot=0.02, max_iter=5)
    assert torch.allclose(res.r.flatten(1), 1.02 * expected, atol=1e-6)
    assert bool(res.converged.all())


def test_deepfool_non_converging_is_recorded_not_raised(digits):
    model, x, y = digits
    res = deepfool(model, x, y, max_iter=1, overshoot=0.0)
    assert res.iterations.max() == 1
    assert not bool(res.converged.all())  # one linear step is not enough for most samples
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    nn.init.zeros_(flat[1].weight)
    res = deepfool(flat, x, max_iter=3)  # zero gradients: nowhere to step
    assert not bool(res.converged.any())
    assert torch.equal(res.images, x)


def test_deepfool_targeted_projection_reaches_the_margin(digits):
    model, x, y = digits
    target = (y + 3) % 10
    res = deepfool(model, x, target=target, margin=1.0, max_iter=100)
    assert bool(res.converged.all())
    logits = model(res.images)
    other = logits.scatter(1, target[:, None], float("-inf")).amax(1)
    assert bool((logits.gather(1, target[:, None]).squeeze(1) - other >= 1.0 - 1e-4).all())
    assert bool((res.preds == target).all())


def test_deepfool_top_k_candidates_and_bad_inputs(digits):
    model, x, y = digits
    res = deepfool(model, x, y, num_classes=3, clip=None)
    assert bool(res.converged.all())
    full = deepfool(model, x, y, clip=None)
    # fewer candidates can only give an equal or longer step
    assert float(res.r.flatten(1).norm(dim=1).mean()) >= 0.99 * float(full.r.flatten(1).norm(dim=1).mean())
    with pytest.raises(AttackError, match="max_iter"):
        deepfool(model, x, y, max_iter=0)
    with pytest.raises(AttackError, match="overshoot"):
        deepfool(model, x, y, overshoot=-1)
    with pytest.raises(AttackError, match="num_classes"):
        deepfool(model, x, y, num_classes=1)
    with pytest.raises(AttackError, match="outside"):
        deepfool(model, x * 3, y)


# --------------------------------------------------------------------------- BIM
def test_bim_equals_torchattacks_bim(digits):
    model, x, y = digits
    ref = torchattacks.BIM(model, eps=8 / 255, alpha=2 / 255, steps=10)(x, y)
    out = bim(model, x, y, eps=8 / 255, step_size=2 / 255, steps=10)
    assert torch.allclose(out, ref, atol=1e-6)
    assert float((out - x).abs().max()) <= 8 / 255 + 1e-6


def test_bim_kurakin_defaults():
    assert kurakin_steps(4 / 255) == 5
    assert kurakin_steps(16 / 255) == 20
    assert kurakin_steps(0.5 / 255) == 1


# --------------------------------------------------------------------------- CW
def test_cw_finds_the_hyperplane_distance_of_a_linear_classifier():
    w = torch.tensor([[0.3, -0.4], [0.2, 0.5]])
    model = Linear2(w, b=-0.2)
    x = torch.tensor([[[[0.5, 0.5], [0.4, 0.5]]], [[[0.6, 0.45], [0.5, 0.4]]]])
    s = (x.flatten(1) @ w.flatten() - 0.2)
    dist = s.abs() / w.norm()
    res = cw_l2(model, x, steps=300, binary_search_steps=8, initial_const=1.0, lr=0.01)
    assert bool(res.success.all())
    assert torch.all(res.l2 >= dist * 0.999)
    assert torch.all(res.l2 <= dist * 1.05)


def test_cw_against_torchattacks_cw(digits):
    model, x, y = digits
    ref = torchattacks.CW(model, c=1.0, kappa=0, steps=100, lr=0.01)(x, y)
    ref_ok = model(ref).argmax(1) != y
    ref_l2 = (ref - x).flatten(1).norm(dim=1)
    # binary_search_steps=1 with torchattacks' c: the same objective and optimiser
    one = cw_l2(model, x, y, initial_const=1.0, binary_search_steps=1, steps=100, lr=0.01)
    assert abs(float(one.success.float().mean()) - float(ref_ok.float().mean())) <= 0.15
    both = one.success & ref_ok
    assert int(both.sum()) >= 5
    ratio = float(one.l2[both].mean() / ref_l2[both].mean())
    assert 0.7 <= ratio <= 1.3, ratio
    # the search finds at least as many, and no longer ones where both succeed
    res = cw_l2(model, x, y, initial_const=1.0, binary_search_steps=4, steps=100, lr=0.01)
    assert float(res.success.float().mean()) >= float(ref_ok.float().mean())
    assert bool((model(res.images).argmax(1)[res.success] != y[res.success]).all())
    assert float(res.l2[both].mean()) <= 1.05 * float(ref_l2[both].mean())
    with pytest.raises(AttackError, match="binary_search_steps"):
        cw_l2(model, x, y, binary_search_steps=0)


# --------------------------------------------------------------------------- the attack job
@pytest.mark.parametrize("attack", ["bim", "deepfool", "cw"])
def test_attack_job_runs_bim_deepfool_cw(tmp_path, attack):
    import json

    import numpy as np
    import pandas as pd

    from somprobe.attacks.job import attack_run
    from somprobe.data import balanced_indices, load_dataset
    from somprobe.models import build_model
    from somprobe.run import Run

    ds = load_dataset("digits", split="test", image_size=16)
    model = build_model("test_resnet", num_classes=10, image_size=16, seed=0)
    idx = balanced_indices(ds.labels, 1, seed=0)
    run = Run(tmp_path / "run")
    returned = attack_run(run, model=model, dataset=ds, indices=idx, attack=attack, eps=8 / 255,
                          steps=3, batch_size=4, device="cpu", extract=False, binary_search_steps=2)
    d = run.attack_dir(f"adv-{attack}")
    images = np.load(d / "images.npy")
    assert images.shape == (10, 3, 16, 16)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["converged_rate"] == returned["converged_rate"]
    assert summary["attack"] == attack and summary["n"] == 10
    x = ds.images(idx, 16)
    direct = {"bim": lambda: bim(model, x[:4], torch.as_tensor(ds.labels[idx[:4]]), eps=8 / 255,
                                 steps=3),
              "deepfool": lambda: deepfool(model, x[:4], torch.as_tensor(ds.labels[idx[:4]]),
                                           max_iter=3).images,
              "cw": lambda: cw_l2(model, x[:4], torch.as_tensor(ds.labels[idx[:4]]), steps=3,
                                  binary_search_steps=2).images}[attack]()
    np.testing.assert_allclose(images[:4], direct.numpy(), atol=1e-6)
    if attack == "bim":
        assert summary["eps"] == pytest.approx(8 / 255) and summary["norm"] == "linf"
        assert np.abs(images - x.numpy()).max() <= 8 / 255 + 1e-6
    else:
        assert summary["eps"] is None and summary["norm"] == "l2"
        conv = np.load(d / "converged.npy")
        assert conv.dtype == bool and conv.shape == (10,)
        assert summary["converged_rate"] == pytest.approx(conv.mean())
        if attack == "deepfool":
            assert np.load(d / "iterations.npy").max() <= 3
    table = pd.read_csv(run.table("attacks"))
    assert table["attack"].tolist() == [attack]
    with pytest.raises(AttackError, match="steps"):
        attack_run(run, model=model, dataset=ds, indices=idx, attack=attack, steps=0,
                   name="bad", device="cpu", extract=False)

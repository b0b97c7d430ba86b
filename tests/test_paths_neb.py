"""paths core, linear and NEB on cases whose answer is known beforehand.

A 2-D toy classifier whose target class is an annulus: the straight line between two points of
the annulus crosses the hole, so it is not linearly connectable, but the arc is a path; a
half-plane class where the straight line stays inside; hand-worked improved tangents; the
equal-spacing redistribution; batched against one pair at a time; profiles against a brute-force
loop over t.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from somprobe.models import build_model
from somprobe.paths import (
    PathBatch, check_paths, find_linear, find_neb, improved_tangent, linear_profile, make_space,
    path_profile, redistribute,
)
from somprobe.paths.spaces import Space


class Annulus(nn.Module):
    """Class 0 inside the ring 1 < |z| < 2 (logit 5 on the circle |z| = 1.5), class 1 elsewhere."""

    def forward(self, z):
        r = z.norm(dim=1)
        l0 = -20 * ((r - 1.5) ** 2 - 0.25)
        return torch.stack([l0, torch.zeros_like(l0)], 1)


class HalfPlane(nn.Module):
    """Class 0 where x > 0: a convex region."""

    def forward(self, z):
        return torch.stack([5 * z[:, 0], torch.zeros_like(z[:, 0])], 1)


def _toy(module):
    return Space("toy", lambda x: x, module, None)


A = torch.tensor([[-1.5, 0.1], [-1.2, -0.9], [1.0, 1.1]])
B = torch.tensor([[1.5, 0.3], [1.5, 0.2], [-1.1, 1.0]])
T0 = torch.zeros(3, dtype=torch.long)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- known regions
def test_annulus_neb_finds_the_arc_the_line_misses():
    space = _toy(Annulus())
    lin = find_linear(space, A, B, T0)
    assert lin.stats["path_ok"].tolist() == [False, False, True]  # the first two cross the hole
    for spring in (math.inf, 5.0):
        res = find_neb(space, A, B, T0, steps=300, spring=spring)
        assert res.stats["path_ok"].all() and res.stats["converged"].all()
        assert not res.stats["failed"].any()
        # The band goes round the hole: every anchor is in the ring, and it is longer than the line.
        r = res.anchors.norm(dim=2)
        assert ((r > 1.0) & (r < 2.0)).all()
        assert (res.stats["length_ratio"][:2] > 1.1).all()
        assert (res.stats["iterations"] < 300).all()


def test_convex_region_is_linearly_connectable_and_neb_stays_straight():
    space = _toy(HalfPlane())
    a, b = torch.tensor([[1.0, -2.0], [0.5, 3.0]]), torch.tensor([[2.0, 2.0], [3.0, -1.0]])
    t = torch.zeros(2, dtype=torch.long)
    assert find_linear(space, a, b, t).stats["path_ok"].all()
    res = find_neb(space, a, b, t, steps=50)
    assert res.stats["path_ok"].all()
    # The class region is convex and the loss falls with x: the band moves away from the
    # boundary, never below the straight line's smaller x.
    assert (res.anchors[:, :, 0] >= torch.minimum(a[:, 0], b[:, 0])[:, None] - 1e-6).all()


# ----------------------------------------------------------------------------- NEB parts
@pytest.mark.parametrize("energies, expected", [
    ((0.0, 1.0, 2.0), (0.0, 1.0)),                 # rising: towards the next point
    ((2.0, 1.0, 0.0), (1.0, 0.0)),                 # falling: from the previous point
    ((0.0, 2.0, 1.0), (1 / 5 ** 0.5, 2 / 5 ** 0.5)),  # maximum, next higher: 2·τ+ + 1·τ-
    ((2.0, 0.0, 1.0), (2 / 5 ** 0.5, 1 / 5 ** 0.5)),  # minimum, previous higher: 1·τ+ + 2·τ-
])
def test_improved_tangent_by_hand(energies, expected):
    prev, cur, nxt = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    e = [torch.tensor(v) for v in energies]
    tau = improved_tangent(prev, cur, nxt, *e)
    assert torch.allclose(tau, torch.tensor(expected), atol=1e-6)


def test_redistribute_gives_equal_spacing_on_the_same_curve():
    line = torch.tensor([[[0.0, 0.0], [0.1, 0.2], [0.2, 0.4], [0.9, 1.8], [1.0, 2.0]]])
    out = redistribute(line)
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]), atol=1e-6)
    assert torch.allclose(out[0, :, 1], 2 * out[0, :, 0], atol=1e-6)
    ell = torch.tensor([[[0.0, 0.0], [0.5, 0.0], [2.0, 0.0], [2.0, 1.0]]])   # length 3
    out = redistribute(ell)
    assert torch.allclose(out, torch.tensor([[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [2.0, 1.0]]]), atol=1e-6)
    d = (out[0, 1:] - out[0, :-1]).norm(dim=1)
    assert torch.allclose(d, torch.ones(3), atol=1e-6)


def test_batched_neb_equals_one_pair_at_a_time():
    space = _toy(Annulus())
    for optimizer, spring in (("adam", math.inf), ("sgd", 5.0)):
        lr = 0.01 if optimizer == "adam" else 0.002
        res = find_neb(space, A, B, T0, steps=60, optimizer=optimizer, spring=spring, lr=lr)
        for i in range(3):
            one = find_neb(space, A[i:i + 1], B[i:i + 1], T0[i:i + 1], steps=60, optimizer=optimizer,
                           spring=spring, lr=lr)
            assert torch.allclose(one.anchors[0], res.anchors[i], atol=1e-5)
            for k in ("iterations", "path_ok", "converged"):
                assert one.stats[k][0] == res.stats[k][i]


def test_batched_neb_equals_single_on_a_resnet_latent():
    model = build_model("test_resnet", num_classes=3, seed=0, image_size=32).eval()
    space = make_space(model, "CL3")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        z = space.encode(x)
    t = torch.tensor([0, 2])
    res = find_neb(space, z[:2], z[2:], t, steps=3, points=5)
    for i in range(2):
        one = find_neb(space, z[i:i + 1], z[2 + i:3 + i], t[i:i + 1], steps=3, points=5)
        assert torch.allclose(one.anchors[0], res.anchors[i], atol=1e-4)
        assert np.isclose(one.stats["max_loss"][0], res.stats["max_loss"][i], atol=1e-4)


def test_one_pivot_per_pass_equals_batched_on_a_resnet_latent():
    # benchmarks/neb_speed.py's AutoNEB-like reference: find_neb per pair with chunk=1 (one
    # forward/backward per pivot, one forward per dense-check point) gives the batched result
    model = build_model("test_resnet", num_classes=3, seed=0, image_size=32).eval()
    space = make_space(model, "CL3")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = space.encode(x)
    t = torch.tensor([1, 0])
    res = find_neb(space, z[:2], z[2:], t, steps=4, points=4, pivots=4, tol=1e-6)
    assert (res.stats["iterations"] == 4).all()  # the budget is spent: the last look is forward only
    for i in range(2):
        one = find_neb(space, z[i:i + 1], z[2 + i:3 + i], t[i:i + 1], steps=4, points=4, pivots=4,
                       tol=1e-6, chunk=1)
        assert torch.allclose(one.anchors[0], res.anchors[i], atol=1e-4)
        for k in ("iterations", "path_ok", "converged"):
            assert one.stats[k][0] == res.stats[k][i]
        assert np.isclose(one.stats["pivot_max_loss"][0], res.stats["pivot_max_loss"][i], rtol=1e-4)


def test_pixel_space_band_stays_in_the_box():
    model = build_model("test_resnet", num_classes=3, seed=0, image_size=32).eval()
    space = make_space(model, "input")
    assert space.clip == (0.0, 1.0)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    res = find_neb(space, a, b, torch.tensor([1, 1]), steps=3, lr=0.5, points=3)
    assert res.anchors.min() >= 0 and res.anchors.max() <= 1
    assert torch.equal(res.anchors[:, 0], a) and torch.equal(res.anchors[:, -1], b)


# ----------------------------------------------------------------------------- failures
def test_nan_end_and_diverging_band_fail_only_their_pair():
    space = _toy(Annulus())
    a = A.clone()
    a[1, 0] = float("nan")
    res = find_neb(space, a, B, T0, steps=100)
    assert res.stats["failed"].tolist() == [False, True, False]
    assert "non-finite" in res.stats["reason"][1]
    assert res.stats["path_ok"][[0, 2]].all() and not res.stats["path_ok"][1]
    # Plain SGD with a large step blows the bands crossing the hole up; the third pair converges.
    res = find_neb(space, A, B, T0, steps=100, optimizer="sgd", lr=0.05, spring=5.0)
    assert res.stats["failed"].tolist() == [True, True, False]
    assert all("diverged" in r for r in res.stats["reason"][:2])
    assert res.stats["path_ok"][2] and torch.isfinite(res.anchors).all()


def test_bad_neb_parameters_are_refused():
    space = _toy(Annulus())
    for kw in ({"pivots": 0}, {"steps": -1}, {"optimizer": "lbfgs"}, {"lr": 0.0}, {"spring": -1.0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            find_neb(space, A, B, T0, **kw)


# ----------------------------------------------------------------------------- dense checks
@pytest.mark.parametrize("chunk,reduce", [(5, None), (7, 7), (15, None), (1024, None)])
def test_linear_profile_matches_a_brute_force_loop(chunk, reduce, monkeypatch):
    # chunk < 7: a segment split over passes; else whole segments per pass, reduced at the end
    # or (reduce=7) after every pass
    if reduce is not None:
        from somprobe.paths import core

        monkeypatch.setattr(core, "_REDUCE_POINTS", reduce)
    model = build_model("test_resnet", num_classes=3, seed=0, image_size=32).eval()
    space = make_space(model, "input")
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    t = torch.tensor([0, 1, 2])
    prof = linear_profile(space, a, b, t, 7, chunk=chunk, probs=True)
    with torch.no_grad():
        for p in range(3):
            for j, s in enumerate(np.linspace(0, 1, 7)):
                logit = model(((1 - s) * a[p] + s * b[p])[None])[0]
                sm = logit.softmax(0)
                assert prof["pred"][p, j] == logit.argmax().item()
                assert np.isclose(prof["p_target"][p, j], sm[p].item(), atol=1e-5)
                assert np.isclose(prof["loss"][p, j], -sm[p].log().item(), atol=1e-4)
                assert np.allclose(prof["probs"][p, j], sm.numpy(), atol=1e-5)
    assert prof["linear_ok"].tolist() == (prof["pred"] == t.numpy()[:, None]).all(1).tolist()


def test_affine_space_interpolates_end_logits_like_a_brute_force_loop():
    # CL4 of a ResNet: the dense checks run only the anchors through the tail; every point must
    # still get what evaluating it gives, on a line, a padded polyline and a NaN anchor.
    import dataclasses

    model = build_model("test_resnet", num_classes=3, seed=0, image_size=32).eval()
    space = make_space(model, "CL4")
    assert space.affine and not make_space(model, "CL3").affine
    plain = dataclasses.replace(space, affine=False)
    g = torch.Generator().manual_seed(3)
    z = space.encode(torch.rand(6, 3, 32, 32, generator=g)).detach()
    a, b, t = z[:3], z[3:], torch.tensor([0, 1, 2])
    prof = linear_profile(space, a, b, t, 9, probs=True)
    with torch.no_grad():
        for p in range(3):
            for j, s in enumerate(np.linspace(0, 1, 9)):
                sm = space.logits(((1 - s) * a[p] + s * b[p])[None])[0].softmax(0)
                assert np.isclose(prof["p_target"][p, j], sm[p].item(), atol=1e-5)
                assert np.isclose(prof["loss"][p, j], -sm[p].log().item(), rtol=1e-4, atol=1e-5)
                assert np.allclose(prof["probs"][p, j], sm.numpy(), atol=1e-5)
                if sm.sort().values[-1] - sm.sort().values[-2] > 1e-4:  # not a near tie
                    assert prof["pred"][p, j] == sm.argmax().item()
    anchors = torch.stack([a, (a + b) / 2 + 0.5 * z[:3].flip(0), b], 1)
    anchors[1, 2] = anchors[1, 1]  # pair 1: two anchors, padded
    anchors[2, 1, 0] = float("nan")  # pair 2: a NaN anchor
    batch = PathBatch(anchors, torch.tensor([3, 2, 3]))
    fast, slow = check_paths(space, batch, t, points_per_segment=5), check_paths(plain, batch, t, points_per_segment=5)
    assert fast["path_ok"].tolist() == slow["path_ok"].tolist()
    assert fast["n_points_checked"].tolist() == slow["n_points_checked"].tolist() == [10, 5, 10]
    np.testing.assert_allclose(fast["max_loss"], slow["max_loss"], rtol=1e-4, atol=1e-5)  # NaN == NaN
    assert np.isnan(fast["max_loss"][2]) and not fast["path_ok"][2]


def test_check_paths_on_padded_polylines_against_brute_force():
    space = _toy(Annulus())
    # Pair 0: the arc through (0, 1.5) (inside the ring); pair 1: a straight segment through the
    # hole, padded with its end repeated.
    anchors = torch.tensor([
        [[-1.5, 0.0], [0.0, 1.5], [1.5, 0.0]],
        [[-1.5, 0.0], [1.5, 0.0], [1.5, 0.0]],
    ])
    batch = PathBatch(anchors, torch.tensor([3, 2]))
    chk = check_paths(space, batch, torch.zeros(2, dtype=torch.long), points_per_segment=11)
    assert chk["n_points_checked"].tolist() == [22, 11]
    assert np.allclose(chk["length_ratio"], [2 * math.hypot(1.5, 1.5) / 3.0, 1.0])
    for p, n in enumerate([3, 2]):
        pts = torch.cat([anchors[p, k] + torch.linspace(0, 1, 11)[:, None] * (anchors[p, k + 1] - anchors[p, k])
                         for k in range(n - 1)])
        logit = Annulus()(pts)
        assert chk["path_ok"][p] == bool((logit.argmax(1) == 0).all())
        assert np.isclose(chk["max_loss"][p], nn.functional.cross_entropy(
            logit, torch.zeros(len(pts), dtype=torch.long), reduction="none").max().item(), atol=1e-5)
    # The chords of the arc stay at |z| >= 1.06 (in the ring); the straight line crosses the hole.
    assert chk["path_ok"].tolist() == [True, False]
    prof = path_profile(space, batch, torch.zeros(2, dtype=torch.long), points_per_segment=3)
    assert np.allclose(prof["t"][prof["pair"] == 0], [0, 0.25, 0.5, 0.5, 0.75, 1.0])

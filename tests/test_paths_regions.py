"""Region paths (study 002, Algorithm 1) and the convexity test on toy regions known in closed form."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from somprobe.errors import PathError
from somprobe.paths.convexity import convexity_summary, convexity_test
from somprobe.paths.core import check_paths
from somprobe.paths.regions import REGION_EXTRAS, find_region_path, project_to_class

from _toy_regions import FlatGap, HalfSpace, NanRegion, Ring, space


def _radius(pts):
    return pts.norm(dim=-1)


def test_annulus_path_goes_round_the_hole():
    sp = space(Ring())
    a, b = torch.tensor([[-1.5, 0.2]]), torch.tensor([[1.5, 0.2]])
    res = find_region_path(sp, a, b, torch.tensor([0]), spacing=1e-3)
    s = res.stats
    assert s["success"][0] and s["path_ok"][0] and not s["failed"][0]
    n = int(res.n_anchors[0])
    assert s["anchors"][0] == n > 3 and s["projections"][0] >= 1
    # Every anchor lies in the annulus, and so does every point of a much denser check.
    r = _radius(res.anchors[0, :n])
    assert ((r > 1) & (r < 2)).all()
    assert check_paths(sp, res, torch.tensor([0]), points_per_segment=2000)["path_ok"][0]
    # The straight line crosses the hole; the path goes round it: longer than the line.
    assert s["length_ratio"][0] > 1.1
    assert torch.equal(res.anchors[0, 0], a[0]) and torch.equal(res.anchors[0, n - 1], b[0])


def test_convex_region_needs_no_projection():
    sp = space(HalfSpace())
    a, b = torch.tensor([[2.0, 1.0]]), torch.tensor([[3.0, -1.0]])
    s = find_region_path(sp, a, b, torch.tensor([0]), spacing=1e-3).stats
    # Algorithm 1 as printed always adds the midpoint: 3 anchors, one level, a straight path.
    assert s["success"][0] and s["anchors"][0] == 3 and s["depth"][0] == 1
    assert s["projections"][0] == 0 and s["length_ratio"][0] == pytest.approx(1.0)
    # The spacing: 1e-3 of the distance between the ends over both halves → about 1000 points.
    assert 995 <= s["points_checked"][0] <= 1000


def test_recurse_invalid_only_gives_fewer_anchors_and_a_valid_path():
    sp = space(Ring())
    a, b = torch.tensor([[-1.5, 0.2]]), torch.tensor([[1.5, 0.2]])
    both = find_region_path(sp, a, b, torch.tensor([0]), spacing=1e-3, recurse="both")
    inv = find_region_path(sp, a, b, torch.tensor([0]), spacing=1e-3, recurse="invalid")
    assert inv.stats["success"][0] and both.stats["success"][0]
    assert inv.stats["anchors"][0] <= both.stats["anchors"][0]
    assert check_paths(sp, inv, torch.tensor([0]), points_per_segment=2000)["path_ok"][0]


def test_batched_equals_one_at_a_time():
    sp = space(Ring())
    a = torch.tensor([[-1.5, 0.2], [-1.5, 0.0], [1.2, 0.0], [0.0, 1.5]])
    b = torch.tensor([[1.5, 0.2], [1.5, 0.3], [1.4, 0.0], [0.1, -1.6]])
    t = torch.zeros(4, dtype=torch.long)
    batch = find_region_path(sp, a, b, t, spacing=1e-3)
    for i in range(4):
        one = find_region_path(sp, a[i:i + 1], b[i:i + 1], t[i:i + 1], spacing=1e-3)
        n = int(one.n_anchors[0])
        assert int(batch.n_anchors[i]) == n
        torch.testing.assert_close(batch.anchors[i, :n], one.anchors[0, :n], rtol=1e-5, atol=1e-5)
        for k in ("anchors", "depth", "success", "projections", "points_checked", "iterations"):
            assert batch.stats[k][i] == one.stats[k][0], k
    assert set(REGION_EXTRAS) <= set(batch.stats)


def test_end_outside_the_region_is_reported():
    sp = space(Ring())
    a = torch.tensor([[0.1, 0.0], [-1.5, 0.2]])     # first pair starts in the hole
    b = torch.tensor([[1.5, 0.0], [1.5, 0.2]])
    s = find_region_path(sp, a, b, torch.tensor([0, 0]), spacing=1e-3).stats
    assert s["failed"][0] and "end a is predicted as class 1" in s["reason"][0]
    assert s["success"][1]


def test_depth_limit_is_recorded_and_others_go_on():
    sp = space(Ring())
    a = torch.tensor([[-1.5, 0.2], [1.2, 0.0]])
    b = torch.tensor([[1.5, 0.2], [1.4, 0.0]])
    s = find_region_path(sp, a, b, torch.tensor([0, 0]), spacing=1e-3, max_depth=1).stats
    assert s["failed"][0] and "depth limit 1" in s["reason"][0] and not s["success"][0]
    assert s["success"][1] and s["reason"][1] == ""


def test_projection_that_cannot_reach_the_target_stops():
    # Between |x0| < 1 the logit is flat: there is no gradient to follow into class 0.
    sp = space(FlatGap())
    a, b = torch.tensor([[-3.0, 0.0], [1.5, 0.0]]), torch.tensor([[3.0, 0.0], [2.5, 1.0]])
    s = find_region_path(sp, a, b, torch.tensor([0, 0]), spacing=1e-3, proj_steps=5).stats
    assert s["failed"][0] and "projection" in s["reason"][0] and not s["success"][0]
    assert s["iterations"][0] <= 5
    assert s["success"][1]


def test_project_to_class_reaches_the_margin():
    sp = space(HalfSpace())
    x = torch.tensor([[-1.0, 0.0], [-0.1, -0.3]])
    res = project_to_class(sp, x, torch.tensor([0, 0]), margin=0.5)
    out = sp.logits(res.images)
    assert res.converged.all()
    assert ((out[:, 0] - out[:, 1]) >= 0.5 - 1e-6).all()
    # Linear boundary: one DeepFool step lands (with overshoot) just past the margin, moving
    # along w only — the smallest move.
    w = torch.tensor([1.0, 0.5])
    d = res.images - x
    assert torch.allclose(d / d.norm(dim=1, keepdim=True), (w / w.norm()).expand_as(d), atol=1e-5)


def test_non_finite_midpoint_stops_only_that_pair():
    sp = space(NanRegion())
    a = torch.tensor([[-3.0, 5.0], [0.0, 0.0]])
    b = torch.tensor([[3.0, 5.0], [1.0, 1.0]])
    s = find_region_path(sp, a, b, torch.tensor([0, 0]), spacing=1e-3).stats
    assert s["failed"][0] and "non-finite" in s["reason"][0]
    assert s["success"][1]


@pytest.mark.parametrize("kw", [dict(spacing=0), dict(spacing=-1e-4), dict(spacing=2.0),
                                dict(margin=-0.1), dict(overshoot=-1), dict(proj_steps=0),
                                dict(max_depth=0), dict(recurse="some")])
def test_bad_parameters_raise(kw):
    with pytest.raises(PathError) as e:
        find_region_path(space(Ring()), torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([0]), **kw)
    assert next(iter(kw)) in str(e.value)


# convexity ------------------------------------------------------------------------------------
def _ring_points(n, seed):
    g = np.random.default_rng(seed)
    ang = g.uniform(0, 2 * np.pi, n)
    r = g.uniform(1.1, 1.9, n)
    return torch.tensor(np.stack([r * np.cos(ang), r * np.sin(ang)], 1), dtype=torch.float32)


def test_convex_combinations_of_a_half_space_stay_in_it():
    sp = space(HalfSpace())
    g = np.random.default_rng(0)
    pts = torch.tensor(g.normal(size=(200, 2)) * 2, dtype=torch.float32)
    labels = sp.logits(pts).argmax(1).numpy()
    res = convexity_test(sp, pts, labels, ks=range(2, 11), trials=50, seed=0)
    summary = convexity_summary(res)
    assert list(summary["k"]) == list(range(2, 11)) and (summary["n"] == 50).all()
    assert (summary["share_in_class"] == 1.0).all()
    assert set(np.unique(res["class"])) == {0, 1}


def test_convex_combinations_of_an_annulus_leave_it():
    sp = space(Ring())
    pts = _ring_points(100, 1)
    res = convexity_test(sp, pts, np.zeros(100, dtype=int), ks=(2, 5, 10), trials=400, seed=3)
    share = convexity_summary(res)["share_in_class"]
    assert (share < 1).all()
    # More points average towards the centre (the hole): the share falls with k.
    assert share[0] > share[1] > share[2]
    # The same seed gives the same draws; another seed other draws.
    again = convexity_test(sp, pts, np.zeros(100, dtype=int), ks=(2, 5, 10), trials=400, seed=3)
    assert np.array_equal(again["pred"], res["pred"]) and np.array_equal(again["p_class"], res["p_class"])
    other = convexity_test(sp, pts, np.zeros(100, dtype=int), ks=(2, 5, 10), trials=400, seed=4)
    assert not np.array_equal(other["p_class"], res["p_class"])


def test_convexity_by_brute_force():
    sp = space(Ring())
    pts = _ring_points(30, 2)
    res = convexity_test(sp, pts, np.zeros(30, dtype=int), ks=(3,), trials=20, seed=5, chunk=7)
    # Redraw with the same generator sequence and label the combinations one by one.
    g = np.random.default_rng(5)
    cls = g.choice(np.array([0]), size=20)
    idx = np.argsort(g.random((20, 30)), axis=1)[:, :3]
    w = g.dirichlet(np.ones(3), size=20)
    for i in range(20):
        x = (torch.tensor(w[i], dtype=torch.float32)[:, None] * pts[idx[i]]).sum(0, keepdim=True)
        assert int(sp.logits(x).argmax(1)) == res["pred"][i]
    assert (cls == res["class"]).all()


def test_convexity_errors():
    sp = space(Ring())
    pts = _ring_points(5, 0)
    with pytest.raises(PathError, match="no class has 6 points"):
        convexity_test(sp, pts, np.zeros(5, dtype=int), ks=(6,))
    with pytest.raises(PathError, match="k must be an integer >= 2"):
        convexity_test(sp, pts, np.zeros(5, dtype=int), ks=(1,))
    with pytest.raises(PathError, match="alpha"):
        convexity_test(sp, pts, np.zeros(5, dtype=int), ks=(2,), alpha=0)


# ends made from noise ------------------------------------------------------------------------
def _linear_net(classes=4, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, classes))
    with torch.no_grad():
        net[1].weight.mul_(10)
    return net.eval()


def test_noise_adversarial_lands_in_the_target_class_with_the_margin():
    from somprobe.paths.synthetic import noise_adversarial

    net = _linear_net()
    target = torch.tensor([0, 1, 2, 3, 1])
    res = noise_adversarial(net, target, (3, 5, 5), seed=3, margin=1.0)
    assert res.converged.all()
    out = net(res.images)
    assert torch.equal(out.argmax(1), target)
    lead = out.gather(1, target[:, None])[:, 0] - out.scatter(1, target[:, None], -1e9).amax(1)
    assert (lead >= 1.0 - 1e-5).all()
    assert res.images.min() >= 0 and res.images.max() <= 1
    again = noise_adversarial(net, target, (3, 5, 5), seed=3, margin=1.0)
    assert torch.equal(again.images, res.images)


def test_noise_optimal_pairs_take_classes_in_turn():
    from somprobe.paths.synthetic import noise_optimal_pairs

    net = _linear_net()
    a, b, t, res = noise_optimal_pairs(net, 4, 6, (3, 5, 5), seed=1, iters=300, lr=0.05, tol=0.05)
    assert t.tolist() == [0, 1, 2, 3, 0, 1]
    assert a.shape == b.shape == (6, 3, 5, 5) and not torch.equal(a, b)
    assert res.converged.all()
    assert torch.equal(net(a).argmax(1), t) and torch.equal(net(b).argmax(1), t)

"""The cheap targeted projection (target vs leading class) against targeted DeepFool, on toy
classifiers whose regions are known in closed form."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _toy_regions import HalfSpace, space
from scipy.optimize import minimize
from torch import nn

from somprobe.attacks.deepfool import deepfool
from somprobe.paths.core import check_paths
from somprobe.paths.projection import project_leading
from somprobe.paths.regions import find_region_path, project_to_class


class _CountBackward(torch.autograd.Function):
    """Identity that counts the backward passes through it."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


class Linear(nn.Module):
    """f(x) = W x + b on R²: every class region is a polytope {x : (w_t − w_k)·x + b_t − b_k ≥ 0}."""

    def __init__(self, count: bool = False):
        super().__init__()
        ang = torch.tensor([0.0, 1.7, 3.1, 4.4])
        self.register_buffer("W", 3 * torch.stack([ang.cos(), ang.sin()], 1))   # [4, 2]
        self.register_buffer("b", torch.tensor([0.0, 0.5, -0.3, 0.2]))
        self.count = count

    def forward(self, x):
        if self.count:
            x = _CountBackward.apply(x)
        return x @ self.W.T + self.b


class ThreeRing(nn.Module):
    """Class 0 on the annulus 1 < |x| < 2, class 1 in the hole, class 2 outside."""

    def forward(self, x):
        r = x.pow(2).sum(1).add(1e-12).sqrt()
        return 4 * torch.stack([torch.minimum(r - 1, 2 - r), 1 - r, r - 2], 1)


def _flat_linear(n_in: int, n_classes: int, *, gain: float) -> nn.Module:
    """A linear classifier on flattened images, torch's default init (seed 0) scaled by ``gain``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_classes))
    with torch.no_grad():
        net[1].weight.mul_(gain)
    return net.eval()


def _lead(model, x, t):
    out = model(x)
    other = out.scatter(1, t[:, None], float("-inf")).amax(1)
    return out.gather(1, t[:, None]).squeeze(1) - other


def _exact_distance(model: Linear, x, t, margin):
    """Smallest ‖y − x‖ with f_t(y) − f_k(y) ≥ margin for every k (a QP, solved by SLSQP)."""
    W, b = model.W.double().numpy(), model.b.double().numpy()
    cons = [{"type": "ineq", "fun": (lambda y, k=k: (W[t] - W[k]) @ y + b[t] - b[k] - margin),
             "jac": (lambda y, k=k: W[t] - W[k])} for k in range(len(b)) if k != t]
    x = x.double().numpy()
    res = minimize(lambda y: 0.5 * ((y - x) ** 2).sum(), x, jac=lambda y: y - x, constraints=cons,
                   method="SLSQP", options={"ftol": 1e-12, "maxiter": 200})
    assert res.success
    return float(np.linalg.norm(res.x - x))


def test_two_classes_equal_targeted_deepfool_exactly():
    model = HalfSpace().eval()
    x = torch.tensor([[-1.0, 0.0], [-0.1, -0.3], [2.0, 2.0], [-3.0, 1.0]])
    t = torch.zeros(4, dtype=torch.long)
    new = project_leading(model, x, t, margin=0.5, overshoot=0.02, max_steps=20)
    old = deepfool(model, x, target=t, margin=0.5, overshoot=0.02, max_iter=20, clip=None)
    torch.testing.assert_close(new.images, old.images, rtol=0, atol=1e-6)
    assert torch.equal(new.iterations, old.iterations) and torch.equal(new.converged, old.converged)
    assert new.iterations.tolist() == [1, 1, 0, 1]   # a linear boundary: one step, or none


@pytest.mark.parametrize("margin", [0.0, 0.3, 1.0])
def test_linear_polytope_both_reach_the_region_near_the_exact_projection(margin):
    model = Linear().eval()
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(60, 2, generator=gen)
    t = torch.randint(0, 4, (60,), generator=gen)
    new = project_leading(model, x, t, margin=margin, overshoot=0.02, max_steps=50)
    old = deepfool(model, x, target=t, margin=margin, overshoot=0.02, max_iter=50, clip=None)
    assert new.converged.all() and old.converged.all()
    # In the target region with the margin, checked on the closed form W x + b.
    assert (_lead(model, new.images, t) >= margin - 1e-5).all()
    assert (new.preds == t).all()
    d_new = new.r.norm(dim=1)
    d_old = old.r.norm(dim=1)
    exact = torch.tensor([_exact_distance(model, x[i], int(t[i]), margin) for i in range(len(t))])
    moved = exact > 1e-9
    assert torch.equal(new.iterations == 0, ~moved)          # already inside: left alone
    assert (d_new[~moved] == 0).all()
    # Never closer than the exact projection (it is the smallest move), and close to it: the
    # overshoot and a possible change of leader cost a few per cent, as for targeted DeepFool.
    assert (d_new[moved] >= exact[moved] * (1 - 1e-5)).all()
    assert (d_new[moved] <= 1.5 * exact[moved] + 1e-6).all()
    assert d_new[moved].mean() <= 1.1 * d_old[moved].mean()
    # Where one constraint is active (one step each), the leading class alone (τ = 0) and
    # DeepFool take the same, exact, step; the soft maximum (default τ) a step within 1 %.
    hard = project_leading(model, x, t, margin=margin, overshoot=0.02, max_steps=50, temperature=0.0)
    assert hard.converged.all()
    one = moved & (hard.iterations == 1) & (old.iterations == 1)
    assert one.sum() >= 10
    torch.testing.assert_close(hard.r.norm(dim=1)[one], 1.02 * exact[one], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hard.images[one], old.images[one], rtol=1e-5, atol=1e-5)
    one = one & (new.iterations == 1)
    torch.testing.assert_close(d_new[one], 1.02 * exact[one], rtol=1e-2, atol=1e-6)


def test_one_backward_pass_per_step_instead_of_one_per_class():
    model = Linear(count=True).eval()
    gen = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(40, 2, generator=gen)
    t = torch.randint(0, 4, (40,), generator=gen)
    _CountBackward.calls = 0
    new = project_leading(model, x, t, margin=0.2, max_steps=50)
    n_new = _CountBackward.calls
    _CountBackward.calls = 0
    old = deepfool(model, x, target=t, margin=0.2, max_iter=50, clip=None)
    n_old = _CountBackward.calls
    assert new.converged.all() and old.converged.all()
    assert n_new == int(new.iterations.max())               # whole batch, one backward per step
    # C − 1 = 3 per step, plus the pass that finds the last rows done (DeepFool differentiates
    # before it checks).
    assert n_old == 3 * (int(old.iterations.max()) + 1)
    assert 3 * n_new < n_old


def test_soft_maximum_stops_the_ping_pong_between_two_leaders():
    # Uniform noise projected into class 2 of a linear classifier in the [0, 1] box: with the
    # leading class alone the step away from one leader makes another lead, 100 steps without
    # arriving (targeted DeepFool needs 97); the soft maximum arrives in a few steps, moving
    # no more than 1 % further.
    net = _flat_linear(3 * 5 * 5, 4, gain=10)
    noise = torch.rand((5, 3, 5, 5), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 1, 2, 3, 1])
    # (box_aware off: stepping and clipping as DeepFool, to isolate the competitor's effect)
    hard = project_leading(net, noise, t, margin=1.0, max_steps=100, clip=(0, 1), temperature=0.0,
                           box_aware=False)
    soft = project_leading(net, noise, t, margin=1.0, max_steps=100, clip=(0, 1), box_aware=False)
    default = project_leading(net, noise, t, margin=1.0, max_steps=100, clip=(0, 1))
    assert default.converged.all() and default.iterations.max() <= 5
    old = deepfool(net, noise, target=t, margin=1.0, max_iter=100, clip=(0, 1))
    assert not hard.converged[2] and hard.iterations[2] == 100
    assert old.converged.all() and old.iterations[2] > 50
    assert soft.converged.all() and soft.iterations.max() <= 5
    out = net(soft.images)
    lead = out.gather(1, t[:, None])[:, 0] - out.scatter(1, t[:, None], float("-inf")).amax(1)
    assert (lead >= 1.0 - 1e-5).all()
    d_soft, d_old = soft.r.flatten(1).norm(dim=1), old.r.flatten(1).norm(dim=1)
    assert (d_soft <= 1.01 * d_old + 1e-6).all()


def test_box_aware_step_does_not_stall_on_saturated_pixels():
    # A black background (pixels at 0) and a linear classifier whose way into the target needs
    # some background pixels darker (impossible) and others brighter: stepping and then clipping
    # throws the impossible part away at every step; leaving it out of the step arrives at once.
    net = _flat_linear(3 * 6 * 6, 3, gain=5)
    x = torch.zeros(6, 3, 6, 6)
    x[:, :, 2:4, 2:4] = 0.6                               # a small bright object
    with torch.no_grad():
        pred = net(x).argmax(1)
    t = (pred + torch.tensor([1, 2, 1, 2, 1, 2])) % 3
    box = project_leading(net, x, t, margin=0.2, max_steps=50, clip=(0.0, 1.0))
    clipped = project_leading(net, x, t, margin=0.2, max_steps=50, clip=(0.0, 1.0), box_aware=False)
    assert box.converged.all()
    assert ((box.images >= 0) & (box.images <= 1)).all()
    assert (_lead(net, box.images, t) >= 0.2 - 1e-5).all()
    assert box.iterations.max() <= 3
    assert clipped.iterations.float().mean() > 2 * box.iterations.float().mean()


def test_clip_flat_logits_and_budget_are_reported():
    # Box: every iterate stays in it.
    model = Linear().eval()
    x = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    res = project_leading(model, x, torch.tensor([2, 2]), margin=0.1, clip=(0.0, 1.0))
    assert ((res.images >= 0) & (res.images <= 1)).all()
    # A budget of one step on a point needing more: not converged, one step taken, no error.
    far = torch.tensor([[3.0, 0.0]])
    ring = ThreeRing().eval()
    short = project_leading(ring, far, torch.tensor([1]), margin=0.5, max_steps=1)
    assert not short.converged[0] and short.iterations[0] == 1
    # Flat logits (zero gradient): stops at once, not converged.
    flat = nn.Linear(2, 3)
    with torch.no_grad():
        flat.weight.zero_()
        flat.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    res = project_leading(flat, torch.zeros(1, 2), torch.tensor([1]), margin=0.1)
    assert not res.converged[0] and res.iterations[0] == 0


def test_region_paths_with_both_projections_stay_in_a_three_class_annulus():
    sp = space(ThreeRing())
    a = torch.tensor([[-1.5, 0.2], [-1.5, 0.0], [0.0, 1.5]])
    b = torch.tensor([[1.5, 0.2], [1.5, 0.3], [0.1, -1.6]])
    t = torch.zeros(3, dtype=torch.long)
    for proj in ("leading", "deepfool"):
        res = find_region_path(sp, a, b, t, spacing=1e-3, projection=proj)
        s = res.stats
        assert s["success"].all() and (s["projections"] >= 1).all(), proj
        for i in range(3):
            n = int(res.n_anchors[i])
            r = res.anchors[i, :n].norm(dim=1)
            assert ((r > 1) & (r < 2)).all(), proj
        assert check_paths(sp, res, t, points_per_segment=2000)["path_ok"].all(), proj
        assert (s["length_ratio"] > 1.05).all()


def test_project_to_class_dispatches_and_rejects_unknown():
    sp = space(HalfSpace())
    x = torch.tensor([[-1.0, 0.0]])
    a = project_to_class(sp, x, torch.tensor([0]), margin=0.5)
    b = project_to_class(sp, x, torch.tensor([0]), margin=0.5, method="deepfool")
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-6)
    from somprobe.errors import PathError

    with pytest.raises(PathError, match="projection"):
        project_to_class(sp, x, torch.tensor([0]), method="newton")
    with pytest.raises(PathError, match="projection"):
        find_region_path(sp, x, x, torch.tensor([0]), projection="newton")

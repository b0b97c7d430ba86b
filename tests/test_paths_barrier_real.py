"""Barrier bypass, region paths and the convexity test on real data: scikit-learn's bundled digits
with a small MLP trained in about a second (``_tiny_digits``), natural and PGD-adversarial pairs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from somprobe.attacks import pgd
from somprobe.paths.barrier import find_barrier
from somprobe.paths.convexity import convexity_summary, convexity_test
from somprobe.paths.core import check_paths, evaluate
from somprobe.paths.regions import find_region_path
from somprobe.paths.spaces import Space

from _tiny_digits import digits_data, trained_mlp


@pytest.fixture(scope="module")
def digits():
    net = trained_mlp("softplus")
    x, y = digits_data()
    x, y = x[1500:], y[1500:]                      # held out from training
    pred = net(x).argmax(1)
    sp = Space("input", lambda z: z, net, (0.0, 1.0))
    # Natural pairs: two correctly classified images of the same class, classes 0..5.
    a_idx, b_idx = [], []
    for c in range(6):
        idx = torch.nonzero((y == c) & (pred == c)).squeeze(1)
        a_idx.append(int(idx[0]))
        b_idx.append(int(idx[1]))
    return sp, net, x, y, torch.tensor(a_idx), torch.tensor(b_idx)


BUDGET = dict(iters=200, lr=0.02, lambda_l2=0.1, lambda_hf=0.01, max_depth=4, ends="optimise",
              end_tol=0.05)


def test_barrier_bypass_on_natural_digit_pairs(digits):
    sp, net, x, y, ai, bi = digits
    a, b, t = x[ai], x[bi], y[ai]
    res = find_barrier(sp, a, b, t, **BUDGET)
    s = res.stats
    assert not s["failed"].any()
    ok = s["success"]
    assert ok.mean() >= 0.5
    # Where the method says it succeeded, a 4x denser check agrees: the path stays in the class
    # and its loss stays below the ends' level + delta (a little slack for the finer grid).
    chk = check_paths(sp, res, t, points_per_segment=4 * 33)
    assert chk["path_ok"][ok].all()
    assert (chk["max_loss"][ok] <= s["end_loss"][ok] + 1e-3 + 2e-3).all()
    n = res.n_anchors.numpy()
    assert (s["segments"] == n - 1).all() and (s["rounds"][ok] <= BUDGET["max_depth"]).all()
    assert (res.anchors >= 0).all() and (res.anchors <= 1).all()


def test_barrier_gap_natural_vs_adversarial_digits(digits):
    sp, net, x, y, ai, bi = digits
    # Natural–adversarial: a PGD image that the net puts into the class of the natural image.
    src = x[bi]
    target = (y[bi] + 1) % 10
    adv = pgd(net, src, target, eps=0.3, steps=40, step_size=0.02, targeted=True,
              generator=torch.Generator().manual_seed(0))
    hit = net(adv).argmax(1) == target
    assert hit.sum() >= 3
    nat_a = torch.stack([x[torch.nonzero((y == int(c)) & (net(x).argmax(1) == int(c))).squeeze(1)[2]]
                         for c in target[hit]])
    kw = dict(BUDGET, ends="keep")
    adv_res = find_barrier(sp, nat_a, adv[hit], target[hit], **kw)
    gaps = adv_res.stats["barrier_gap"]
    # The gap is measured from the straight line: its definition, checked directly.
    prof = evaluate(sp, torch.stack([nat_a[0] + s * (adv[hit][0] - nat_a[0]) for s in torch.linspace(0, 1, 33)]),
                    target[hit][:1].repeat(33))["loss"].double().numpy()
    assert gaps[0] == pytest.approx(prof.max() - max(prof[0], prof[-1]), rel=1e-4, abs=1e-6)
    assert np.isfinite(gaps).all() and (gaps >= 0).all()


def test_region_paths_on_natural_digit_pairs(digits):
    sp, net, x, y, ai, bi = digits
    a, b, t = x[ai], x[bi], y[ai]
    res = find_region_path(sp, a, b, t, spacing=1e-3, margin=0.5, max_depth=8)
    s = res.stats
    assert s["success"].all(), s["reason"]
    # Every anchor is in the class and a 10x denser check than the method's finds no exit.
    for p in range(len(t)):
        n = int(res.n_anchors[p])
        assert (net(res.anchors[p, :n]).argmax(1) == t[p]).all()
    assert check_paths(sp, res, t, points_per_segment=200)["path_ok"].all()
    assert (s["length_ratio"] >= 1 - 1e-9).all() and (s["anchors"] >= 3).all()


def test_convexity_on_digits(digits):
    sp, net, x, y, ai, bi = digits
    pred = net(x).argmax(1).numpy()
    ok = pred == y.numpy()
    res = convexity_test(sp, x[ok], pred[ok], ks=(2, 10), trials=200, seed=0)
    share = convexity_summary(res)["share_in_class"]
    assert ((share > 0) & (share <= 1)).all()
    # Pixel averages of many digits drift towards a blur that belongs to no class in particular.
    assert share[1] <= share[0]

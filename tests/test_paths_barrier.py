"""Barrier bypass (study 000) and low-loss inputs on toy classifiers whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from somprobe.errors import PathError
from somprobe.paths.barrier import BARRIER_EXTRAS, find_barrier
from somprobe.paths.core import check_paths, evaluate
from somprobe.paths.optimise import class_optimal_inputs, high_frequency, minimise_loss

from _toy_regions import Bump, HalfSpace, NanGradBump, NanRegion, space

FAST = dict(iters=300, lr=0.1, lambda_l2=0.0, lambda_hf=0.0)


def _ce(sp, x, t):
    return evaluate(sp, x, torch.full((len(x),), t))["loss"].numpy()


def test_bump_on_the_straight_line_is_bypassed():
    sp = space(Bump())
    a, b = torch.tensor([[-2.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    res = find_barrier(sp, a, b, torch.tensor([0]), **FAST)
    s = res.stats
    ends = max(_ce(sp, a, 0)[0], _ce(sp, b, 0)[0])
    # The straight line crosses the bump (class 1 at its centre): a large barrier.
    assert s["barrier_gap"][0] > 1.0
    assert s["success"][0] and not s["failed"][0] and s["rounds"][0] >= 1
    assert s["segments"][0] == res.n_anchors[0] - 1 >= 2
    # The found path: every point of a dense check is class 0 and below the ends' loss + delta.
    chk = check_paths(sp, res, torch.tensor([0]), points_per_segment=400)
    assert chk["path_ok"][0]
    assert chk["max_loss"][0] < ends + 1e-3 + 1e-4
    assert s["final_gap"][0] < 1e-3
    # It is a detour: longer than the line, and no anchor near the bump's centre.
    assert s["length_ratio"][0] > 1.05
    pts = res.anchors[0, : res.n_anchors[0]]
    assert (pts - torch.tensor([0.0, -0.3])).norm(dim=1).min() > 0.8
    assert torch.equal(pts[0], a[0]) and torch.equal(pts[-1], b[0])


def test_no_barrier_means_no_round():
    sp = space(HalfSpace())
    a, b = torch.tensor([[2.0, 1.0]]), torch.tensor([[3.0, -1.0]])
    s = find_barrier(sp, a, b, torch.tensor([0]), **FAST).stats
    # The loss of a logistic model is convex along the line: its maximum is at an end.
    assert s["barrier_gap"][0] == pytest.approx(0.0, abs=1e-9)
    assert s["rounds"][0] == 0 and s["segments"][0] == 1 and s["iterations"][0] == 0
    assert s["success"][0] and s["path_ok"][0] and s["length_ratio"][0] == pytest.approx(1.0)


def test_batched_equals_one_at_a_time():
    sp = space(Bump(centres=((0.0, -0.3), (0.0, 4.7))))
    a = torch.tensor([[-2.0, 0.0], [-2.0, 5.0], [3.0, 2.0], [-1.5, 0.4]])
    b = torch.tensor([[2.0, 0.0], [2.0, 5.0], [4.0, 2.5], [1.5, -0.6]])
    t = torch.zeros(4, dtype=torch.long)
    batch = find_barrier(sp, a, b, t, **FAST)
    for i in range(4):
        one = find_barrier(sp, a[i:i + 1], b[i:i + 1], t[i:i + 1], **FAST)
        n = int(one.n_anchors[0])
        assert int(batch.n_anchors[i]) == n
        torch.testing.assert_close(batch.anchors[i, :n], one.anchors[0, :n], rtol=1e-5, atol=1e-5)
        for k in ("rounds", "segments", "success", "iterations", "failed"):
            assert batch.stats[k][i] == one.stats[k][0], k
        assert batch.stats["max_loss"][i] == pytest.approx(one.stats["max_loss"][0], rel=1e-4, abs=1e-7)
    assert set(BARRIER_EXTRAS) <= set(batch.stats)


def test_high_loss_ends_are_skipped_with_their_loss():
    sp = space(Bump())
    a = torch.tensor([[0.0, -0.3], [-2.0, 0.0]])     # first pair starts inside the bump
    b = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    s = find_barrier(sp, a, b, torch.tensor([0, 0]), ends="skip", end_tol=0.1, **FAST).stats
    loss = _ce(sp, a[:1], 0)[0]
    assert s["failed"][0] and "skipped" in s["reason"][0] and f"{loss:.4g}" in s["reason"][0]
    assert s["end_loss"][0] == pytest.approx(loss)
    assert not s["failed"][1] and s["success"][1]


def test_high_loss_ends_are_optimised_first():
    sp = space(Bump())
    a = torch.tensor([[0.1, 0.3]])                   # inside the bump, off its centre
    b = torch.tensor([[2.0, 0.0]])
    res = find_barrier(sp, a, b, torch.tensor([0]), ends="optimise", end_tol=0.05, **FAST)
    s = res.stats
    assert _ce(sp, a, 0)[0] > 0.05
    assert s["ends_optimised"][0] and not s["failed"][0]
    assert s["end_loss"][0] <= 0.05
    new_a = res.anchors[0, :1]
    assert _ce(sp, new_a, 0)[0] <= 0.05 and not torch.equal(new_a, a)
    assert s["success"][0]


def test_non_converging_recursion_stops_at_the_depth_limit():
    sp = space(Bump())
    a = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [3.0, 2.0]])
    # One round bypasses the bump, but the chords A-B' and B'-C still cut the loss level set.
    s = find_barrier(sp, a, b, torch.tensor([0, 0]), max_depth=1, **FAST).stats
    assert not s["success"][0] and not s["failed"][0]
    assert "depth limit 1" in s["reason"][0] and s["rounds"][0] == 1
    assert s["final_gap"][0] >= 1e-3 and s["segments"][0] == 2
    assert s["success"][1] and s["reason"][1] == ""
    # With one more round the same pair succeeds (so the limit, not the method, stopped it).
    assert find_barrier(sp, a[:1], b[:1], torch.tensor([0]), max_depth=2, **FAST).stats["success"][0]


def test_barrier_point_stuck_above_delta_stops_the_pair():
    sp = space(Bump())
    a = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [3.0, 2.0]])
    # No Adam steps: the barrier point cannot move, so recursing around it is pointless.
    s = find_barrier(sp, a, b, torch.tensor([0, 0]), iters=0).stats
    assert not s["success"][0] and not s["failed"][0] and s["rounds"][0] == 1
    assert "raise iters or lr" in s["reason"][0] and np.isnan(s["max_loss"][0])
    assert s["success"][1]


@pytest.mark.parametrize("kw", [dict(delta=0), dict(delta=-1e-3), dict(delta=float("nan")),
                                dict(iters=-1), dict(lambda_l2=-0.1), dict(lambda_hf=-1.0),
                                dict(lr=0), dict(max_depth=-1), dict(points_per_segment=2),
                                dict(end_iters=-5), dict(ends="maybe"), dict(hf="fourier"),
                                dict(end_tol=0)])
def test_bad_parameters_raise_a_clear_error(kw):
    sp = space(Bump())
    with pytest.raises(PathError) as e:
        find_barrier(sp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([0]), **kw)
    assert next(iter(kw)) in str(e.value)


def test_non_finite_gradient_stops_only_that_pair():
    sp = space(NanGradBump(centres=((0.0, -0.3), (13.0, -0.3))))
    a = torch.tensor([[11.0, 0.0], [-2.0, 0.0]])
    b = torch.tensor([[15.0, 0.0], [2.0, 0.0]])
    s = find_barrier(sp, a, b, torch.tensor([0, 0]), **FAST).stats
    assert s["failed"][0] and "non-finite" in s["reason"][0] and not s["success"][0]
    assert not s["failed"][1] and s["success"][1]


def test_non_finite_loss_on_the_line_stops_only_that_pair():
    sp = space(NanRegion())
    a = torch.tensor([[-3.0, 5.0], [0.0, 0.0]])
    b = torch.tensor([[3.0, 5.0], [1.0, 1.0]])
    s = find_barrier(sp, a, b, torch.tensor([0, 0]), **FAST).stats
    assert s["failed"][0] and "non-finite loss on a segment" in s["reason"][0]
    assert s["success"][1] and not s["failed"][1]


def test_minimise_loss_rows_are_independent_and_stop_at_tol():
    sp = space(HalfSpace())
    x0 = torch.tensor([[-1.0, 0.0], [-3.0, 0.0], [2.0, 0.0]])
    t = torch.zeros(3, dtype=torch.long)
    res = minimise_loss(sp.logits, x0, t, iters=500, lr=0.05, lambda_l2=0.0, lambda_hf=0.0, tol=0.01)
    assert res.converged.all() and (res.loss <= 0.01).all()
    # Already below tol: no step at all.
    assert res.iterations[2] == 0 and torch.equal(res.x[2], x0[2])
    # The farther start needs more steps.
    assert res.iterations[1] > res.iterations[0] > 0
    one = minimise_loss(sp.logits, x0[1:2], t[1:2], iters=500, lr=0.05, lambda_l2=0.0,
                        lambda_hf=0.0, tol=0.01)
    torch.testing.assert_close(one.x[0], res.x[1])
    assert one.iterations[0] == res.iterations[1]


def test_high_frequency_penalties_by_hand():
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1.0
    # TV: 2 unit jumps among the 6 vertical and 2 among the 6 horizontal neighbour pairs.
    assert high_frequency(x, "tv").item() == pytest.approx(2 / 6 + 2 / 6)
    # Laplacian at the single interior pixel: 4·1 − 0 = 4, squared.
    assert high_frequency(x, "laplacian").item() == pytest.approx(16.0)
    assert high_frequency(torch.ones(2, 5), "tv").tolist() == [0.0, 0.0]   # no spatial layout
    flat = torch.full((1, 3, 4, 4), 0.3)
    assert high_frequency(flat, "tv").item() == 0.0 and high_frequency(flat, "laplacian").item() == 0.0


def test_class_optimal_inputs_from_noise_are_seeded_and_low_loss():
    torch.manual_seed(123)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4))
    with torch.no_grad():
        net[1].weight.mul_(10)      # reachable from the [0, 1] box
    classes = np.array([0, 1, 2, 3, 3])
    kw = dict(iters=400, lr=0.05, tol=1e-2, lambda_hf=0.01)
    r1 = class_optimal_inputs(net, classes, (3, 6, 6), seed=7, **kw)
    r2 = class_optimal_inputs(net, classes, (3, 6, 6), seed=7, **kw)
    r3 = class_optimal_inputs(net, classes, (3, 6, 6), seed=8, **kw)
    assert torch.equal(r1.x, r2.x) and not torch.equal(r1.x, r3.x)
    assert r1.converged.all() and (r1.loss <= 1e-2).all()
    assert (net(r1.x).argmax(1).numpy() == classes).all()
    assert r1.x.min() >= 0 and r1.x.max() <= 1


def test_anchor_set_keeps_path_order_and_pads_with_the_last_anchor():
    from somprobe.paths.anchors import AnchorSet, segment_values

    a = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    b = torch.tensor([[4.0, 0.0], [14.0, 10.0]])
    s = AnchorSet(a, b)
    m = s.insert(np.array([0]), np.array([2]), torch.tensor([[2.0, 1.0]]))          # pair 0: a-m-b
    s.insert(np.array([0]), m, torch.tensor([[1.0, 1.0]]))                            # a-q-m-b
    s.insert(m, np.array([2]), torch.tensor([[3.0, 1.0]]))                            # a-q-m-r-b
    anchors, n = s.padded()
    assert n.tolist() == [5, 2]
    assert anchors[0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    # padding repeats the last valid anchor
    assert torch.equal(anchors[1, 2:], b[1].expand(3, 2))
    # ragged sampling: segment 0 in 4 intervals, segment 1 in 2, ends included, in order of t
    vals, seg, t = segment_values(lambda x: x, a, b, [4, 2], shape=(2,), chunk=3)
    assert seg.tolist() == [0] * 5 + [1] * 3
    assert np.allclose(t, [0, .25, .5, .75, 1, 0, .5, 1])
    assert torch.allclose(vals[:5, 0], torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))

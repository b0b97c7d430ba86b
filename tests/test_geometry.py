"""Geometry primitives against hand-worked quadratics, brute-force Hessians and dense eigh."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from somprobe.errors import GeometryError
from somprobe.geometry import (Margin, boundary_points, class_curvatures, directional_curvature,
                               hvp, lanczos_extremes, principal_curvatures, projected_hvp,
                               projection_ratio, random_directions, shared_subspace,
                               subspace_noise_flips)

from _tiny_digits import digits_data, trained_mlp


class Quadratic:
    """F(x) = ½ xᵀAx + bᵀx + c on vectors of length d (points [n, *E, d])."""

    def __init__(self, A, b, c=0.0):
        self.A, self.b, self.c = A, b, c

    def __call__(self, p, rows=None):
        return 0.5 * torch.einsum("...i,ij,...j->...", p, self.A, p) + p @ self.b + self.c


def _rotated_quadratic(dtype=torch.float64):
    # At z = 0: ∇F = b = 2·q1, P A P / ||∇F|| restricted to the tangent space has the
    # eigenvalues a_2..a_6 / 2 = 1.5, -0.5, 0.25, -2, 1 (A = Q diag(a) Qᵀ).
    a = torch.tensor([10.0, 3.0, -1.0, 0.5, -4.0, 2.0], dtype=dtype)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    Q = Q.to(dtype)
    A = Q @ torch.diag(a) @ Q.T
    return Quadratic(A, 2.0 * Q[:, 0]), Q


@pytest.mark.parametrize("method", ["exact", "fd"])
def test_quadratic_principal_curvatures_are_hand_worked(method):
    F, Q = _rotated_quadratic()
    z = torch.zeros(2, 6, dtype=torch.float64)
    pc = principal_curvatures(F, z, k=2, iters=5, method=method, h=0.1, vectors=True)
    assert torch.allclose(pc.top, torch.tensor([[1.5, 1.0]] * 2, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(pc.bottom, torch.tensor([[-2.0, -0.5]] * 2, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(pc.grad_norm, torch.full((2,), 2.0, dtype=torch.float64))
    # principal directions: ±q2 (a=3) on top, ±q5 (a=-4) at the bottom
    assert math.isclose(abs(float(pc.top_vectors[0, 0] @ Q[:, 1])), 1.0, abs_tol=1e-6)
    assert math.isclose(abs(float(pc.bottom_vectors[0, 0] @ Q[:, 4])), 1.0, abs_tol=1e-6)


def test_quadratic_directional_curvature_and_hvp():
    F, Q = _rotated_quadratic()
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = random_directions(3, 4, (6,), seed=1, dtype=torch.float64)
    for method in ("exact", "fd"):
        assert torch.allclose(hvp(F, z, v, method=method, h=0.3), v @ F.A, atol=1e-9)
    g = z @ F.A + F.b  # ∇F(z)
    n = g / g.norm(dim=1, keepdim=True)
    pv = v - (v * n[:, None]).sum(-1, keepdim=True) * n[:, None]
    expected = torch.einsum("bti,ij,btj->bt", pv, F.A, pv) / g.norm(dim=1)[:, None]
    assert torch.allclose(directional_curvature(F, z, v, method="fd", h=0.2), expected, atol=1e-9)
    # G v itself: P A P v / ||g||
    Gv = projected_hvp(F, z, v, method="exact")
    Apv = pv @ F.A
    assert torch.allclose(Gv, (Apv - (Apv * n[:, None]).sum(-1, keepdim=True) * n[:, None])
                          / g.norm(dim=1)[:, None, None], atol=1e-9)


@pytest.fixture(scope="module")
def smooth():
    model = copy.deepcopy(trained_mlp("softplus")).double()
    x, _ = digits_data()
    x = x[1500:1503].double()
    k_hat = model(x).argmax(1)
    i = model(x).topk(2, dim=1).indices[:, 1]
    return model, x, Margin(model, i, k_hat)


def _brute_hessian(F, x, b):
    def f(p):
        return F(p[None], torch.tensor([b]))[0]

    return torch.autograd.functional.hessian(f, x[b]).reshape(64, 64)


def test_hvp_double_backprop_and_fd_match_brute_force_hessian_on_smooth_net(smooth):
    model, x, F = smooth
    v = random_directions(3, 5, x.shape[1:], seed=2, dtype=torch.float64)
    exact = hvp(F, x, v, method="exact")
    fd = hvp(F, x, v, method="fd", h=1e-4)
    for b in range(3):
        H = _brute_hessian(F, x, b)
        ref = v[b].reshape(5, 64) @ H.T
        assert torch.allclose(exact[b].reshape(5, 64), ref, atol=1e-10)
        assert torch.allclose(fd[b].reshape(5, 64), ref, atol=1e-6 * float(ref.abs().max()) + 1e-9)
        assert float(ref.abs().max()) > 1e-3  # a smooth net: the Hessian is not zero


def test_lanczos_principal_curvatures_match_dense_eigh(smooth):
    model, x, F = smooth
    k = 3
    pc = principal_curvatures(F, x, k=k, method="exact", iters=40)
    full = principal_curvatures(F, x, k=k, method="exact", iters=63)
    for b in range(3):
        H = _brute_hessian(F, x, b)
        xb = x[b:b + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F(xb, torch.tensor([b])).sum(), xb)
        g = g.reshape(64)
        n = g / g.norm()
        P = torch.eye(64, dtype=torch.float64) - torch.outer(n, n)
        G = P @ H @ P / g.norm()
        # eigenvalues on the tangent space: drop the one for the normal n (eigenvalue 0 of G)
        basis = torch.linalg.svd(P)[0][:, :63]
        ev = torch.linalg.eigvalsh(basis.T @ G @ basis)
        assert torch.allclose(full.top[b], ev.flip(0)[:k], atol=1e-8)
        assert torch.allclose(full.bottom[b], ev[:k], atol=1e-8)
        assert torch.allclose(pc.top[b], ev.flip(0)[:k], rtol=1e-3, atol=1e-6)
        assert torch.allclose(pc.bottom[b], ev[:k], rtol=1e-3, atol=1e-6)


def test_batched_lanczos_on_random_symmetric_matrices():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(4, 50, 50, generator=gen, dtype=torch.float64)
    M = M + M.transpose(1, 2)
    top, bottom = lanczos_extremes(lambda u: torch.einsum("bij,bj->bi", M, u),
                                   torch.randn(4, 50, generator=gen, dtype=torch.float64), 4, iters=50)
    ev = torch.linalg.eigvalsh(M)
    assert torch.allclose(top, ev.flip(1)[:, :4], atol=1e-8)
    assert torch.allclose(bottom, ev[:, :4], atol=1e-8)
    # a rank-2 operator: Lanczos breaks down after 2 steps and must restart, not divide by zero
    u = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    R = torch.einsum("bi,bj->bij", u, u) * 2.0
    top, bottom = lanczos_extremes(lambda w: torch.einsum("bij,bj->bi", R, w), torch.randn(3, 20, dtype=torch.float64), 2, iters=10)
    assert torch.allclose(top[:, 0], 2 * u.pow(2).sum(1), atol=1e-8)
    assert torch.allclose(top[:, 1], torch.zeros(3, dtype=torch.float64), atol=1e-8)


def test_relu_net_exact_hvp_vanishes_fd_does_not():
    model = trained_mlp("relu")
    x, _ = digits_data()
    x = x[1500:1504]
    k_hat = model(x).argmax(1)
    F = Margin(model, model(x).topk(2, dim=1).indices[:, 1], k_hat)
    v = random_directions(4, 3, x.shape[1:], seed=0)
    assert float(hvp(F, x, v, method="exact").abs().max()) == 0.0
    assert float(hvp(F, x, v, method="fd", h=0.5).abs().max()) > 0.0


def test_class_curvatures_is_algorithm_2_of_directional_curvature(smooth):
    model, x, _ = smooth
    dirs = random_directions(3, 6, x.shape[1:], seed=4, dtype=torch.float64)
    cc = class_curvatures(model, x, directions=dirs, method="exact", chunk=17)
    k_hat = model(x).argmax(1)
    assert torch.equal(cc.predicted, k_hat)
    assert bool(cc.per_class.gather(1, k_hat[:, None]).isnan().all())
    for i in range(10):
        m = k_hat != i
        F = Margin(model, torch.full((int(m.sum()),), i), k_hat[m])
        ref = directional_curvature(F, x[m], dirs[m], method="exact").mean(1)
        assert torch.allclose(cc.per_class[m, i], ref, atol=1e-10)
    assert torch.allclose(cc.rho, torch.nanmean(cc.per_class, dim=1))
    assert torch.equal(cc.recovered, torch.nan_to_num(cc.per_class, nan=-float("inf")).argmax(1))


def test_shared_subspace_projection_ratios_on_a_constructed_case():
    d = 10
    e = torch.eye(d, dtype=torch.float64)
    directions = torch.stack([e[0] * 3, e[1] * 2, e[2], e[0] + e[1], e[2] * 0.5])  # all in span(e0,e1,e2)
    basis, s = shared_subspace(directions, 3)
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s[3:], torch.zeros(2, dtype=torch.float64), atol=1e-12)
    v = torch.stack([e[1] + e[2], e[5], e[0] + e[7]])
    assert torch.allclose(projection_ratio(v, basis), torch.tensor([1.0, 0.0, 1 / math.sqrt(2)], dtype=torch.float64))
    with pytest.raises(GeometryError, match="subspace dimension"):
        shared_subspace(directions, 6)
    with pytest.raises(GeometryError, match="zero length"):
        projection_ratio(torch.zeros(1, d, dtype=torch.float64), basis)


def test_noise_in_subspace_vs_complement_on_a_linear_classifier():
    # A linear classifier whose decision depends on e0 only: noise in S = span(e0) flips it at
    # magnitudes beyond the margin, noise in S⊥ never does.
    class Lin(torch.nn.Module):
        def forward(self, x):
            s = x.flatten(1)[:, 0] - 0.5
            return torch.stack([-s, s], 1)

    x = torch.full((20, 1, 2, 2), 0.4)  # margin 0.1 from the boundary along e0
    basis = torch.eye(4)[:, :1]
    flips_s = subspace_noise_flips(Lin(), x, basis, [0.05, 0.2], seed=0)
    flips_p = subspace_noise_flips(Lin(), x, basis, [0.05, 0.2], complement=True, seed=0)
    assert not bool(flips_s[:, 0].any()) and not bool(flips_p.any())
    assert 0.2 < float(flips_s[:, 1].float().mean()) < 0.8  # half the directions point across


def test_boundary_points_on_digits_lie_on_the_boundary():
    model = trained_mlp("relu")
    x, _ = digits_data()
    x = x[1500:1516]
    bp = boundary_points(model, x)
    assert bool(bp.converged.all())
    logits = model(bp.z)
    F = logits.gather(1, bp.other_class[:, None]) - logits.gather(1, bp.clean_class[:, None])
    scale = model(x).std(1)
    assert bool((F.squeeze(1).abs() < 1e-4 * scale).all())
    assert bool((bp.other_class != bp.clean_class).all())
    assert bool((bp.r.flatten(1).norm(dim=1) <= (bp.adversarial - x).flatten(1).norm(dim=1) + 1e-6).all())
    pc = principal_curvatures(Margin(model, bp.other_class, bp.clean_class), bp.z, k=3, h=0.05)
    assert bool((pc.top[:, 0] >= pc.bottom[:, 0]).all())
    assert bool(torch.isfinite(pc.top).all())


def test_bad_inputs():
    F, _ = _rotated_quadratic()
    z = torch.zeros(1, 6, dtype=torch.float64)
    v = random_directions(1, 2, (6,), dtype=torch.float64)
    for h in (0, -1, float("nan"), "x"):
        with pytest.raises(GeometryError, match="h must be"):
            hvp(F, z, v, h=h)
    with pytest.raises(GeometryError, match="method"):
        hvp(F, z, v, method="newton")
    with pytest.raises(GeometryError, match="k=3 is too large"):
        principal_curvatures(F, z, k=3)
    with pytest.raises(GeometryError, match="zero"):
        directional_curvature(Quadratic(F.A, torch.zeros(6, dtype=torch.float64)), z, v)
    with pytest.raises(GeometryError, match="directions"):
        random_directions(1, 0, (6,))


def test_softplus_surrogate_gives_start_independent_curvatures():
    from somprobe.geometry import softplus_surrogate
    from somprobe.models import build_model

    model = trained_mlp("relu")
    x, _ = digits_data()
    x = x[1500:1503]
    smooth = softplus_surrogate(model, beta=20.0)
    assert isinstance(model.act, torch.nn.ReLU) and isinstance(smooth.act, torch.nn.Softplus)
    assert float((smooth(x) - model(x)).abs().max()) < 0.5  # close to the ReLU net
    top2 = smooth(x).topk(2, dim=1).indices
    F = Margin(smooth, top2[:, 1], top2[:, 0])
    a = principal_curvatures(F, x, k=3, method="exact", seed=0)
    b = principal_curvatures(F, x, k=3, method="exact", seed=1)
    assert torch.allclose(a.top, b.top, rtol=1e-3, atol=1e-5)
    assert torch.allclose(a.bottom, b.bottom, rtol=1e-3, atol=1e-5)
    assert float(a.top.abs().max()) > 0
    with pytest.raises(GeometryError, match="beta"):
        softplus_surrogate(model, beta=0)
    with pytest.raises(GeometryError, match="no nn.ReLU"):
        softplus_surrogate(trained_mlp("softplus"))
    resnet = softplus_surrogate(build_model("test_resnet", num_classes=10, seed=0), 10.0)
    assert not any(isinstance(m, torch.nn.ReLU) for m in resnet.modules())


def test_lanczos_early_stop_per_sample_matches_eigvalsh_and_shrinks_the_batch():
    # Two operators whose extreme eigenvalues stand far from a cluster converge in a few steps;
    # two with a spread spectrum need more: the samples stop at different steps, and once a
    # sample has stopped it is no longer passed to matvec. A fifth operator with 6 distinct
    # eigenvalues (repeated) breaks down at step 6 and must run on to find the repeats.
    gen = torch.Generator().manual_seed(5)
    d, k = 40, 2
    Q, _ = torch.linalg.qr(torch.randn(3, d, d, generator=gen, dtype=torch.float64))
    far = torch.cat([torch.tensor([-40.0, -20.0, 20.0, 40.0], dtype=torch.float64),
                     torch.rand(d - 4, generator=gen, dtype=torch.float64) * 2 - 1])
    few = torch.tensor([-3.0, -1.0, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64).repeat_interleave(7)[:d]
    diag = torch.stack([far, far.flip(0), few])
    easy = Q @ torch.diag_embed(diag) @ Q.transpose(1, 2)
    R = torch.randn(2, d, d, generator=gen, dtype=torch.float64)
    M = torch.cat([easy[:2], R + R.transpose(1, 2), easy[2:]])
    seen = []

    def matvec(u, index):
        seen.append(index.tolist())
        return torch.einsum("bij,bj->bi", M[index], u)

    v0 = torch.randn(5, d, generator=gen, dtype=torch.float64)
    top, bottom, steps = lanczos_extremes(matvec, v0, k, iters=d, tol=1e-10, check_every=1,
                                          return_steps=True)
    ev = torch.linalg.eigvalsh(M)
    assert torch.allclose(top, ev.flip(1)[:, :k], atol=1e-8)
    assert torch.allclose(bottom, ev[:, :k], atol=1e-8)
    assert torch.allclose(top[4], torch.tensor([4.0, 4.0], dtype=torch.float64), atol=1e-8)  # the repeat
    s = steps.tolist()
    assert max(s[:2]) < min(s[2:4]) and s[4] == d, s
    assert seen[s[0] - 1].count(0) == 1 and all(0 not in idx for idx in seen[max(s[:2]):])
    assert len(seen) == max(s)
    # without tol: every sample runs all iterations, same values
    top2, bottom2, steps2 = lanczos_extremes(lambda u: torch.einsum("bij,bj->bi", M, u), v0, k,
                                             iters=d, return_steps=True)
    assert steps2.tolist() == [d] * 5
    assert torch.allclose(top2, top, atol=1e-8) and torch.allclose(bottom2, bottom, atol=1e-8)
    with pytest.raises(GeometryError, match="tol"):
        lanczos_extremes(matvec, v0, 2, tol=-1.0)


def test_principal_curvatures_alone_equal_batched_on_a_relu_net(smooth):
    # The finite-difference operator of a ReLU net is not linear, so its Lanczos values depend on
    # the start vector: every sample starts from the same one, so a sample's curvatures do not
    # depend on the batch it is in (nor on its position).
    model = trained_mlp("relu")
    x, _ = digits_data()
    x = x[1500:1506]
    top2 = model(x).topk(2, dim=1).indices
    F = Margin(model, top2[:, 1], top2[:, 0])
    batched = principal_curvatures(F, x, k=3, h=0.5)
    assert float(batched.top.abs().max()) > 0
    assert batched.steps.tolist() == [26] * 6  # default: no early stop
    for b in (0, 4):
        alone = principal_curvatures(Margin(model, top2[b:b + 1, 1], top2[b:b + 1, 0]), x[b:b + 1], k=3, h=0.5)
        assert torch.allclose(alone.top[0], batched.top[b], rtol=1e-5, atol=1e-6)
        assert torch.allclose(alone.bottom[0], batched.bottom[b], rtol=1e-5, atol=1e-6)
    rev = principal_curvatures(Margin(model, top2.flip(0)[:, 1], top2.flip(0)[:, 0]), x.flip(0), k=3, h=0.5)
    assert torch.allclose(rev.top.flip(0), batched.top, rtol=1e-5, atol=1e-6)
    # a smooth net with exact products: early-stopped samples give the full-iteration values
    _, xs, Fs = smooth
    full = principal_curvatures(Fs, xs, k=3, method="exact", iters=40)
    early = principal_curvatures(Fs, xs, k=3, method="exact", iters=40, tol=1e-8)
    assert bool((early.steps < 40).all()), early.steps
    assert torch.allclose(early.top, full.top, rtol=1e-6, atol=1e-9)
    assert torch.allclose(early.bottom, full.bottom, rtol=1e-6, atol=1e-9)

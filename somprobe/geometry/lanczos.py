"""Batched Lanczos with full reorthogonalisation, and the principal curvatures of a boundary.

:func:`lanczos_extremes` runs Lanczos for ``B`` symmetric operators at once (one batched
matrix-vector product per iteration serves every sample), so the cost of the Hessian-vector
products is that of a batch, not of ``B`` separate runs. The extreme Ritz values converge first;
``iters`` of about ``2k + 20`` give the ``k`` largest and smallest eigenvalues of a ``d``-dim
operator to the accuracy the finite-difference Hessian allows (tested against ``eigh``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GeometryError
from .hessian import DEFAULT_H, _normal, gradient, projected_hvp

__all__ = ["lanczos_extremes", "principal_curvatures", "PrincipalCurvatures", "default_iters"]


def default_iters(k: int, d: int) -> int:
    """Lanczos iterations used for the ``k`` extreme eigenvalues of a ``d``-dim operator."""
    return int(min(d, max(2 * k + 20, 3 * k)))


def lanczos_extremes(matvec, v0: torch.Tensor, k: int, *, iters: int | None = None,
                     constraint=None, vectors: bool = False, generator: torch.Generator | None = None):
    """The ``k`` largest and ``k`` smallest eigenpairs of ``B`` symmetric operators at once.

    Parameters
    ----------
    matvec : callable
        ``[B, d] -> [B, d]``, the ``B`` operators applied row by row.
    v0 : Tensor [B, d]
        Start vectors (non-zero).
    k : int
        Eigenvalues wanted at each end (``2k <= iters``).
    iters : int, optional
        Krylov dimension ``m``; default :func:`default_iters`.
    constraint : callable, optional
        Projection applied to every new Lanczos vector (e.g. onto a tangent space, so the
        operator is studied on that subspace only).
    vectors : bool
        Also return the Ritz vectors.
    generator : torch.Generator, optional
        Restart vectors after an invariant subspace is found (breakdown).

    Returns
    -------
    top : Tensor [B, k] (descending), bottom : Tensor [B, k] (ascending), and when ``vectors``
    top_vectors, bottom_vectors : Tensor [B, k, d].
    """
    b, d = v0.shape
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GeometryError(f"k must be an integer >= 1, got {k!r}")
    m = default_iters(k, d) if iters is None else int(iters)
    limit = d - 1 if constraint is not None else d
    if 2 * k > limit:
        raise GeometryError(f"k={k} is too large: 2k eigenvalues are wanted from an operator of "
                            f"dimension {limit}; use k <= {limit // 2}")
    if m < 2 * k or m > limit:
        raise GeometryError(f"iters must be in [2k, {limit}] = [{2 * k}, {limit}], got {m}")
    proj = constraint if constraint is not None else (lambda u: u)
    dtype = v0.dtype
    V = torch.zeros(b, m, d, dtype=dtype, device=v0.device)
    alpha = torch.zeros(b, m, dtype=dtype, device=v0.device)
    beta = torch.zeros(b, m, dtype=dtype, device=v0.device)
    q = proj(v0)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    for j in range(m):
        V[:, j] = q
        w = matvec(q)
        a = (w * q).sum(1)
        alpha[:, j] = a
        # Full reorthogonalisation (twice is enough): FD Hessians are slightly non-symmetric
        # and rounding would otherwise bring back converged directions.
        for _ in range(2):
            w = w - torch.einsum("bmd,bm->bd", V[:, : j + 1], torch.einsum("bmd,bd->bm", V[:, : j + 1], w))
        w = proj(w)
        if j + 1 == m:
            break
        nb = w.norm(dim=1)
        beta[:, j] = nb
        scale = (alpha[:, : j + 1].abs().amax(1) + beta[:, : j + 1].amax(1)).clamp_min(1e-30)
        broke = nb <= 1e-10 * scale
        if bool(broke.any()):
            # Invariant subspace found: continue with a fresh direction orthogonal to V; the
            # zero beta decouples the blocks of the tridiagonal matrix, whose eigenvalues stay valid.
            fresh = torch.randn((b, d), generator=gen, dtype=torch.float64).to(w)
            Vj = V[:, : j + 1]
            for _ in range(2):
                fresh = proj(fresh - torch.einsum("bmd,bm->bd", Vj, torch.einsum("bmd,bd->bm", Vj, fresh)))
            w = torch.where(broke[:, None], fresh / fresh.norm(dim=1, keepdim=True).clamp_min(1e-30), w)
            beta[:, j] = torch.where(broke, torch.zeros_like(nb), nb)
            nb = torch.where(broke, torch.ones_like(nb), nb)
        q = w / nb[:, None]
    T = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + torch.diag_embed(beta[:, :-1], -1)
    theta, S = torch.linalg.eigh(T.double())
    theta = theta.to(dtype)
    top = theta.flip(1)[:, :k]
    bottom = theta[:, :k]
    if not vectors:
        return top, bottom
    ritz = torch.einsum("bmd,bmr->brd", V, S.to(dtype))  # [B, m, d], ascending eigenvalues
    return top, bottom, ritz.flip(1)[:, :k], ritz[:, :k]


@dataclass
class PrincipalCurvatures:
    """Extreme principal curvatures of the level set of ``F`` through each point.

    Attributes
    ----------
    top : Tensor [B, k]
        Largest eigenvalues of ``P H P / ||∇F||`` (descending).
    bottom : Tensor [B, k]
        Smallest eigenvalues (ascending).
    top_vectors, bottom_vectors : Tensor [B, k, *input_shape] or None
        Principal directions (unit, tangent), when asked for.
    grad_norm : Tensor [B]
        ``||∇F||`` at the points.
    """

    top: torch.Tensor
    bottom: torch.Tensor
    top_vectors: torch.Tensor | None
    bottom_vectors: torch.Tensor | None
    grad_norm: torch.Tensor


def principal_curvatures(F, z: torch.Tensor, *, k: int = 10, iters: int | None = None,
                         method: str = "fd", h: float = DEFAULT_H, rows=None, chunk=None,
                         vectors: bool = False, seed: int = 0) -> PrincipalCurvatures:
    """The ``k`` largest and smallest principal curvatures (eigenvalues of study 002's
    ``P H P / ||∇F||``) at every point, by batched Lanczos on the tangent space.

    Parameters
    ----------
    F : margin function
        See :mod:`somprobe.geometry.margin` (e.g. ``Margin(model, i, k_hat)``).
    z : Tensor [B, *input_shape]
        Points (boundary points ``x + r(x)`` in study 002).
    k : int
        Eigenvalues at each end; ``2k`` must not exceed ``d - 1``.
    iters : int, optional
        Lanczos iterations (default :func:`default_iters`), one batched Hessian-vector product
        each.
    method, h, rows, chunk
        As in :func:`somprobe.geometry.hvp`.
    vectors : bool
        Also return the principal directions.
    seed : int
        Seeds the start vectors.

    Returns
    -------
    PrincipalCurvatures
    """
    z = z.detach()
    b, shape = z.shape[0], z.shape[1:]
    d = int(torch.tensor(shape).prod()) if len(shape) else 1
    _, grad = gradient(F, z, rows=rows, chunk=chunk)
    n, gn = _normal(grad)
    nf = n.flatten(1)

    def constraint(u):
        return u - nf * (u * nf).sum(1, keepdim=True)

    def matvec(u):
        gv = projected_hvp(F, z, u.view(b, 1, *shape), grad=grad, method=method, h=h, rows=rows,
                           chunk=chunk)
        return gv.view(b, d)

    gen = torch.Generator().manual_seed(int(seed))
    v0 = torch.randn((b, d), generator=gen, dtype=torch.float64).to(z)
    out = lanczos_extremes(matvec, v0, k, iters=iters, constraint=constraint, vectors=vectors,
                           generator=gen)
    if vectors:
        top, bottom, tv, bv = out
        return PrincipalCurvatures(top, bottom, tv.view(b, k, *shape), bv.view(b, k, *shape), gn)
    top, bottom = out
    return PrincipalCurvatures(top, bottom, None, None, gn)

"""Hessian-vector products of a margin function in input space, the tangent projection of the
boundary's shape operator, and directional curvatures — batched over samples and directions.

Two ways to get ``H v``:

* ``method="exact"``: double backpropagation (the gradient of ``<grad F, v>``). Exact, but for a
  piecewise-linear network (ReLU, max-pool, BatchNorm in eval mode) the Hessian is zero almost
  everywhere, so it returns zeros there: use it for smooth networks (softplus, tanh, GELU).
* ``method="fd"`` (default): central finite differences of gradients,
  ``H v ≈ (∇F(z + h u) - ∇F(z - h u)) / (2h) · ||v||`` with ``u = v / ||v||``: ``h`` is an L2
  step in input (pixel) units. On a ReLU network it measures how the piecewise-constant gradient
  changes over a ball of radius ``h`` — the curvature of the boundary at scale ``h``. The error is
  O(h²) on smooth functions and rounding grows as 1/h; ``h_sweep`` in the geometry job shows how
  the estimate depends on ``h`` (default ``DEFAULT_H``).

Study 002's shape operator of the boundary ``{F = 0}`` at ``z`` is ``G = P H P / ||∇F||`` with
``P = I - n nᵀ``, ``n = ∇F / ||∇F||``; its eigenvalues are the principal curvatures and
``vᵀ G v`` (``v`` unit, uniform on the sphere) the quantity Algorithm 2 averages.

Every function splits the samples into chunks so that at most ``chunk`` points go through the
model at once (a loop over chunks of samples, never over single samples or directions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import GeometryError
from .margin import Margin, margin_grad

__all__ = [
    "DEFAULT_H", "METHODS", "check_h", "gradient", "hvp", "project_tangent", "projected_hvp",
    "random_directions", "directional_curvature", "class_curvatures", "ClassCurvature",
]

METHODS = ("fd", "exact")
DEFAULT_H = 0.05
DEFAULT_CHUNK = 4096


def check_h(h) -> float:
    """Validate a finite-difference step: a finite number > 0."""
    try:
        h = float(h)
    except (TypeError, ValueError):
        raise GeometryError(f"h must be a number, got {h!r}") from None
    if not math.isfinite(h) or h <= 0:
        raise GeometryError(f"h must be a finite step > 0 (an L2 distance in input units, e.g. "
                            f"{DEFAULT_H}), got {h}")
    return h


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise GeometryError(f"unknown Hessian method {method!r}; use 'fd' (finite differences, for "
                            f"ReLU networks) or 'exact' (double backprop, smooth networks)")
    return method


def _chunks(n: int, per_sample: int, chunk: int | None):
    size = max(1, (chunk or DEFAULT_CHUNK) // max(per_sample, 1))
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


def _rows(n, rows, device):
    return torch.arange(n, device=device) if rows is None else torch.as_tensor(rows, device=device).long()


def _bdot(a: torch.Tensor, b: torch.Tensor, keep: int) -> torch.Tensor:
    """Dot products over the trailing dimensions after the first ``keep``."""
    return (a * b).flatten(keep).sum(-1)


def gradient(F, z: torch.Tensor, *, rows=None, chunk: int | None = None):
    """``F(z)`` and ``∇F(z)`` of every sample: ``([B], [B, *input_shape])``."""
    rows = _rows(z.shape[0], rows, z.device)
    vals, grads = [], []
    for sl in _chunks(z.shape[0], 1, chunk):
        v, g = margin_grad(F, z[sl], rows[sl])
        vals.append(v)
        grads.append(g)
    return torch.cat(vals), torch.cat(grads)


def hvp(F, z: torch.Tensor, v: torch.Tensor, *, method: str = "fd", h: float = DEFAULT_H,
        rows=None, chunk: int | None = None) -> torch.Tensor:
    """Hessian-vector products ``H_F(z_b) v_bt`` for every sample ``b`` and direction ``t``.

    Parameters
    ----------
    F : margin function
        See :mod:`somprobe.geometry.margin`.
    z : Tensor [B, *input_shape]
        Points.
    v : Tensor [B, T, *input_shape]
        Directions (any norm; zero directions give zero).
    method : {"fd", "exact"}
        Central finite differences of gradients (step ``h``) or double backprop.
    h : float
        Finite-difference step (L2, input units).
    rows : LongTensor [B], optional
        Sample index of each row for ``F`` (default ``arange(B)``).
    chunk : int, optional
        Most points through the model at once.

    Returns
    -------
    Tensor [B, T, *input_shape]
    """
    method = _check_method(method)
    h = check_h(h)
    if v.shape[0] != z.shape[0] or v.shape[2:] != z.shape[1:]:
        raise GeometryError(f"directions must have shape [B, T, *input] = [{z.shape[0]}, T, "
                            f"{', '.join(map(str, z.shape[1:]))}], got {tuple(v.shape)}")
    rows = _rows(z.shape[0], rows, z.device)
    b, t = v.shape[:2]
    out = []
    for sl in _chunks(b, t * (2 if method == "fd" else 1), chunk):
        zs, vs = z[sl].detach(), v[sl].detach()
        if method == "exact":
            with torch.enable_grad():
                pts = zs[:, None].expand(vs.shape).clone().requires_grad_(True)
                _, g = margin_grad(F, pts, rows[sl], create_graph=True)
                (hv,) = torch.autograd.grad(_bdot(g, vs, 2).sum(), pts, allow_unused=True)
            out.append(torch.zeros_like(vs) if hv is None else hv.detach())
        else:
            norm = vs.flatten(2).norm(dim=2)
            shape = norm.shape + (1,) * (vs.ndim - 2)
            u = vs / norm.clamp_min(1e-30).view(shape)
            pts = torch.stack([zs[:, None] + h * u, zs[:, None] - h * u], dim=2)  # [b, T, 2, ...]
            _, g = margin_grad(F, pts, rows[sl])
            out.append((g[:, :, 0] - g[:, :, 1]) * (norm / (2 * h)).view(shape))
    return torch.cat(out)


def project_tangent(v: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``P v = v - n <n, v>`` for unit normals ``n [B, *in]`` and vectors ``v [B, T, *in]``."""
    coef = _bdot(v, n[:, None], 2)
    return v - coef.view(coef.shape + (1,) * (v.ndim - 2)) * n[:, None]


def _normal(grad: torch.Tensor):
    gn = grad.flatten(1).norm(dim=1)
    if bool((gn <= 0).any()) or not bool(torch.isfinite(gn).all()):
        raise GeometryError(
            f"{int((gn <= 0).sum())} points have a zero (or non-finite) gradient of F, so the "
            f"boundary has no normal there; drop those samples (e.g. constant logits)")
    return grad / gn.view(-1, *([1] * (grad.ndim - 1))), gn


def projected_hvp(F, z, v, *, grad=None, method="fd", h=DEFAULT_H, rows=None, chunk=None):
    """``G v = P H P v / ||∇F||`` (study 002's shape operator) for ``v [B, T, *in]``.

    ``grad`` (``∇F(z)``, ``[B, *in]``) is computed when not given.
    """
    if grad is None:
        _, grad = gradient(F, z, rows=rows, chunk=chunk)
    n, gn = _normal(grad)
    hv = hvp(F, z, project_tangent(v, n), method=method, h=h, rows=rows, chunk=chunk)
    return project_tangent(hv, n) / gn.view(-1, *([1] * (v.ndim - 1)))


def random_directions(b: int, t: int, shape, *, generator: torch.Generator | None = None,
                      seed: int = 0, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """``[b, t, *shape]`` directions drawn uniformly on the unit sphere (normalised Gaussians).

    Drawn on the CPU from ``generator`` (or a fresh one seeded with ``seed``) and moved, so a seed
    gives the same directions on every device.
    """
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise GeometryError(f"the number of directions must be an integer >= 1, got {t!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    d = torch.randn((b, t, *shape), generator=gen, dtype=torch.float64)
    d = d / d.flatten(2).norm(dim=2).view(b, t, *([1] * len(shape)))
    return d.to(device=device, dtype=dtype)


def directional_curvature(F, z: torch.Tensor, directions: torch.Tensor, *, method: str = "fd",
                          h: float = DEFAULT_H, rows=None, chunk: int | None = None,
                          grad: torch.Tensor | None = None) -> torch.Tensor:
    """``vᵀ G v = (P v)ᵀ H (P v) / ||∇F||`` for unit directions, batched over samples × directions.

    This is the summand of study 002's Algorithm 2 (``G`` the Hessian of ``F`` projected on the
    tangent space of its level set through ``z``); with ``directions`` uniform on the sphere its
    mean over directions estimates ``trace(G) / d``, the average curvature.

    Parameters
    ----------
    F : margin function
    z : Tensor [B, *input_shape]
        Points (a sample itself in Algorithm 2, or a boundary point ``x + r(x)``).
    directions : Tensor [B, T, *input_shape]
        Directions, normalised here to unit length (:func:`random_directions` draws them).
    method, h, rows, chunk
        As in :func:`hvp`.
    grad : Tensor [B, *input_shape], optional
        ``∇F(z)`` when already known.

    Returns
    -------
    Tensor [B, T]
    """
    if directions.ndim != z.ndim + 1 or directions.shape[0] != z.shape[0]:
        raise GeometryError(f"directions must have shape [B, T, *input] with B = {z.shape[0]}, "
                            f"got {tuple(directions.shape)}")
    if grad is None:
        _, grad = gradient(F, z, rows=rows, chunk=chunk)
    n, gn = _normal(grad)
    norm = directions.flatten(2).norm(dim=2)
    if bool((norm <= 0).any()):
        raise GeometryError("a direction has zero length; draw directions with random_directions")
    u = directions / norm.view(norm.shape + (1,) * (directions.ndim - 2))
    pu = project_tangent(u, n)
    hv = hvp(F, z, pu, method=method, h=h, rows=rows, chunk=chunk)
    return _bdot(pu, hv, 2) / gn[:, None]


@dataclass
class ClassCurvature:
    """Algorithm 2's curvatures at a batch of points (see :func:`class_curvatures`).

    Attributes
    ----------
    per_class : Tensor [B, L]
        Mean over directions of ``vᵀ G_{F_i} v`` for ``F_i = f_i - f_k̂``; NaN at ``k̂``.
    rho : Tensor [B]
        Algorithm 2's ρ: the mean over classes ``i != k̂`` and directions.
    predicted : LongTensor [B]
        ``k̂``, the prediction at the point.
    recovered : LongTensor [B]
        The class of the most positively curved boundary (Algorithm 2's recovered label).
    """

    per_class: torch.Tensor
    rho: torch.Tensor
    predicted: torch.Tensor
    recovered: torch.Tensor


def class_curvatures(model: nn.Module, x: torch.Tensor, *, directions: int | torch.Tensor = 20,
                     method: str = "fd", h: float = DEFAULT_H, seed: int = 0,
                     generator: torch.Generator | None = None, chunk: int | None = None) -> ClassCurvature:
    """Study 002's Algorithm 2 statistics at points ``x``: the mean curvature of the boundaries
    ``F_i = f_i - f_k̂`` between the predicted class ``k̂`` and every other class ``i``.

    The same ``T`` directions (uniform on the sphere) serve every class of a sample, as in the
    algorithm; the projection ``P`` of ``G_{F_i}`` uses ``∇F_i``. Batched over samples × classes ×
    directions (chunked by ``chunk`` points).

    Parameters
    ----------
    model : nn.Module
        Classifier in eval mode.
    x : Tensor [B, C, H, W]
        Points (natural or perturbed images).
    directions : int or Tensor [B, T, C, H, W]
        Number ``T`` of random directions, or the directions themselves.
    method, h, chunk
        As in :func:`hvp`.
    seed, generator
        Source of the random directions.

    Returns
    -------
    ClassCurvature
        ``per_class``, ``rho``; Algorithm 2 flags a point as perturbed when ``rho >= t`` and
        recovers ``recovered`` as its label.
    """
    x = x.detach()
    with torch.no_grad():
        logits = model(x)
    b, L = logits.shape
    if L < 2:
        raise GeometryError("Algorithm 2 needs a classifier with at least 2 classes")
    k_hat = logits.argmax(1)
    if isinstance(directions, torch.Tensor):
        dirs = directions.to(x.device, x.dtype)
    else:
        dirs = random_directions(b, directions, x.shape[1:], generator=generator, seed=seed,
                                 device=x.device, dtype=x.dtype)
    t = dirs.shape[1]
    others = torch.arange(L, device=x.device)[None].expand(b, L)
    others = others[others != k_hat[:, None]].view(b, L - 1)  # [B, L-1]
    F = Margin(model, others.reshape(-1), k_hat.repeat_interleave(L - 1), input_ndim=x.ndim - 1)
    rows = torch.arange(b * (L - 1), device=x.device)
    sample = rows // (L - 1)
    # Replicate each sample per class by indexing views chunk by chunk, never all at once.
    out = []
    per = t * (2 if method == "fd" else 1) + 1
    for sl in _chunks(b * (L - 1), per, chunk):
        r = rows[sl]
        zs, ds = x[sample[r]], dirs[sample[r]]
        out.append(directional_curvature(F, zs, ds, method=method, h=h, rows=r, chunk=chunk).mean(1))
    curv = torch.cat(out).view(b, L - 1)
    per_class = torch.full((b, L), float("nan"), dtype=curv.dtype, device=x.device)
    per_class.scatter_(1, others, curv)
    rho = curv.mean(1)
    recovered = others.gather(1, curv.argmax(1, keepdim=True)).squeeze(1)
    return ClassCurvature(per_class=per_class, rho=rho, predicted=k_hat, recovered=recovered)

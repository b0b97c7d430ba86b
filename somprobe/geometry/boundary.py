"""Boundary points z = x + r(x) of study 002: DeepFool's perturbation, then a bisection onto the
boundary between the clean class and the class across.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attacks.core import _attack_mode
from ..attacks.deepfool import deepfool
from ..errors import GeometryError

__all__ = ["BoundaryPoints", "boundary_points"]


@dataclass
class BoundaryPoints:
    """Attributes (detached tensors, ``B`` samples):

    z : [B, *in] points on the boundary (``F(z) ≈ 0``); x where DeepFool did not converge.
    r : [B, *in] ``z - x``, the minimal perturbation r(x) (no overshoot).
    adversarial : [B, *in] DeepFool's image (with overshoot), across the boundary.
    clean_class : [B] prediction at x (``k̂``).
    other_class : [B] prediction just across the boundary (``i``); ``F = f_i - f_k̂``.
    converged : [B] bool, DeepFool crossed within ``max_iter``.
    iterations : [B] DeepFool steps.
    """

    z: torch.Tensor
    r: torch.Tensor
    adversarial: torch.Tensor
    clean_class: torch.Tensor
    other_class: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor


def boundary_points(model: nn.Module, x: torch.Tensor, *, overshoot: float = 0.02,
                    max_iter: int = 50, bisection_steps: int = 25,
                    num_classes: int | None = None) -> BoundaryPoints:
    """Nearest boundary points of ``x`` (study 002's ``z = x + r(x)``).

    DeepFool (no pixel box: the geometry lives in the whole input space) gives an image across the
    boundary; a bisection on the segment from ``x`` to it (batched, ``bisection_steps`` halvings)
    finds where the prediction leaves the clean class, so ``z`` lies on the boundary to
    ``2^-steps`` of ``||r||`` instead of the overshoot past it.

    Parameters
    ----------
    model : nn.Module
    x : Tensor [B, C, H, W]
    overshoot, max_iter, num_classes
        DeepFool's (:func:`somprobe.attacks.deepfool`).
    bisection_steps : int
        Halvings of the segment (>= 1).

    Returns
    -------
    BoundaryPoints
    """
    if isinstance(bisection_steps, bool) or not isinstance(bisection_steps, int) or bisection_steps < 1:
        raise GeometryError(f"bisection_steps must be an integer >= 1, got {bisection_steps!r}")
    res = deepfool(model, x, overshoot=overshoot, max_iter=max_iter, num_classes=num_classes,
                   clip=None)
    x = x.detach()
    k_hat = res.labels
    view = (-1,) + (1,) * (x.ndim - 1)
    lo = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    hi = torch.ones_like(lo)
    with torch.no_grad(), _attack_mode(model):
        for _ in range(bisection_steps):
            mid = (lo + hi) / 2
            same = model(x + mid.view(view) * res.r).argmax(1) == k_hat
            lo = torch.where(same, mid, lo)
            hi = torch.where(same, hi, mid)
        across = model(x + hi.view(view) * res.r).argmax(1)
    t = torch.where(res.converged, (lo + hi) / 2, torch.zeros_like(lo))
    other = torch.where(res.converged, across, res.preds)
    r = t.view(view) * res.r
    return BoundaryPoints(z=x + r, r=r, adversarial=res.images, clean_class=k_hat,
                          other_class=other, converged=res.converged, iterations=res.iterations)

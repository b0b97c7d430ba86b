"""Geometry of decision boundaries (study 002, Fawzi et al. 2018), batched over samples.

Pure tensor modules (no I/O): :mod:`.margin` (``F = f_i - f_j``), :mod:`.hessian` (Hessian-vector
products by double backprop and by finite differences, the projected shape operator, directional
curvatures and Algorithm 2's per-class curvatures), :mod:`.lanczos` (batched Lanczos, principal
curvatures), :mod:`.boundary` (``z = x + r(x)``), :mod:`.subspace` (shared subspace, projection
ratios, noise in S / S⊥). :mod:`.job` runs them on a run directory (``somprobe geometry``).
"""
from __future__ import annotations

from .boundary import BoundaryPoints, boundary_points
from .hessian import (DEFAULT_H, METHODS, ClassCurvature, check_h, class_curvatures,
                      directional_curvature, gradient, hvp, project_tangent, projected_hvp,
                      random_directions)
from .lanczos import PrincipalCurvatures, default_iters, lanczos_extremes, principal_curvatures
from .margin import Margin, margin_grad
from .subspace import projection_ratio, shared_subspace, subspace_noise, subspace_noise_flips

__all__ = [
    "Margin", "margin_grad", "DEFAULT_H", "METHODS", "check_h", "gradient", "hvp",
    "project_tangent", "projected_hvp", "random_directions", "directional_curvature",
    "class_curvatures", "ClassCurvature", "lanczos_extremes", "principal_curvatures",
    "PrincipalCurvatures", "default_iters", "boundary_points", "BoundaryPoints",
    "shared_subspace", "projection_ratio", "subspace_noise", "subspace_noise_flips",
]

from .smooth import softplus_surrogate  # noqa: E402

__all__ += ["softplus_surrogate"]

"""Study 002's shared subspace of highly curved directions, projections on it, and noise in it.

``S`` is spanned by the top left-singular vectors of the matrix whose columns are the principal
directions of many samples; :func:`projection_ratio` gives Table 1's ``||P_S v|| / ||v||`` and
:func:`subspace_noise_flips` Fig. 7's misclassification under random noise restricted to ``S`` or
to ``S⊥``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import GeometryError

__all__ = ["shared_subspace", "projection_ratio", "subspace_noise", "subspace_noise_flips"]


def shared_subspace(directions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the ``dim`` dominant directions shared by many samples.

    Parameters
    ----------
    directions : Tensor [M, d] or [N, k, *input_shape]
        Principal directions (rows; any leading shape is flattened to ``M`` rows of ``d``).
    dim : int
        Dimension of ``S`` (``1 <= dim <= min(M, d)``).

    Returns
    -------
    basis : Tensor [d, dim]
        Orthonormal columns (top right-singular vectors of the ``M × d`` matrix).
    singular_values : Tensor [min(M, d)]
    """
    if directions.ndim < 2:
        raise GeometryError(f"directions must be [M, d] or [N, k, ...], got shape {tuple(directions.shape)}")
    if directions.ndim == 2:
        M = directions
    else:
        n, k = directions.shape[:2]
        M = directions.reshape(n * k, -1)
    rank = min(M.shape)
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= rank:
        raise GeometryError(f"subspace dimension must be an integer in [1, {rank}] (min of "
                            f"{M.shape[0]} directions and {M.shape[1]} input dimensions), got {dim!r}")
    _, s, vh = torch.linalg.svd(M.double(), full_matrices=False)
    return vh[:dim].T.to(directions.dtype), s.to(directions.dtype)


def projection_ratio(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``||P_S v|| / ||v||`` for every row of ``v`` (``[n, d]`` or ``[n, *input_shape]``)."""
    vf = v.reshape(v.shape[0], -1).to(basis.dtype)
    if vf.shape[1] != basis.shape[0]:
        raise GeometryError(f"vectors have {vf.shape[1]} dimensions but the subspace lives in "
                            f"{basis.shape[0]}")
    norm = vf.norm(dim=1)
    if bool((norm <= 0).any()):
        raise GeometryError("a vector has zero length; its projection ratio is undefined")
    return (vf @ basis).norm(dim=1) / norm


def subspace_noise(n: int, basis: torch.Tensor, *, complement: bool = False,
                   generator: torch.Generator | None = None, seed: int = 0) -> torch.Tensor:
    """``n`` unit random vectors uniform on the sphere of ``S`` (or of ``S⊥``): ``[n, d]``."""
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    g = torch.randn((n, basis.shape[0]), generator=gen, dtype=torch.float64).to(basis)
    inside = (g @ basis) @ basis.T
    g = g - inside if complement else inside
    return g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)


@torch.no_grad()
def subspace_noise_flips(model: nn.Module, x: torch.Tensor, basis: torch.Tensor,
                         magnitudes, *, complement: bool = False, scale: float = 1.0,
                         seed: int = 0, chunk: int = 4096) -> torch.Tensor:
    """Whether the prediction changes under noise in ``S`` (or ``S⊥``) of each magnitude.

    Noise of L2 norm ``magnitude * scale`` (study 002 Fig. 7: ``scale`` = the typical image norm)
    is added to every image, one fresh unit direction per image and magnitude; the images are not
    clipped, so the noise stays in the subspace.

    Returns
    -------
    BoolTensor [n, len(magnitudes)]
        ``True`` where the prediction differs from the clean one.
    """
    mags = torch.as_tensor(magnitudes, dtype=x.dtype, device=x.device).reshape(-1)
    if mags.numel() == 0 or bool((mags < 0).any()) or not bool(torch.isfinite(mags).all()):
        raise GeometryError("magnitudes must be a non-empty list of finite numbers >= 0")
    b, m = x.shape[0], mags.numel()
    clean = model(x).argmax(1)
    noise = subspace_noise(b * m, basis, complement=complement, seed=seed).to(x.dtype).to(x.device)
    noise = noise.view(b, m, *x.shape[1:]) * (mags * float(scale)).view(1, m, *([1] * (x.ndim - 1)))
    pts = (x[:, None] + noise).reshape(b * m, *x.shape[1:])
    preds = torch.cat([model(pts[s:s + chunk]).argmax(1) for s in range(0, b * m, chunk)])
    return preds.view(b, m) != clean[:, None]

"""Low-loss inputs: batched Adam on the points themselves (study 000).

Study 000 (Vrabel et al.) moves a barrier point B to a low-loss B′ "using the Adam optimizer with
an L2 norm and a high-frequency penalty … for 256 to 2048 iterations", and finds its low-loss
ends ("loss-minimising inputs", "class-optimal inputs from Gaussian noise") the same way. The
objective of each row is::

    CE(f(x), target) + λ_L2 · mean((x − x₀)²) + λ_hf · HF(x)

Both penalties are *means* over the elements of one point, so a λ means the same on a 28-pixel
and a 224-pixel image. The high-frequency penalty HF is chosen with ``hf``:

- ``"tv"`` (default): anisotropic total variation, mean |x[h+1,w] − x[h,w]| + mean
  |x[h,w+1] − x[h,w]| over channels — the classic prior of feature visualisation; it removes
  pixel-level speckle while allowing edges.
- ``"laplacian"``: mean squared discrete Laplacian (4x − the 4 neighbours, interior pixels) — a
  smooth (quadratic) penalty on curvature, i.e. on the highest spatial frequencies.

HF needs a spatial layout: it acts on the last two axes of points shaped ``[C, H, W]`` (images,
conv feature maps) and is zero for points of any other shape (token sequences, vectors, R²).

Adam is written out per row (it is element-wise anyway) so that every row stops on its own: a row
whose cross-entropy is below its tolerance, or whose loss or gradient is not finite, is frozen and
drops out of later forward passes. Rows never interact, so a batch gives the same result as
running each row alone up to float rounding: a network's logits for one input can differ in the
last bits between batch sizes (other kernels), and Adam's normalised step can turn that into
moves of up to ``lr`` on entries whose gradient is near zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import PathError
from .anchors import cross_entropy

__all__ = ["OptimResult", "minimise_loss", "high_frequency", "class_optimal_inputs", "HF_PENALTIES",
           "check_optim_params"]

HF_PENALTIES = ("tv", "laplacian")


@dataclass
class OptimResult:
    """Result of :func:`minimise_loss` (one entry per row).

    Attributes
    ----------
    x : Tensor [B, *shape]
        Optimised points (the last finite iterate of a row that went non-finite).
    loss : numpy float64 [B]
        Cross-entropy at ``x`` (NaN/inf where the row failed).
    iterations : numpy int64 [B]
        Adam steps taken.
    converged : numpy bool [B]
        Loss at or below the row's tolerance.
    finite : numpy bool [B]
        False where the loss or the gradient became NaN/inf (the row was stopped there).
    """

    x: Tensor
    loss: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    finite: np.ndarray


def high_frequency(x: Tensor, kind: str = "tv") -> Tensor:
    """Per-row high-frequency penalty ``[B]`` of points ``x [B, *shape]`` (see module docstring).

    Zero for points that are not ``[C, H, W]`` with H, W >= 2.
    """
    if kind not in HF_PENALTIES:
        raise PathError(f"unknown high-frequency penalty {kind!r}; use one of {', '.join(HF_PENALTIES)}")
    if x.ndim != 4 or x.shape[-1] < 2 or x.shape[-2] < 2:
        return x.new_zeros(x.shape[0])
    if kind == "tv":
        dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
        dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
        return dh + dw
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x.new_zeros(x.shape[0])
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1]
           - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
    return lap.pow(2).flatten(1).mean(1)


def _number(name: str, value, *, low: float = 0.0, open_low: bool = False, hint: str = "") -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PathError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (v <= low if open_low else v < low):
        raise PathError(f"{name} must be {'>' if open_low else '>='} {low:g} and finite, got {value!r}"
                        + (f"; {hint}" if hint else ""))
    return v


def _count(name: str, value, *, low: int = 0, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise PathError(f"{name} must be an integer >= {low}, got {value!r}" + (f"; {hint}" if hint else ""))
    return int(value)


def check_optim_params(*, iters, lr, lambda_l2, lambda_hf, hf) -> tuple[int, float, float, float, str]:
    """Validate Adam's budget and the penalty weights; :class:`PathError` names the bad value."""
    iters = _count("iters", iters, hint="study 000 uses 256-2048 Adam iterations")
    lr = _number("lr", lr, open_low=True, hint="e.g. 0.01 for pixels in [0, 1]")
    lambda_l2 = _number("lambda_l2", lambda_l2, hint="0 switches the L2 penalty off")
    lambda_hf = _number("lambda_hf", lambda_hf, hint="0 switches the high-frequency penalty off")
    if hf not in HF_PENALTIES:
        raise PathError(f"hf={hf!r} is not a high-frequency penalty; use one of {', '.join(HF_PENALTIES)}")
    return iters, lr, lambda_l2, lambda_hf, hf


def minimise_loss(
    logits: Callable[[Tensor], Tensor],
    x0: Tensor,
    target: Tensor,
    *,
    anchor: Tensor | None = None,
    iters: int = 512,
    lr: float = 0.01,
    lambda_l2: float = 1.0,
    lambda_hf: float = 0.05,
    hf: str = "tv",
    tol=1e-3,
    clip: tuple[float, float] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> OptimResult:
    """Move each point towards low cross-entropy for its target with Adam (batched, per-row stop).

    Parameters
    ----------
    logits : callable
        Points ``[M, *shape]`` → logits ``[M, C]`` (``Space.logits``); in eval mode.
    x0 : Tensor [B, *shape]
        Starting points.
    target : LongTensor [B]
        Class each point should be assigned to.
    anchor : Tensor [B, *shape], optional
        Centre of the L2 penalty (default ``x0``).
    iters : int
        Budget of Adam steps per row (0 only evaluates).
    lr : float
        Adam step size.
    lambda_l2, lambda_hf : float
        Weights of the L2 and high-frequency penalties (>= 0).
    hf : {"tv", "laplacian"}
        High-frequency penalty (module docstring).
    tol : float or array [B]
        A row stops as soon as its cross-entropy is <= tol.
    clip : (float, float), optional
        Box the points must stay in (pixels: (0, 1)); every iterate is clipped.
    betas, eps : Adam's constants.

    Returns
    -------
    OptimResult
    """
    iters, lr, lambda_l2, lambda_hf, hf = check_optim_params(
        iters=iters, lr=lr, lambda_l2=lambda_l2, lambda_hf=lambda_hf, hf=hf)
    n = x0.shape[0]
    x = x0.detach().clone()
    if clip is not None:
        x.clamp_(*clip)
    ref = (x0 if anchor is None else anchor).detach()
    tol_t = torch.as_tensor(np.broadcast_to(np.asarray(tol, dtype=np.float64), (n,)).copy(),
                            device=x.device, dtype=torch.float64)
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    loss = torch.full((n,), float("nan"), dtype=torch.float64, device=x.device)
    steps = torch.zeros(n, dtype=torch.long, device=x.device)
    finite = torch.ones(n, dtype=torch.bool, device=x.device)
    active = torch.arange(n, device=x.device)
    b1, b2 = betas
    for step in range(iters + 1):
        if active.numel() == 0:
            break
        xa = x[active].requires_grad_(step < iters)
        with torch.set_grad_enabled(step < iters):
            ce = cross_entropy(logits(xa), target[active])
        loss[active] = ce.detach().double()
        done = ce.detach().double() <= tol_t[active]
        bad = ~torch.isfinite(ce.detach())
        if step == iters:
            break
        obj = ce
        if lambda_l2:
            obj = obj + lambda_l2 * (xa - ref[active]).pow(2).flatten(1).mean(1)
        if lambda_hf:
            obj = obj + lambda_hf * high_frequency(xa, hf)
        (g,) = torch.autograd.grad(obj.sum(), xa)
        bad |= ~torch.isfinite(g.flatten(1)).all(1)
        finite[active[bad]] = False
        go = ~(done | bad)
        idx, g = active[go], g[go]
        # Adam, element-wise; every active row has taken exactly `step` steps so far.
        t = step + 1
        m[idx] = b1 * m[idx] + (1 - b1) * g
        v[idx] = b2 * v[idx] + (1 - b2) * g * g
        mhat = m[idx] / (1 - b1 ** t)
        vhat = v[idx] / (1 - b2 ** t)
        xi = x[idx] - lr * mhat / (vhat.sqrt() + eps)
        if clip is not None:
            xi = xi.clamp(*clip)
        x[idx] = xi.detach()
        steps[idx] += 1
        active = idx
    lossn = loss.cpu().numpy()
    fin = finite.cpu().numpy() & np.isfinite(lossn)
    return OptimResult(x=x.detach(), loss=lossn, iterations=steps.cpu().numpy(),
                       converged=fin & (lossn <= tol_t.cpu().numpy()), finite=fin)


def class_optimal_inputs(
    logits: Callable[[Tensor], Tensor],
    classes,
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    mean: float = 0.5,
    std: float = 0.1,
    clip: tuple[float, float] | None = (0.0, 1.0),
    iters: int = 512,
    lr: float = 0.01,
    lambda_l2: float = 0.0,
    lambda_hf: float = 0.05,
    hf: str = "tv",
    tol: float = 1e-3,
    device="cpu",
) -> OptimResult:
    """Inputs optimised from Gaussian noise to each class (study 000's untrained-network test).

    Parameters
    ----------
    logits : callable
        Points → logits.
    classes : array of int [N]
        Target class of each input to make (repeat a class for several inputs of it).
    shape : tuple
        Shape of one input, e.g. ``(3, 32, 32)``.
    seed : int
        Seeds the noise (a local CPU generator: the same noise on every device).
    mean, std : float
        The noise is N(mean, std²), clipped to ``clip``.
    clip, iters, lr, lambda_l2, lambda_hf, hf, tol
        As in :func:`minimise_loss` (the L2 penalty pulls towards the starting noise).
    device : str or torch.device

    Returns
    -------
    OptimResult
        ``x`` are the class-optimal inputs; ``converged`` tells which reached ``tol``.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise PathError(f"seed must be an integer, got {seed!r}")
    _number("std", std)
    target = torch.as_tensor(np.asarray(classes, dtype=np.int64).reshape(-1), device=device)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x0 = (mean + std * torch.randn((len(target), *shape), generator=gen)).to(device)
    if clip is not None:
        x0 = x0.clamp(*clip)
    return minimise_loss(logits, x0, target, iters=iters, lr=lr, lambda_l2=lambda_l2,
                         lambda_hf=lambda_hf, hf=hf, tol=tol, clip=clip)

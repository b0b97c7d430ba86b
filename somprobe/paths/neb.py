"""Nudged elastic band (NEB) paths, batched over pairs and pivots (study 001 §3).

A band of ``N`` pivots starts on the straight line between the fixed ends ``a`` and ``b``. The
energy of a pivot is the cross-entropy of the target class at that point. Each step moves every
pivot along

* the true force ``-∇E`` with its component along the path removed, using the improved tangent
  of Henkelman & Jónsson (2000), so the band slides down to the valley without the pivots
  sliding towards its minima; plus
* a spring force ``k (|R_{i+1} - R_i| - |R_i - R_{i-1}|) τ`` along the tangent that keeps the
  pivots apart; or, with ``k = inf``, no spring force and an exact redistribution of the pivots
  to equal arc length after every step (the choice of AutoNEB).

All pivots of all active pairs go through the same forward/backward passes; a pair stops when
every pivot's loss is below ``tol`` (converged), when its band turns non-finite or runs away
(failed, the others go on), or when the step budget is spent. The final piecewise-linear path
is then checked densely with :func:`~somprobe.paths.core.check_paths`.

Step sizes are relative: ``lr`` is a fraction of the pair's root-mean-square coordinate
difference ``|b - a| / sqrt(D)``, so the same ``lr`` suits pixels and every latent.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .core import CHUNK, PathBatch, check_paths, empty_stats, energy_and_grad, evaluate
from ..errors import PathError
from .spaces import Space

__all__ = ["find_neb", "check_neb_params", "improved_tangent", "redistribute", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "sgd")


def improved_tangent(prev: Tensor, cur: Tensor, nxt: Tensor, e_prev: Tensor, e_cur: Tensor,
                     e_next: Tensor) -> Tensor:
    """Unit tangent at ``cur`` by the energy-weighted rule of Henkelman & Jónsson (2000).

    With ``τ+ = nxt - cur`` and ``τ- = cur - prev``: on a monotone stretch the tangent points to
    the higher-energy neighbour (``τ+`` when ``e_next > e_cur > e_prev``, ``τ-`` when
    ``e_next < e_cur < e_prev``); at an extremum it blends both, weighting the one towards the
    higher neighbour by ``ΔE_max = max(|e_next - e_cur|, |e_prev - e_cur|)`` and the other by
    ``ΔE_min``. The result is normalised (zero where both neighbours coincide with ``cur``).

    Parameters
    ----------
    prev, cur, nxt : Tensor [..., D]
        Neighbouring points.
    e_prev, e_cur, e_next : Tensor [...]
        Their energies.

    Returns
    -------
    Tensor [..., D]
    """
    tp, tm = nxt - cur, cur - prev
    up, down = e_next - e_cur, e_prev - e_cur
    d_max = torch.maximum(up.abs(), down.abs())[..., None]
    d_min = torch.minimum(up.abs(), down.abs())[..., None]
    blend = torch.where((e_next > e_prev)[..., None], tp * d_max + tm * d_min, tp * d_min + tm * d_max)
    rising = ((e_next > e_cur) & (e_cur > e_prev))[..., None]
    falling = ((e_next < e_cur) & (e_cur < e_prev))[..., None]
    tau = torch.where(rising, tp, torch.where(falling, tm, blend))
    # Flat energies give a zero blend; the plain central difference is then the tangent.
    zero = (tau.norm(dim=-1, keepdim=True) == 0)
    tau = torch.where(zero, tp + tm, tau)
    n = tau.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, tau / n.clamp(min=1e-30), torch.zeros_like(tau))


def redistribute(path: Tensor) -> Tensor:
    """Points moved along the piecewise-linear ``path`` to equal arc-length spacing.

    Parameters
    ----------
    path : Tensor [P, K, D]
        ``K`` points per path, ends included; the ends stay where they are.

    Returns
    -------
    Tensor [P, K, D]
        Point ``j`` at arc length ``j / (K - 1)`` of the path's length.
    """
    P, K, D = path.shape
    seg = (path[:, 1:] - path[:, :-1]).norm(dim=2)
    cum = torch.cat([torch.zeros(P, 1, dtype=seg.dtype, device=seg.device), seg.cumsum(1)], 1)
    s = torch.linspace(0, 1, K, dtype=seg.dtype, device=seg.device)[None] * cum[:, -1:]
    idx = (torch.searchsorted(cum.contiguous(), s.contiguous(), right=True) - 1).clamp(0, K - 2)
    start = cum.gather(1, idx)
    length = seg.gather(1, idx)
    w = torch.where(length > 0, (s - start) / length.clamp(min=1e-30), torch.zeros_like(s)).clamp(0, 1)
    lo = path.gather(1, idx[..., None].expand(P, K, D))
    hi = path.gather(1, (idx + 1)[..., None].expand(P, K, D))
    out = lo + w[..., None].to(path.dtype) * (hi - lo)
    out[:, 0], out[:, -1] = path[:, 0], path[:, -1]
    return out


def _check(name, value, ok, what):
    if not ok:
        raise PathError(f"NEB {name} must be {what}, got {value!r} (--{name})")


def check_neb_params(*, pivots=10, steps=100, spring=math.inf, optimizer="adam", lr=0.01, tol=0.1,
                     points=100, **_) -> None:
    """Raise :class:`~somprobe.errors.PathError` (a ``ValueError``) naming a bad NEB option."""
    _check("pivots", pivots, isinstance(pivots, int) and not isinstance(pivots, bool) and pivots >= 1,
           "an integer >= 1")
    _check("steps", steps, isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0,
           "an integer >= 0")
    _check("spring", spring, isinstance(spring, (int, float)) and spring >= 0,
           ">= 0 (inf for equal-spacing redistribution)")
    _check("optimizer", optimizer, optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}")
    _check("lr", lr, isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr), "a positive number")
    _check("tol", tol, isinstance(tol, (int, float)) and tol > 0, "positive")
    _check("points", points, isinstance(points, int) and points >= 2, "an integer >= 2")


def find_neb(space: Space, a: Tensor, b: Tensor, target: Tensor, *, pivots: int = 10,
             steps: int = 100, spring: float = math.inf, optimizer: str = "adam", lr: float = 0.01,
             tol: float = 0.1, points: int = 100, max_length_ratio: float = 100.0,
             chunk: int = CHUNK, generator: torch.Generator | None = None,
             progress: bool = False) -> PathBatch:
    """Minimum-energy paths by the nudged elastic band, all pairs at once.

    Parameters
    ----------
    space : Space
        Where the band lives (pixels are clipped to the space's box after every step).
    a, b : Tensor [P, *shape]
        Fixed ends of each pair.
    target : LongTensor [P]
        Class whose cross-entropy is the energy.
    pivots : int
        Movable points ``N`` between the ends (default 10, the band has ``N + 2`` anchors).
    steps : int
        Step budget.
    spring : float
        Spring constant ``k`` (energy per squared distance of the space); ``inf`` (default):
        no spring force, equal-arc-length redistribution after every step.
    optimizer : {"adam", "sgd"}
        How the force moves the pivots. Adam (β = 0.9, 0.999) normalises each coordinate's
        step; SGD moves by ``lr_pair × force``.
    lr : float
        Step size relative to the pair's RMS coordinate difference ``|b - a| / sqrt(D)``.
    tol : float
        A pair has converged when every pivot's loss is below ``tol`` (default 0.1, i.e. target
        probability above 0.905).
    points : int
        Points per segment of the dense check of the final path.
    max_length_ratio : float
        A band longer than this many straight-line lengths has diverged.
    chunk : int
        Points per forward pass.
    generator : torch.Generator, optional
        Unused: the band starts on the straight line, so NEB is deterministic.
    progress : bool
        tqdm bar over steps.

    Returns
    -------
    PathBatch
        ``N + 2`` anchors per pair; stats ``path_ok``, ``max_loss``, ``length_ratio`` from the
        dense check, ``iterations`` (steps taken until convergence or the budget),
        ``converged`` (every pivot below ``tol``), ``pivot_max_loss`` (the largest pivot loss at
        the end), ``failed``/``reason`` (non-finite ends, loss, gradient or band; or a band that
        ran away), where a failed pair keeps its last finite band.
    """
    check_neb_params(pivots=pivots, steps=steps, spring=spring, optimizer=optimizer, lr=lr, tol=tol,
                     points=points)
    if a.shape != b.shape or len(target) != len(a):
        raise ValueError(f"a {tuple(a.shape)}, b {tuple(b.shape)} and target ({len(target)}) disagree")
    P, shape = a.shape[0], a.shape[1:]
    N = pivots
    dev = a.device
    a2, b2 = a.detach().reshape(P, -1).float(), b.detach().reshape(P, -1).float()
    D = a2.shape[1]
    stats = empty_stats(P)
    converged = np.zeros(P, dtype=bool)
    pivot_max = np.full(P, np.nan)

    w = torch.linspace(0, 1, N + 2, device=dev)[1:-1][None, :, None]
    x = a2[:, None] + w * (b2 - a2)[:, None]                                    # [P, N, D]
    scale = ((b2 - a2).norm(dim=1) / math.sqrt(D))[:, None, None]
    step_lr = lr * scale
    straight = (b2 - a2).norm(dim=1)
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)

    ends_ok = torch.isfinite(a2).all(1) & torch.isfinite(b2).all(1)
    e_ends = evaluate(space, torch.cat([a2, b2]).reshape(2 * P, *shape),
                      torch.cat([target, target]).to(dev), chunk=chunk)["loss"]
    e_a, e_b = e_ends[:P].to(dev), e_ends[P:].to(dev)
    active = ends_ok.clone()
    stats["failed"][~ends_ok.cpu().numpy()] = True
    stats["reason"][~ends_ok.cpu().numpy()] = "non-finite end point"

    it = range(steps + 1)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"NEB {space.name}", unit="step")
    for step in it:
        idx = torch.nonzero(active).flatten()
        if len(idx) == 0:
            break
        xa = x[idx]
        Pa = len(idx)
        pts, tgt = xa.reshape(Pa * N, *shape), target.to(dev)[idx].repeat_interleave(N)
        if step == steps:
            # the budget is spent: the last look only needs the losses (converged or not), so
            # skip the backward pass its gradient would cost
            E = evaluate(space, pts, tgt, chunk=chunk)["loss"].to(dev).reshape(Pa, N)
            bad = ~torch.isfinite(E).all(1)
        else:
            E, g = energy_and_grad(space, pts, tgt, chunk=chunk)
            E, g = E.to(dev).reshape(Pa, N), g.to(dev).reshape(Pa, N, D).float()
            bad = ~(torch.isfinite(E).all(1) & torch.isfinite(g).flatten(1).all(1))
        done = ~bad & (E < tol).all(1)
        ids = idx.cpu().numpy()
        pivot_max[ids] = torch.nan_to_num(E, nan=float("inf")).amax(1).cpu().numpy()
        if bad.any():
            sel = ids[bad.cpu().numpy()]
            stats["failed"][sel], stats["reason"][sel] = True, "non-finite loss or gradient"
        converged[ids[done.cpu().numpy()]] = True
        stop = bad | done
        active[idx[stop]] = False
        if step == steps or not (~stop).any():
            break
        move = ~stop
        idx, xa, E, g = idx[move], xa[move], E[move], g[move]
        R = torch.cat([a2[idx, None], xa, b2[idx, None]], 1)                   # [Pa, N+2, D]
        Ef = torch.cat([e_a[idx, None], E, e_b[idx, None]], 1)
        tau = improved_tangent(R[:, :-2], R[:, 1:-1], R[:, 2:], Ef[:, :-2], Ef[:, 1:-1], Ef[:, 2:])
        force = -g + (g * tau).sum(-1, keepdim=True) * tau
        if math.isfinite(spring):
            dist = (R[:, 1:] - R[:, :-1]).norm(dim=-1)
            force = force + spring * (dist[:, 1:] - dist[:, :-1])[..., None] * tau
        if optimizer == "adam":
            t = step + 1
            m[idx] = 0.9 * m[idx] + 0.1 * force
            v[idx] = 0.999 * v[idx] + 0.001 * force * force
            upd = step_lr[idx] * (m[idx] / (1 - 0.9 ** t)) / ((v[idx] / (1 - 0.999 ** t)).sqrt() + 1e-8)
        else:
            upd = step_lr[idx] * force
        new = space.project(xa + upd) if space.clip is not None else xa + upd
        if not math.isfinite(spring):
            new = redistribute(torch.cat([a2[idx, None], new, b2[idx, None]], 1))[:, 1:-1]
        R_new = torch.cat([a2[idx, None], new, b2[idx, None]], 1)
        length = (R_new[:, 1:] - R_new[:, :-1]).norm(dim=-1).sum(1)
        finite = torch.isfinite(new).flatten(1).all(1)
        runaway = finite & (length > max_length_ratio * straight[idx])
        good = finite & ~runaway
        x[idx[good]] = new[good]
        sel_nan, sel_run = idx[~finite].cpu().numpy(), idx[runaway].cpu().numpy()
        stats["failed"][sel_nan], stats["reason"][sel_nan] = True, "non-finite band after a step"
        stats["failed"][sel_run] = True
        stats["reason"][sel_run] = f"diverged: band longer than {max_length_ratio:g}× the straight line"
        stats["iterations"][idx.cpu().numpy()] += 1
        active[idx[~good]] = False

    anchors = torch.cat([a2[:, None], x, b2[:, None]], 1).reshape(P, N + 2, *shape).to(a.dtype)
    batch = PathBatch(anchors, torch.full((P,), N + 2, dtype=torch.long), stats)
    chk = check_paths(space, batch, target, points_per_segment=points, chunk=chunk)
    for k in ("path_ok", "max_loss", "length_ratio"):
        stats[k] = chk[k]
    stats["path_ok"] = stats["path_ok"] & ~stats["failed"]
    stats["converged"] = converged
    stats["pivot_max_loss"] = pivot_max
    return batch

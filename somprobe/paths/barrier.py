"""Barrier bypass (study 000, Vrabel et al.: input space mode connectivity).

For two low-loss points A and C of one class: evaluate the cross-entropy along the straight
segment, take its highest-loss point B (the *barrier*), move B with Adam to a low-loss B′
(:func:`~somprobe.paths.optimise.minimise_loss`: CE + L2 to B + a high-frequency penalty), and
replace the segment by A–B′–C. Repeat on every segment whose *barrier gap*

    gap = (highest loss on the segment) − max(L(A), L(C))

is at least δ (the study: 0.001), until every gap is below δ or a depth limit is reached. The gap
of every segment is measured against the pair's ends A and C, as the study defines it: measured
against the segment's own ends, a B′ that Adam could not bring down would hide its own barrier
(both its segments would have a gap of zero).

Everything is batched: one *round* evaluates every open segment of every pair in the same
forward passes and optimises all their barrier points as one Adam batch (rows stop on their own),
so 50 pairs cost about as many passes as one. A round is what the study calls a round of the
path-finding procedure: all barriers present are bypassed at once.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import PathError
from .anchors import AnchorSet, cross_entropy, segment_values
from .core import CHUNK, PathBatch, _logits, empty_stats, path_lengths
from .optimise import _count, _number, check_optim_params, minimise_loss
from .spaces import Space

__all__ = ["find_barrier", "check_barrier_params", "BARRIER_EXTRAS", "ENDS"]

#: Extra per-pair columns of :func:`find_barrier` (``paths.csv``).
BARRIER_EXTRAS = ("barrier_gap", "final_gap", "rounds", "segments", "success", "end_loss",
                  "ends_optimised")
#: What to do with ends whose loss is above ``end_tol``.
ENDS = ("optimise", "skip", "keep")


def _check_pair_inputs(a: Tensor, b: Tensor, target: Tensor) -> Tensor:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise PathError("a and b must be tensors [P, *shape]")
    if a.shape != b.shape or a.ndim < 2:
        raise PathError(f"a and b must have the same shape [P, *shape], got {tuple(a.shape)} and {tuple(b.shape)}")
    target = torch.as_tensor(target, device=a.device)
    if target.shape != (a.shape[0],) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise PathError(f"target must be {a.shape[0]} integer class indices, got shape {tuple(target.shape)}, "
                        f"dtype {target.dtype}")
    return target.long()


def check_barrier_params(*, delta=1e-3, iters=512, lr=0.01, lambda_l2=1.0, lambda_hf=0.05, hf="tv",
                         tol=None, points_per_segment=33, max_depth=5, ends="optimise", end_tol=0.1,
                         end_iters=None, chunk=CHUNK) -> float:
    """Validate :func:`find_barrier`'s options (:class:`PathError` names the bad one); return δ."""
    delta = _number("delta", delta, open_low=True, hint="the study's barrier threshold is 0.001")
    check_optim_params(iters=iters, lr=lr, lambda_l2=lambda_l2, lambda_hf=lambda_hf, hf=hf)
    if tol is not None:
        _number("tol", tol, hint="None stops each point at max(L(A), L(C)) + delta/2")
    _count("points_per_segment", points_per_segment, low=3, hint="a segment needs an interior point")
    _count("max_depth", max_depth)
    if ends not in ENDS:
        raise PathError(f"ends={ends!r}: use one of {', '.join(ENDS)}")
    _number("end_tol", end_tol, open_low=True)
    if end_iters is not None:
        _count("end_iters", end_iters)
    _count("chunk", chunk, low=1)
    return delta


def find_barrier(
    space: Space,
    a: Tensor,
    b: Tensor,
    target: Tensor,
    *,
    delta: float = 1e-3,
    iters: int = 512,
    lr: float = 0.01,
    lambda_l2: float = 1.0,
    lambda_hf: float = 0.05,
    hf: str = "tv",
    tol: float | None = None,
    points_per_segment: int = 33,
    max_depth: int = 5,
    ends: str = "optimise",
    end_tol: float = 0.1,
    end_iters: int | None = None,
    chunk: int = CHUNK,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> PathBatch:
    """Piecewise-linear low-loss paths by recursive barrier bypass (study 000), all pairs at once.

    Parameters
    ----------
    space : Space
        Where the points live (``space.logits``, ``space.clip``).
    a, b : Tensor [P, *shape]
        Ends of each pair.
    target : LongTensor [P]
        Class of each pair (the loss is the cross-entropy for it).
    delta : float
        Barrier threshold δ (> 0): a segment is done when its gap is below it (study: 0.001).
    iters : int
        Adam budget per barrier point (study: 256–2048); a point stops early at its tolerance.
    lr, lambda_l2, lambda_hf, hf
        Adam step and penalties (:func:`~somprobe.paths.optimise.minimise_loss`; ``hf="tv"``
        total variation or ``"laplacian"``).
    tol : float, optional
        Cross-entropy at which a barrier point stops. Default: max(L(A), L(C)) + δ/2 (B′ is then
        no barrier of its own).
    points_per_segment : int
        Grid on which each segment's loss curve is evaluated, ends included (>= 3).
    max_depth : int
        Rounds of recursion allowed; a pair whose segments still have gaps >= δ after it is
        reported with ``success=False`` and a reason (its other segments are still finished).
        A pair whose barrier point stays δ or more above max(L(A), L(C)) after ``iters`` steps
        is stopped there the same way (recursing around it cannot remove it).
    ends : {"optimise", "skip", "keep"}
        Ends with loss above ``end_tol``: optimise them to low loss first (study 000's
        loss-minimising inputs; the path then joins the optimised ends, which are returned as
        anchors 0 and -1), skip the pair (``failed``, reason with the loss), or keep them.
    end_tol : float
        Loss an end must not exceed (``ends`` != "keep").
    end_iters : int, optional
        Adam budget for the ends (default ``iters``).
    chunk : int
        Points per forward pass when evaluating loss curves.
    generator : torch.Generator, optional
        Unused (the method is deterministic); kept for the common method signature.
    progress : bool
        tqdm bar over rounds.

    Returns
    -------
    PathBatch
        Anchors in path order; ``stats`` has the common columns (``path_ok``: every evaluated
        point predicts the target; ``max_loss``: highest loss on the final path's grid;
        ``iterations``: Adam steps spent on the pair) and :data:`BARRIER_EXTRAS`:
        ``barrier_gap`` (gap of the straight segment), ``final_gap`` (largest gap left),
        ``rounds`` (rounds in which the pair had a barrier optimised), ``segments``,
        ``success`` (every gap < δ), ``end_loss`` (higher end loss, after optimisation),
        ``ends_optimised``.

    Raises
    ------
    PathError
        δ <= 0, negative budgets or λ, unknown ``hf``/``ends``, mismatched inputs.
    """
    delta = check_barrier_params(delta=delta, iters=iters, lr=lr, lambda_l2=lambda_l2,
                                  lambda_hf=lambda_hf, hf=hf, tol=tol,
                                  points_per_segment=points_per_segment, max_depth=max_depth,
                                  ends=ends, end_tol=end_tol, end_iters=end_iters, chunk=chunk)
    target = _check_pair_inputs(a, b, target)
    P, shape = a.shape[0], tuple(a.shape[1:])
    clip = getattr(space, "clip", None)
    opt = dict(lr=lr, lambda_l2=lambda_l2, lambda_hf=lambda_hf, hf=hf, clip=clip)

    def logits(x: Tensor) -> Tensor:
        return _logits(space, x)

    stats = empty_stats(P)
    stats.update(barrier_gap=np.full(P, np.nan), final_gap=np.full(P, np.nan),
                 rounds=np.zeros(P, dtype=np.int64), segments=np.ones(P, dtype=np.int64),
                 success=np.zeros(P, dtype=bool), end_loss=np.full(P, np.nan),
                 ends_optimised=np.zeros(P, dtype=bool))
    alive = np.ones(P, dtype=bool)
    depth_limited = np.zeros(P, dtype=bool)

    def fail(pairs, reason: str) -> None:
        pairs = np.unique(np.asarray(pairs, dtype=np.int64))
        pairs = pairs[alive[pairs]]
        alive[pairs] = False
        stats["failed"][pairs] = True
        stats["reason"][pairs] = reason

    # Ends: evaluate, optimise or skip the high-loss ones.
    anchors = AnchorSet(a, b)
    ends_pair = np.concatenate([np.arange(P), np.arange(P)])
    with torch.no_grad():
        end_loss = torch.cat([cross_entropy(logits(anchors.points[i:i + chunk].reshape(-1, *shape)),
                                            target[ends_pair[i:i + chunk]])
                              for i in range(0, 2 * P, chunk)]).double().cpu().numpy()
    fail(ends_pair[~np.isfinite(end_loss)], "non-finite loss at an end point")
    high = np.isfinite(end_loss) & (end_loss > end_tol) & alive[ends_pair]
    if ends == "optimise" and high.any():
        idx = np.flatnonzero(high)
        res = minimise_loss(logits, anchors.points[idx].reshape(-1, *shape),
                            target[ends_pair[idx]], iters=iters if end_iters is None else end_iters,
                            tol=end_tol, **opt)
        anchors.replace(idx, res.x)
        end_loss[idx] = res.loss
        stats["ends_optimised"][ends_pair[idx]] = True
        np.add.at(stats["iterations"], ends_pair[idx], res.iterations)
        fail(ends_pair[idx[~res.finite]], "non-finite loss or gradient while optimising an end")
    pair_end = np.fmax(end_loss[:P], end_loss[P:])
    stats["end_loss"] = pair_end
    if ends != "keep":
        over = alive & (pair_end > end_tol)
        for p in np.flatnonzero(over):  # one message per skipped pair (bookkeeping only)
            fail([p], f"skipped: end loss {pair_end[p]:.4g} > end_tol {end_tol:g}"
                      + (" after optimising the ends" if ends == "optimise" else ""))

    left, right = anchors.first[alive], anchors.last[alive]
    depth = np.zeros(len(left), dtype=np.int64)
    max_loss = np.full(P, -np.inf)
    pred_ok = np.ones(P, dtype=bool)
    final_gap = np.full(P, -np.inf)
    T = int(points_per_segment)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_depth + 1, desc="barrier rounds", unit="round")
    rnd = 0
    while len(left):
        keep = alive[anchors.pair[left]]
        left, right, depth = left[keep], right[keep], depth[keep]
        if not len(left):
            break
        seg_pair = anchors.pair[left]
        vals, seg, _t = segment_values(logits, anchors.points[left], anchors.points[right],
                                       np.full(len(left), T - 1), shape=shape, chunk=chunk)
        tgt = target[torch.as_tensor(seg_pair[seg], device=target.device)].to(vals.device)
        ce = cross_entropy(vals, tgt).double().reshape(len(left), T).cpu().numpy()
        pred = (vals.argmax(1) == tgt).reshape(len(left), T).cpu().numpy()
        finite = np.isfinite(ce).all(1)
        fail(seg_pair[~finite], f"non-finite loss on a segment in round {rnd}")
        # Measured against the pair's ends A, C (not the segment's): a barrier point that could
        # not be brought down stays visible as a barrier instead of hiding in its own segments.
        with np.errstate(invalid="ignore"):
            gap = ce.max(1) - pair_end[seg_pair]
        if rnd == 0:
            stats["barrier_gap"][seg_pair] = gap
        ok = finite & alive[seg_pair]
        need = ok & (gap >= delta)
        at_limit = need & (depth >= max_depth)
        settled = ok & ~(need & ~at_limit)        # segments that stay in the final path
        np.maximum.at(max_loss, seg_pair[settled], ce[settled].max(1))
        np.maximum.at(final_gap, seg_pair[settled], gap[settled])
        np.logical_and.at(pred_ok, seg_pair[settled], pred[settled].all(1))
        depth_limited[seg_pair[at_limit]] = True
        go = need & ~at_limit
        if bar is not None:
            bar.update(1)
        if not go.any():
            break
        # Barrier points (highest interior loss) of every open segment, optimised as one batch.
        rows = np.flatnonzero(go)
        t_star = (np.argmax(ce[rows, 1:-1], axis=1) + 1) / (T - 1)
        li = torch.as_tensor(left[rows], device=anchors.points.device)
        ri = torch.as_tensor(right[rows], device=anchors.points.device)
        ts = torch.as_tensor(t_star, dtype=anchors.points.dtype, device=anchors.points.device)[:, None]
        b0 = anchors.points[li] + ts * (anchors.points[ri] - anchors.points[li])
        seg_tol = (pair_end[seg_pair[rows]] + delta / 2) if tol is None else tol
        pairs = seg_pair[rows]
        res = minimise_loss(logits, b0.reshape(-1, *shape), target[torch.as_tensor(pairs, device=target.device)],
                            iters=iters, tol=seg_tol, **opt)
        np.add.at(stats["iterations"], pairs, res.iterations)
        fail(pairs[~res.finite], f"non-finite loss or gradient while optimising a barrier in round {rnd}")
        # A B′ that is itself a barrier (Adam ran out of budget above ref + δ) cannot be bypassed by
        # recursing around it: stop the pair now instead of spending every remaining round.
        with np.errstate(invalid="ignore"):
            stuck = res.finite & alive[pairs] & (res.loss - pair_end[pairs] >= delta)
        for i in np.flatnonzero(stuck):
            p = pairs[i]
            if alive[p]:
                alive[p] = False
                stats["reason"][p] = (f"a barrier point stayed at loss {res.loss[i]:.4g} (gap "
                                      f"{res.loss[i] - pair_end[p]:.4g} >= delta {delta:g}) after "
                                      f"{res.iterations[i]} Adam steps in round {rnd}: raise iters or lr")
        good = res.finite & alive[pairs]
        new = anchors.insert(left[rows[good]], right[rows[good]], res.x[torch.as_tensor(np.flatnonzero(good), device=res.x.device)])
        stats["rounds"][np.unique(pairs)] += 1
        left = np.concatenate([left[rows[good]], new])
        right = np.concatenate([new, right[rows[good]]])
        depth = np.concatenate([depth[rows[good]] + 1, depth[rows[good]] + 1])
        rnd += 1
    if bar is not None:
        bar.close()

    anchor_t, n_anchors = anchors.padded()
    seglen, straight = path_lengths(anchor_t, n_anchors.to(anchor_t.device))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (seglen.sum(1) / straight).cpu().numpy()
    ratio[~np.isfinite(ratio)] = np.nan
    # Pairs stopped on a stuck barrier point have no finished path: like failures, no path stats.
    done = alive & np.isfinite(max_loss)
    for p in np.flatnonzero(alive & depth_limited):
        stats["reason"][p] = (f"depth limit {max_depth} reached with a barrier gap of "
                              f"{final_gap[p]:.4g} >= delta {delta:g}")
    stats["max_loss"] = np.where(done, max_loss, np.nan)
    stats["final_gap"] = np.where(done, final_gap, np.nan)
    stats["path_ok"] = done & pred_ok
    stats["length_ratio"] = np.where(done, ratio, np.nan)
    stats["segments"] = n_anchors.cpu().numpy() - 1
    stats["success"] = done & ~depth_limited
    return PathBatch(anchor_t, n_anchors, stats)

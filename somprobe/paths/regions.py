"""Paths inside one classification region (study 002, Fawzi et al., Algorithm 1), batched.

``FINDPATH(x1, x2)``: take the midpoint; if its label is not the target, project it into the
target's region with the smallest perturbation; the path x1 → x_m → x2 is valid when every point
sampled on its two segments (spacing ``spacing · ‖x1 − x2‖``, study: 10⁻⁴) has the target label;
otherwise recurse on both halves and concatenate.

Two departures, both needed to make the algorithm terminate, both documented options:

- the projection is a targeted DeepFool-style step run until the target leads every other class
  by a logit ``margin`` (with DeepFool's ``overshoot``). Projected exactly onto the boundary, the
  new anchor would sit on it and the next check would fail forever. By default
  (``projection="leading"``, :func:`somprobe.paths.projection.project_leading`) each step
  linearises only the target against the class that currently leads it — one backward pass per
  step instead of targeted DeepFool's C − 1 (``projection="deepfool"``,
  :func:`somprobe.attacks.deepfool.deepfool`), which made the projection dominate on 10 classes;
- the recursion has a depth limit; a pair that hits it, or whose projection cannot reach the
  target within ``proj_steps`` steps, is reported (``failed``, ``reason``) and the others go on.

Batching: one *level* of the recursion handles every pending segment of every pair at once —
one forward pass for all midpoints, one DeepFool batch for all that left the region, and one
chunked sweep over all points to check (a ragged set: each segment gets its own number of points
for the spacing). Literal recursion on a half that is already valid only adds its midpoint (the
halves of a checked segment lie on that same, checked, line), so that is done without a check.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import PathError
from .anchors import AnchorSet, segment_values
from .barrier import _check_pair_inputs
from .core import CHUNK, PathBatch, _logits, empty_stats, path_lengths
from .optimise import _count, _number
from .spaces import Space

__all__ = ["find_region_path", "project_to_class", "check_region_params", "REGION_EXTRAS", "RECURSE",
           "PROJECTIONS"]

#: Extra per-pair columns of :func:`find_region_path` (``paths.csv``).
REGION_EXTRAS = ("anchors", "depth", "success", "projections", "points_checked")
#: Which halves of an invalid path are recursed on: ``both`` (Algorithm 1 as printed) or
#: ``invalid`` (only the halves that failed the check: fewer anchors, same path otherwise).
RECURSE = ("both", "invalid")
#: Projections of a midpoint into the target region: ``leading`` (one backward pass per step,
#: target vs the leading class) or ``deepfool`` (targeted DeepFool over every class).
PROJECTIONS = ("leading", "deepfool")

def _module(space: Space):
    fn = space.logits
    if not isinstance(fn, torch.nn.Module):
        raise PathError("region paths need space.logits to be a torch.nn.Module (DeepFool puts it in "
                        "eval mode); wrap the function in a small nn.Module")
    return fn


def project_to_class(
    space: Space,
    x: Tensor,
    target: Tensor,
    *,
    margin: float = 0.1,
    overshoot: float = 0.02,
    max_steps: int = 50,
    method: str = "leading",
):
    """Smallest (linearised) move of each point into class ``target`` with a logit margin.

    ``method="leading"``: :func:`somprobe.paths.projection.project_leading` (each step
    linearises the target against the currently leading class only: one backward pass);
    ``"deepfool"``: :func:`somprobe.attacks.deepfool.deepfool` (``target=``, ``margin=``; every
    class, C − 1 backward passes per step). Both take the :class:`Space`'s box (latent spaces
    have none) and points of any shape.

    Parameters
    ----------
    space : Space
    x : Tensor [B, *shape]
    target : LongTensor [B]
    margin : float
        Logit lead of the target over every other class to reach (>= 0).
    overshoot : float
        DeepFool's overshoot (each step is ``1 + overshoot`` times the linearised step).
    max_steps : int
        Steps per point; points that do not arrive are returned with ``converged=False``.
    method : {"leading", "deepfool"}
        See above (:data:`PROJECTIONS`).

    Returns
    -------
    DeepFoolResult
        ``images`` are the projected points, ``converged`` [B], ``iterations`` [B].
    """
    if method == "leading":
        from .projection import project_leading

        return project_leading(space.logits, x.detach(), target, margin=margin, overshoot=overshoot,
                               max_steps=max_steps, clip=space.clip)
    if method != "deepfool":
        raise PathError(f"projection={method!r}: use one of {', '.join(PROJECTIONS)}")
    from ..attacks.deepfool import deepfool

    return deepfool(_module(space), x.detach(), target=target, margin=margin, overshoot=overshoot,
                    max_iter=max_steps, clip=space.clip)


def check_region_params(*, spacing=1e-4, margin=0.1, overshoot=0.02, proj_steps=50, max_depth=10,
                        recurse="both", chunk=CHUNK, projection="leading") -> tuple[float, float, float]:
    """Validate :func:`find_region_path`'s options (:class:`PathError` names the bad one);
    return ``(spacing, margin, overshoot)`` as floats."""
    spacing = _number("spacing", spacing, open_low=True, hint="the study samples at 1e-4 of ||x1 - x2||")
    if spacing > 1:
        raise PathError(f"spacing must be <= 1 (a fraction of ||x1 - x2||), got {spacing}")
    margin = _number("margin", margin)
    overshoot = _number("overshoot", overshoot)
    _count("proj_steps", proj_steps, low=1)
    _count("max_depth", max_depth, low=1)
    _count("chunk", chunk, low=1)
    if recurse not in RECURSE:
        raise PathError(f"recurse={recurse!r}: use one of {', '.join(RECURSE)}")
    if projection not in PROJECTIONS:
        raise PathError(f"projection={projection!r}: use one of {', '.join(PROJECTIONS)}")
    return spacing, margin, overshoot


def find_region_path(
    space: Space,
    a: Tensor,
    b: Tensor,
    target: Tensor,
    *,
    spacing: float = 1e-4,
    margin: float = 0.1,
    overshoot: float = 0.02,
    proj_steps: int = 50,
    max_depth: int = 10,
    recurse: str = "both",
    chunk: int = CHUNK,
    projection: str = "leading",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> PathBatch:
    """Piecewise-linear paths inside the target's region (study 002, Algorithm 1), all pairs at once.

    Parameters
    ----------
    space : Space
    a, b : Tensor [P, *shape]
        Ends of each pair; both must be predicted as the pair's target.
    target : LongTensor [P]
    spacing : float
        Distance between checked points as a fraction of ‖a − b‖ (study: 1e-4), in (0, 1].
    margin, overshoot, proj_steps
        Projection of a midpoint that left the region (:func:`project_to_class`).
    max_depth : int
        Levels of recursion allowed (>= 1); a pair still invalid at this depth is reported.
    recurse : {"both", "invalid"}
        See :data:`RECURSE`.
    chunk : int
        Points per forward pass when checking.
    projection : {"leading", "deepfool"}
        How a midpoint is projected (:func:`project_to_class`'s ``method``).
    generator : torch.Generator, optional
        Unused (deterministic); kept for the common method signature.
    progress : bool
        tqdm bar over recursion levels.

    Returns
    -------
    PathBatch
        ``stats``: the common columns (``path_ok`` = every checked point has the target label,
        ``max_loss`` NaN — the method checks labels, not losses — ``length_ratio`` = D(p),
        ``iterations`` = DeepFool steps) and :data:`REGION_EXTRAS`: ``anchors`` (count, ends
        included), ``depth`` (deepest level used), ``success``, ``projections``,
        ``points_checked``.

    Raises
    ------
    PathError
        Bad spacing, margin, budgets or inputs.
    """
    spacing, margin, overshoot = check_region_params(
        spacing=spacing, margin=margin, overshoot=overshoot, proj_steps=proj_steps,
        max_depth=max_depth, recurse=recurse, chunk=chunk, projection=projection)
    target = _check_pair_inputs(a, b, target)
    if projection == "deepfool":
        _module(space)
    P, shape = a.shape[0], tuple(a.shape[1:])

    def logits(x: Tensor) -> Tensor:
        return _logits(space, x)

    stats = empty_stats(P)
    stats.update(anchors=np.full(P, 2, dtype=np.int64), depth=np.zeros(P, dtype=np.int64),
                 success=np.zeros(P, dtype=bool), projections=np.zeros(P, dtype=np.int64),
                 points_checked=np.zeros(P, dtype=np.int64))
    alive = np.ones(P, dtype=bool)

    def fail(pairs, reason: str) -> None:
        pairs = np.unique(np.asarray(pairs, dtype=np.int64))
        pairs = pairs[alive[pairs]]
        alive[pairs] = False
        stats["failed"][pairs] = True
        stats["reason"][pairs] = reason

    anchors = AnchorSet(a, b)
    dev = anchors.points.device
    tgt_np = target.cpu().numpy()
    with torch.no_grad():
        ends = torch.cat([logits(anchors.points[i:i + chunk].reshape(-1, *shape))
                          for i in range(0, 2 * P, chunk)])
    finite = torch.isfinite(ends).all(1).cpu().numpy()
    pred = ends.argmax(1).cpu().numpy()
    both = np.concatenate([np.arange(P), np.arange(P)])
    fail(both[~finite], "non-finite logits at an end point")
    off = np.flatnonzero((pred != np.concatenate([tgt_np, tgt_np])) & alive[both])
    for i in off:  # one message per pair (bookkeeping only)
        fail([both[i]], f"end {'ab'[i // P]} is predicted as class {pred[i]}, not the target {tgt_np[both[i]]}")
    base = (anchors.points[anchors.last] - anchors.points[anchors.first]).double().norm(dim=1).cpu().numpy()
    step = spacing * base                                   # checking distance of each pair
    trivial = alive & (base == 0)                          # identical ends: nothing to join
    stats["success"][trivial] = True
    stats["path_ok"][trivial] = True

    left = anchors.first[alive & ~trivial]
    right = anchors.last[alive & ~trivial]
    level = 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_depth, desc="region levels", unit="level")
    while len(left):
        keep = alive[anchors.pair[left]]
        left, right = left[keep], right[keep]
        if not len(left):
            break
        pair = anchors.pair[left]
        li, ri = torch.as_tensor(left, device=dev), torch.as_tensor(right, device=dev)
        mid = 0.5 * (anchors.points[li] + anchors.points[ri])
        with torch.no_grad():
            lm = torch.cat([logits(mid[i:i + chunk].reshape(-1, *shape)) for i in range(0, len(mid), chunk)])
        tp = torch.as_tensor(tgt_np[pair], device=lm.device)
        bad = ~torch.isfinite(lm).all(1).cpu().numpy()
        fail(pair[bad], f"non-finite logits at a midpoint (level {level})")
        need = np.flatnonzero((lm.argmax(1) != tp).cpu().numpy() & alive[pair])
        if len(need):
            res = project_to_class(space, mid[need].reshape(-1, *shape),
                                   torch.as_tensor(tgt_np[pair[need]], device=dev),
                                   margin=margin, overshoot=overshoot, max_steps=proj_steps,
                                   method=projection)
            it = res.iterations.cpu().numpy()
            np.add.at(stats["iterations"], pair[need], it)
            np.add.at(stats["projections"], pair[need], 1)
            conv = res.converged.cpu().numpy() & torch.isfinite(res.images.flatten(1)).all(1).cpu().numpy()
            fail(pair[need[~conv]], f"projection into the target class did not reach a logit margin "
                                    f"of {margin:g} within {proj_steps} steps (level {level})")
            mid[torch.as_tensor(need, device=dev)] = res.images.flatten(1).to(mid)
        ok = alive[pair]
        stats["depth"][pair[ok]] = level
        new = anchors.insert(left[ok], right[ok], mid[torch.as_tensor(np.flatnonzero(ok), device=dev)])
        pl, pr, pp = left[ok], right[ok], pair[ok]
        # Check both halves of every new path x1 → x_m → x2 at the pair's spacing.
        s_left = np.concatenate([pl, new])
        s_right = np.concatenate([new, pr])
        s_pair = np.concatenate([pp, pp])
        sl, sr = torch.as_tensor(s_left, device=dev), torch.as_tensor(s_right, device=dev)
        length = (anchors.points[sr] - anchors.points[sl]).double().norm(dim=1).cpu().numpy()
        counts = np.maximum(1, np.ceil(length / step[s_pair])).astype(np.int64)
        vals, seg, _t = segment_values(logits, anchors.points[sl], anchors.points[sr], counts,
                                       shape=shape, chunk=chunk, include_ends=False)
        np.add.at(stats["points_checked"], s_pair, np.maximum(counts - 1, 0))
        wrong = np.zeros(len(s_left), dtype=bool)
        if len(seg):
            miss = (vals.argmax(1).cpu().numpy() != tgt_np[s_pair[seg]]) | \
                ~torch.isfinite(vals).all(1).cpu().numpy()
            np.logical_or.at(wrong, seg, miss)
        n = len(pl)
        invalid = wrong[:n] | wrong[n:]                       # the path x1 → x_m → x2 fails
        halves_bad = np.concatenate([wrong[:n] & invalid, wrong[n:] & invalid])
        halves_good = np.concatenate([~wrong[:n] & invalid, ~wrong[n:] & invalid])
        if recurse == "both" and halves_good.any():
            # FINDPATH on a valid half returns it with its (in-class) midpoint: no check needed.
            g = np.flatnonzero(halves_good)
            gl, gr = torch.as_tensor(s_left[g], device=dev), torch.as_tensor(s_right[g], device=dev)
            anchors.insert(s_left[g], s_right[g], 0.5 * (anchors.points[gl] + anchors.points[gr]))
        if bar is not None:
            bar.update(1)
        nxt = np.flatnonzero(halves_bad)
        if level >= max_depth and len(nxt):
            fail(s_pair[nxt], f"depth limit {max_depth} reached with segments still leaving the region")
            nxt = nxt[alive[s_pair[nxt]]]
        left, right = s_left[nxt], s_right[nxt]
        level += 1
    if bar is not None:
        bar.close()

    anchor_t, n_anchors = anchors.padded()
    seglen, straight = path_lengths(anchor_t, n_anchors.to(anchor_t.device))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (seglen.sum(1) / straight).cpu().numpy()
    ratio[~np.isfinite(ratio)] = np.nan
    stats["anchors"] = n_anchors.cpu().numpy()
    stats["success"] = alive.copy()
    stats["path_ok"] = alive.copy()
    stats["length_ratio"] = np.where(alive, ratio, np.nan)
    return PathBatch(anchor_t, n_anchors, stats)

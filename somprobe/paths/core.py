"""What every path method shares: the result type, evaluation along piecewise-linear paths.

Paths are batches: ``P`` pairs, each a piecewise-linear curve through ``K`` anchors (padded;
``n_anchors`` says how many are valid per pair). Points along all segments of all pairs are
generated chunk by chunk from the flat index (pair, segment, grid point), so memory stays at
``chunk`` points whatever ``P``, ``K`` and the grid are, and one forward pass serves many pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .spaces import Space

__all__ = [
    "PathBatch", "evaluate", "energy_and_grad", "segment_grid", "path_lengths", "check_paths",
    "linear_profile", "path_profile", "resample", "empty_stats", "CHUNK",
]

#: Default number of points per forward pass.
CHUNK = 1024


@dataclass
class PathBatch:
    """Paths of ``P`` pairs as padded anchor lists.

    Attributes
    ----------
    anchors : Tensor [P, K, *shape]
        Anchor points in path order, both ends included; rows past ``n_anchors[p]`` are padding
        (repeats of the last valid anchor).
    n_anchors : LongTensor [P]
        Valid anchors per pair (>= 2).
    stats : dict of str → ndarray [P]
        Per-pair columns; at least ``path_ok`` (bool), ``max_loss``, ``length_ratio``,
        ``iterations``, ``failed`` (bool) and ``reason`` (str, ``""`` when fine).
    """

    anchors: Tensor
    n_anchors: Tensor
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.anchors.shape[0])


def empty_stats(n: int) -> dict[str, np.ndarray]:
    """Per-pair columns every method fills: all pairs fine, nothing checked yet."""
    return {
        "path_ok": np.zeros(n, dtype=bool),
        "max_loss": np.full(n, np.nan),
        "length_ratio": np.full(n, np.nan),
        "iterations": np.zeros(n, dtype=np.int64),
        "failed": np.zeros(n, dtype=bool),
        "reason": np.array([""] * n, dtype=object),
    }


def _logits(space: Space, x: Tensor) -> Tensor:
    out = space.logits(x)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def evaluate(space: Space, points: Tensor, target: Tensor, *, chunk: int = CHUNK,
             probs: bool = False) -> dict[str, Tensor]:
    """Prediction, target probability and cross-entropy at each point.

    Parameters
    ----------
    space : Space
    points : Tensor [M, *shape]
    target : LongTensor [M]
    chunk : int
        Points per forward pass.
    probs : bool
        Also return the full softmax ``[M, C]``.

    Returns
    -------
    dict
        ``pred`` [M] long, ``p_target`` [M], ``loss`` [M] (cross-entropy; NaN where the logits
        are not finite), and ``probs`` [M, C] when asked.
    """
    out: dict[str, list] = {"pred": [], "p_target": [], "loss": []}
    if probs:
        out["probs"] = []
    for i in range(0, len(points), chunk):
        logit = _logits(space, points[i:i + chunk]).float()
        t = target[i:i + chunk].to(logit.device)
        _collect(out, logit, t, probs)
    return {k: torch.cat(v) for k, v in out.items()}


#: Points whose logits :func:`_walk` reduces at once (bounds the [points, classes] buffer).
_REDUCE_POINTS = 65536


def _collect(out: dict, logit: Tensor, t: Tensor, probs: bool) -> None:
    logp = logit.log_softmax(1)
    loss = -logp.gather(1, t[:, None])[:, 0]
    bad = ~torch.isfinite(logit).all(1)
    loss = torch.where(bad, torch.full_like(loss, float("nan")), loss)
    out["pred"].append(logit.argmax(1))
    out["p_target"].append((-loss).exp())
    out["loss"].append(loss)
    if probs:
        out["probs"].append(logp.exp())


def energy_and_grad(space: Space, points: Tensor, target: Tensor, *,
                    chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """Cross-entropy at each point and its gradient with respect to that point.

    The points are independent (the model is in eval mode), so the gradient of the summed loss
    of a chunk gives every point's own gradient in one backward pass.

    Returns
    -------
    loss : Tensor [M]
    grad : Tensor [M, *shape]
    """
    losses, grads = [], []
    for i in range(0, len(points), chunk):
        x = points[i:i + chunk].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(_logits(space, x).float(), target[i:i + chunk].to(x.device),
                                   reduction="none")
            (g,) = torch.autograd.grad(loss.sum(), x)
        losses.append(loss.detach())
        grads.append(g)
    return torch.cat(losses), torch.cat(grads)


def segment_grid(points_per_segment: int, *, device=None, dtype=torch.float32) -> Tensor:
    """``points_per_segment`` positions in [0, 1] along a segment, both ends included."""
    if points_per_segment < 2:
        raise ValueError(f"points_per_segment must be >= 2, got {points_per_segment}")
    return torch.linspace(0.0, 1.0, points_per_segment, device=device, dtype=dtype)


def path_lengths(anchors: Tensor, n_anchors: Tensor) -> tuple[Tensor, Tensor]:
    """Euclidean segment lengths ``[P, K-1]`` (0 on padding) and the straight-line distance ``[P]``."""
    P, K = anchors.shape[:2]
    flat = anchors.detach().reshape(P, K, -1).double()
    seg = (flat[:, 1:] - flat[:, :-1]).norm(dim=2)
    valid = torch.arange(K - 1, device=anchors.device)[None] < (n_anchors[:, None].to(anchors.device) - 1)
    seg = torch.where(valid, seg, torch.zeros_like(seg))
    last = flat[torch.arange(P, device=anchors.device), n_anchors.to(anchors.device) - 1]
    return seg, (last - flat[:, 0]).norm(dim=1)


def _walk(space: Space, anchors: Tensor, n_anchors: Tensor, target: Tensor, grid: Tensor, *,
          chunk: int, probs: bool = False) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Evaluate every valid segment of every pair at ``grid``.

    Returns the pair and segment of each evaluated segment and the outputs reshaped to
    ``[S, T]`` (``probs`` to ``[S, T, C]``).
    """
    P, K = anchors.shape[:2]
    dev = anchors.device
    nseg = (n_anchors.to(dev) - 1).clamp(min=0)
    pair = torch.repeat_interleave(torch.arange(P, device=dev), nseg)
    starts = torch.cumsum(nseg, 0) - nseg
    seg = torch.arange(len(pair), device=dev) - starts[pair]
    T = len(grid)
    M = len(pair) * T
    out: dict[str, list] = {"pred": [], "p_target": [], "loss": []}
    if probs:
        out["probs"] = []
    shape = anchors.shape[2:]
    with torch.no_grad():
        if getattr(space, "affine", False):
            _walk_affine(space, anchors, n_anchors.to(dev), pair, seg, target.to(dev)[pair], grid,
                         chunk=chunk, probs=probs, out=out)
            return pair, seg, _shaped(out, len(pair), T, dev)
        # One start and one direction per segment, so each chunk gathers once and fuses the
        # interpolation into one addcmul.
        start = anchors[pair, seg]
        step = anchors[pair, seg + 1] - start
        if T <= chunk:
            # Whole segments per pass: the points are one broadcast addcmul, without the index
            # arithmetic and the two gathers per point below (for a cheap tail such as a pooled
            # linear layer those cost more than the tail itself).
            w = grid.to(anchors.dtype).view(1, T, *([1] * len(shape)))
            tgt = target.to(dev)[pair]
            per = max(1, chunk // T)
            pending, first = [], 0  # logits not yet reduced, from segment `first` on

            def flush(upto):
                # one reduction for many passes: the per-pass bookkeeping otherwise rivals a cheap tail
                if pending:
                    logit = torch.cat(pending)
                    _collect(out, logit, tgt[first:upto].repeat_interleave(T).to(logit.device), probs)
                    pending.clear()

            for s0 in range(0, len(pair), per):
                s1 = min(s0 + per, len(pair))
                pts = torch.addcmul(start[s0:s1, None], w, step[s0:s1, None]).reshape(-1, *shape)
                pending.append(_logits(space, pts).float())
                if (s1 - first) * T >= _REDUCE_POINTS:
                    flush(s1)
                    first = s1
            flush(len(pair))
        else:  # a segment's grid alone exceeds a pass: chunks of points
            for i in range(0, M, chunk):
                idx = torch.arange(i, min(i + chunk, M), device=dev)
                s_id, j = idx // T, idx % T
                w = grid[j].to(anchors.dtype).reshape(-1, *([1] * len(shape)))
                pts = torch.addcmul(start[s_id], w, step[s_id])
                p = pair[s_id]
                logit = _logits(space, pts).float()
                _collect(out, logit, target.to(dev)[p].to(logit.device), probs)
    return pair, seg, _shaped(out, len(pair), T, dev)


def _shaped(out: dict, S: int, T: int, dev) -> dict[str, Tensor]:
    res = {}
    for key, v in out.items():
        flat = torch.cat(v) if v else torch.empty(0, device=dev)
        res[key] = flat.reshape(S, T, *flat.shape[1:])
    return res


def _walk_affine(space: Space, anchors: Tensor, n_anchors: Tensor, pair: Tensor, seg: Tensor,
                 tgt: Tensor, grid: Tensor, *, chunk: int, probs: bool, out: dict) -> None:
    """:func:`_walk` for an affine ``space.logits``: only the anchors go through the tail.

    logits((1 − t) z₀ + t z₁) = (1 − t) logits(z₀) + t logits(z₁) exactly for an affine map, so
    each segment's grid is the interpolation of its ends' logits (float rounding aside: ~1e-6
    relative). A non-finite anchor makes its segments non-finite, as evaluating the points would.
    """
    if not len(pair):
        return
    P, K = anchors.shape[:2]
    valid = torch.arange(K, device=anchors.device)[None] < n_anchors[:, None]
    pts = anchors[valid]
    ends = torch.cat([_logits(space, pts[i:i + chunk]).float() for i in range(0, len(pts), chunk)])
    C = ends.shape[1]
    table = ends.new_full((P, K, C), float("nan"))
    table[valid.to(ends.device)] = ends
    p, s = pair.to(ends.device), seg.to(ends.device)
    l0 = table[p, s]
    dl = table[p, s + 1] - l0
    T = len(grid)
    w = grid.to(ends.device, torch.float32).view(1, T, 1)
    per = max(1, _REDUCE_POINTS // T)
    for s0 in range(0, len(pair), per):
        s1 = min(s0 + per, len(pair))
        logit = torch.addcmul(l0[s0:s1, None], w, dl[s0:s1, None]).reshape(-1, C)
        _collect(out, logit, tgt[s0:s1].repeat_interleave(T).to(logit.device), probs)


def check_paths(space: Space, batch: PathBatch, target: Tensor, *, points_per_segment: int = 100,
                chunk: int = CHUNK) -> dict[str, np.ndarray]:
    """Check piecewise-linear paths densely: does every point predict the target?

    Each segment of each pair is evaluated at ``points_per_segment`` evenly spaced points (both
    ends included), all pairs and segments in the same forward passes.

    Parameters
    ----------
    space : Space
    batch : PathBatch
    target : LongTensor [P]
    points_per_segment : int
        Grid per segment (the linear path's grid; default 100).
    chunk : int
        Points per forward pass.

    Returns
    -------
    dict of ndarray [P]
        ``path_ok`` (bool: every point predicts the target and every loss is finite),
        ``max_loss`` (NaN when a loss was not finite), ``length_ratio`` (path length over the
        straight-line distance; NaN when the ends coincide), ``n_points_checked``.
    """
    anchors = batch.anchors.detach()
    n_anchors = batch.n_anchors.to(anchors.device)
    P = anchors.shape[0]
    grid = segment_grid(points_per_segment, device=anchors.device)
    pair, _seg, res = _walk(space, anchors, n_anchors, target, grid, chunk=chunk)
    dev = res["loss"].device
    pair = pair.to(dev)
    ok_seg = (res["pred"] == target.to(dev)[pair][:, None]).all(1) & torch.isfinite(res["loss"]).all(1)
    ok = torch.ones(P, dtype=torch.bool, device=dev).scatter_reduce(0, pair, ok_seg, "amin")
    loss_seg = torch.nan_to_num(res["loss"], nan=float("inf")).amax(1)
    max_loss = torch.full((P,), -float("inf"), device=dev).scatter_reduce(0, pair, loss_seg, "amax")
    max_loss = torch.where(torch.isinf(max_loss), torch.full_like(max_loss, float("nan")), max_loss)
    seglen, straight = path_lengths(anchors, n_anchors)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (seglen.sum(1) / straight).cpu().numpy()
    ratio[~np.isfinite(ratio)] = np.nan
    counts = torch.zeros(P, dtype=torch.long, device=dev).scatter_add(
        0, pair, torch.full_like(pair, len(grid)))
    return {
        "path_ok": ok.cpu().numpy().astype(bool),
        "max_loss": max_loss.double().cpu().numpy(),
        "length_ratio": ratio,
        "n_points_checked": counts.cpu().numpy(),
    }


def linear_profile(space: Space, a: Tensor, b: Tensor, target: Tensor, T: int = 100, *,
                   chunk: int = CHUNK, probs: bool = False) -> dict[str, np.ndarray]:
    """Prediction, target softmax and cross-entropy along the straight lines ``a → b``.

    All pairs and all ``T`` points go through the same forward passes.

    Parameters
    ----------
    space : Space
    a, b : Tensor [P, *shape]
        Start and end points.
    target : LongTensor [P]
    T : int
        Points along each line, both ends included (default 100).
    chunk : int
        Points per forward pass.
    probs : bool
        Also return the full softmax ``[P, T, C]``.

    Returns
    -------
    dict
        ``t`` [T]; ``pred``, ``p_target``, ``loss`` [P, T]; ``linear_ok`` [P] (every point
        predicts the target: "linearly connectable"); ``max_loss`` [P]; ``probs`` when asked.
    """
    if a.shape != b.shape:
        raise ValueError(f"start and end points differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    anchors = torch.stack([a, b], 1).detach()
    n = torch.full((len(a),), 2, dtype=torch.long, device=a.device)
    grid = segment_grid(T, device=a.device)
    _pair, _seg, res = _walk(space, anchors, n, target, grid, chunk=chunk, probs=probs)
    out = {k: v.cpu().numpy() for k, v in res.items()}
    out["t"] = grid.cpu().numpy()
    finite = np.isfinite(out["loss"]).all(1)
    out["linear_ok"] = (out["pred"] == target.cpu().numpy()[:, None]).all(1) & finite
    out["max_loss"] = np.where(finite, np.nan_to_num(out["loss"]).max(1) if len(a) else 0.0, np.nan)
    return out


def path_profile(space: Space, batch: PathBatch, target: Tensor, *, points_per_segment: int = 20,
                 chunk: int = CHUNK, probs: bool = False) -> dict[str, np.ndarray]:
    """Profiles along piecewise-linear paths, indexed by normalised arc length.

    Returns
    -------
    dict of ndarray, one entry per evaluated point (flat, in path order)
        ``pair`` (index into the batch), ``t`` (arc length from the start over the path's
        length, in [0, 1]), ``pred``, ``p_target``, ``loss``, and ``probs`` [n, C] when asked.
    """
    anchors = batch.anchors.detach()
    n_anchors = batch.n_anchors.to(anchors.device)
    grid = segment_grid(points_per_segment, device=anchors.device)
    pair, seg, res = _walk(space, anchors, n_anchors, target, grid, chunk=chunk, probs=probs)
    seglen, _ = path_lengths(anchors, n_anchors)
    cum = torch.cumsum(seglen, 1) - seglen
    total = seglen.sum(1).clamp(min=1e-30)
    t = (cum[pair, seg][:, None] + grid.double()[None] * seglen[pair, seg][:, None]) / total[pair][:, None]
    T = len(grid)
    out = {"pair": pair.repeat_interleave(T).cpu().numpy(), "t": t.reshape(-1).cpu().numpy()}
    for k, v in res.items():
        out[k] = v.reshape(len(pair) * T, *v.shape[2:]).cpu().numpy()
    return out


def resample(anchors: Tensor, n_anchors: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``n`` points at equal arc length along each piecewise-linear path (ends included).

    Parameters
    ----------
    anchors : Tensor [P, K, *shape]
    n_anchors : LongTensor [P]
    n : int
        Points per path (>= 2).

    Returns
    -------
    points : Tensor [P, n, *shape]
    t : Tensor [P, n]
        Their arc length over the path's length (``linspace(0, 1, n)``; the ends of a path of
        length 0 are all its first point).
    """
    anchors = anchors.detach()
    P, K = anchors.shape[:2]
    flat = anchors.reshape(P, K, -1)
    seg, _ = path_lengths(anchors, n_anchors)
    cum = torch.cat([torch.zeros(P, 1, dtype=seg.dtype, device=seg.device), seg.cumsum(1)], 1)
    t = torch.linspace(0, 1, n, dtype=seg.dtype, device=seg.device)[None].expand(P, n)
    s = t * cum[:, -1:]
    # The last valid segment holds s = length; padding segments have length 0 and come after.
    last = (n_anchors.to(seg.device) - 2).clamp(min=0)[:, None]
    idx = torch.minimum((torch.searchsorted(cum.contiguous(), s.contiguous(), right=True) - 1)
                        .clamp(0, K - 2), last)
    length = seg.gather(1, idx)
    w = torch.where(length > 0, (s - cum.gather(1, idx)) / length.clamp(min=1e-30),
                    torch.zeros_like(s)).clamp(0, 1)
    D = flat.shape[2]
    lo = flat.gather(1, idx[..., None].expand(P, n, D))
    hi = flat.gather(1, (idx + 1)[..., None].expand(P, n, D))
    pts = lo + w[..., None].to(flat.dtype) * (hi - lo)
    return pts.reshape(P, n, *anchors.shape[2:]), t.float()

"""Training loops of the SOM: quicksom's online rule and Kohonen's batch map.

Pure tensor code, no I/O: :class:`somprobe.som.map.SOM` feeds it chunks of data and keeps the
state. Both loops work on mini-batches with matrix products only (never a B×G×D tensor):

* online (quicksom's rule, per mini-batch of ``B`` rows ``x_b``)::

      s = decay(t / T)            t = samples seen before the batch, T = N · epochs
      α = α0 · s,  σ = σ0 · s
      h_bj = exp(−d²(bmu_b, j) / (2σ² + 1e−5))      d: grid distance (somprobe.som.grid)
      W_j += mean_b α · h_bj · (x_b − W_j)
           = α/B · (Hᵀ X − diag(Hᵀ 1) W)_j

* batch (Kohonen's batch map, one update per epoch, σ = σ0 · decay(epoch / epochs))::

      W_j = Σ_b h_bj x_b / Σ_b h_bj         accumulated over chunks of the data

Cosine BMUs maximise ``x·W_j / ‖W_j‖`` and euclidean BMUs minimise ``‖W_j‖² − 2 x·W_j``; both need
``‖W_j‖²``. The online loop updates it from quantities it already has instead of re-reading W
(see :func:`online_step`), and recomputes it exactly at the start of every block of steps
(:func:`online_block`, which also reads and writes W once per block instead of every step).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["DECAYS", "decay_factor", "online_step", "online_pass", "batch_accumulate", "bmu_scores",
           "online_step_shared", "online_pass_shared",
           "NEIGHBOURHOOD_EPS", "online_block", "block_rows", "BLOCK_ROWS",
           "INCREMENTAL_NORMS_MAX_BATCH", "neighbourhood", "NEIGHBOURHOOD_CUTOFF"]

#: quicksom's constant in the Gaussian neighbourhood's denominator (2σ² + eps).
NEIGHBOURHOOD_EPS = 1e-5


def _exp(f: float) -> float:
    return math.exp(-5.0 * f)


def _linear(f: float) -> float:
    return 1.0 - f


def _half(f: float) -> float:
    return 0.5 ** int(20 * f)


#: Decay schedules of quicksom (``SOM.scheduler``): ``f`` = t/T in [0, 1).
DECAYS = {"exp": _exp, "linear": _linear, "half": _half}


def decay_factor(decay: str, t: float, total: float) -> float:
    """Scale ``s`` of α and σ after ``t`` of ``total`` samples (quicksom's schedules).

    Parameters
    ----------
    decay : {"exp", "linear", "half"}
        ``exp``: e^(−5 t/T); ``linear``: 1 − t/T; ``half``: 0.5^⌊20 t/T⌋.
    t, total : float
        Samples seen before the current batch and samples of the whole fit.
    """
    return DECAYS[decay](float(t) / float(total))


def bmu_scores(St: torch.Tensor, wsq: torch.Tensor, metric: str) -> torch.Tensor:
    """Scores ``[G, B]`` whose column-wise argmax is the BMU, from ``St = W Xᵀ`` and ``‖W_j‖²``."""
    if metric == "cosine":
        return St * torch.rsqrt(wsq)[:, None]
    return St.mul(2.0).sub_(wsq[:, None])


def _bmu_distance(best: torch.Tensor, xsq: torch.Tensor, metric: str) -> torch.Tensor:
    # best is the winning score of bmu_scores; turn it into the metric's distance.
    if metric == "cosine":
        return 1.0 - best * torch.rsqrt(xsq)
    return torch.sqrt(torch.clamp(xsq - best, min=0.0))


#: Largest mini-batch for which the online step updates ``‖W_j‖²`` through the B×B Gram matrix
#: (O(B²(D+G)) flops); above it one pass over W (O(G·D), memory-bound) is cheaper.
INCREMENTAL_NORMS_MAX_BATCH = 32


def online_step(W: torch.Tensor, wsq: torch.Tensor, x: torch.Tensor, sqd: torch.Tensor,
                alpha: float, sigma: float, metric: str) -> torch.Tensor:
    """One quicksom mini-batch update of ``W`` (in place); returns the BMU distances ``[B]``.

    Parameters
    ----------
    W : torch.Tensor [G, D]
        Unit weights, updated in place.
    wsq : torch.Tensor [G]
        ``‖W_j‖²`` of the current weights, updated in place to the new weights.
    x : torch.Tensor [B, D]
        The mini-batch.
    sqd : torch.Tensor [G, G]
        Squared grid distances between units (``Grid.unit_sq_distances``).
    alpha, sigma : float
        Learning rate and neighbourhood width of this batch.
    metric : {"cosine", "euclidean"}
        How BMUs are chosen.

    Notes
    -----
    With ``c_j = 1 − α r_j / B`` (``r = Hᵀ1``) and ``U = α/B · Hᵀ X`` the new weights are
    ``c_j W_j + U_j``. For small batches ``‖W'_j‖² = c_j²‖W_j‖² + 2 c_j W_j·U_j + ‖U_j‖²`` with
    ``W_j·U_j = α/B Σ_b h_bj S_bj`` (``S = X Wᵀ``, already computed for the BMUs) and
    ``‖U_j‖² = (α/B)² h_jᵀ (X Xᵀ) h_j``: O(G·B²) work instead of another pass over W.
    ``W Xᵀ`` (not ``X Wᵀ``) because BLAS runs it about twice as fast for a short, wide X.
    """
    B = x.shape[0]
    St = torch.mm(W, x.t())                                  # [G, B]
    best, bmu = bmu_scores(St, wsq, metric).max(dim=0)
    incremental = B <= INCREMENTAL_NORMS_MAX_BATCH
    if incremental:
        xx = torch.mm(x, x.t())
        xsq = torch.diagonal(xx)
    else:
        xsq = (x * x).sum(1)
    dist = _bmu_distance(best, xsq, metric)
    H = neighbourhood(sqd, bmu, sigma)
    coef = alpha / B
    c = H.sum(0).mul_(-coef).add_(1.0)                       # [G]
    if incremental:
        wu = (H * St.t()).sum(0).mul_(coef)                  # W_j·U_j
        uu = (torch.mm(xx, H) * H).sum(0).mul_(coef * coef)  # ‖U_j‖²
        wsq.copy_(c * c * wsq + 2.0 * c * wu + uu)
    W.mul_(c[:, None])
    W.addmm_(H.t(), x, alpha=coef)
    if not incremental:
        _sq_norms(W, out=wsq)
    return dist


#: Neighbourhood weights below this are set to 0. Their contribution to a weight is below 1e-22
#: of it (far beneath float32 resolution), and without the cut-off the far units' weights end
#: up as subnormal floats, which make the CPU's matrix products several times slower.
NEIGHBOURHOOD_CUTOFF = 1e-22
_LOG_CUTOFF = math.log(NEIGHBOURHOOD_CUTOFF)


def neighbourhood(sqd: torch.Tensor, bmu: torch.Tensor, sigma: float) -> torch.Tensor:
    """``H[b, j] = exp(−d²(bmu_b, j) / (2σ² + 1e−5))`` (quicksom's Gaussian), ``[B, G]``."""
    E = torch.index_select(sqd, 0, bmu).mul_(-1.0 / (2.0 * sigma * sigma + NEIGHBOURHOOD_EPS))
    # Cut in the exponent (exp(−inf) = 0): exp itself never produces subnormal results.
    torch.nn.functional.threshold_(E, _LOG_CUTOFF, -math.inf)
    return E.exp_()


def _sq_norms(W: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # vector_norm is a single fused pass, ~3x faster than (W * W).sum(1) on CPU.
    torch.linalg.vector_norm(W, dim=1, out=out)
    return out.mul_(out)


#: Rows per block of the online loop (``block_rows``): enough for the block's two matrix products
#: to run at GEMM speed, few enough that tracking the block's scores stays cheaper than re-reading W.
BLOCK_ROWS = 160


def block_rows(batch_size: int, dim: int) -> int:
    """Rows of data the online loop processes per block (a multiple of ``batch_size``).

    One batch per block (the plain step-by-step loop) when incremental norms are off
    (``batch_size > INCREMENTAL_NORMS_MAX_BATCH``); otherwise about :data:`BLOCK_ROWS`, and at
    most ``2·dim`` rows, past which tracking the block's scores (O(G·rows) per step) costs more
    than the O(G·dim) pass over W it saves.
    """
    B = int(batch_size)
    if B > INCREMENTAL_NORMS_MAX_BATCH:
        return B
    return B * max(1, min(BLOCK_ROWS, 2 * int(dim)) // B)


def online_block(W: torch.Tensor, wsq: torch.Tensor, xb: torch.Tensor, sqd: torch.Tensor, *,
                 batch_size: int, t0: int, total: int, alpha0: float, sigma0: float, decay: str,
                 metric: str, step0: int, losses: torch.Tensor, lrs: np.ndarray) -> int:
    """The online rule over consecutive mini-batches ``xb`` with one read and one write of ``W``.

    Equal, up to float rounding, to calling :func:`online_step` on each mini-batch of
    ``batch_size`` rows in turn (the same α, σ, BMUs, neighbourhoods and ``‖W_j‖²``), but the
    weights are touched only twice per block instead of three times per step:

    * the scores ``S = W Xᵀ`` of every row of the block are computed at the start by one matrix
      product, and kept equal to the current weights' after each step ``W ← diag(c) W + U``
      (``U = α/B · Hᵀ x``) by ``S ← diag(c) S + α/B · Hᵀ (x Xᵀ)``: O(G·rows) per step, no pass
      over W;
    * the steps' updates are gathered (each ``U`` scaled by the later steps' ``c``) and applied
      at the end by one product: ``W ← diag(Π c) W + Ĥᵀ X``.

    ``‖W_j‖²`` is recomputed exactly from W at the start of each block and updated
    incrementally within it (as in :func:`online_step`). Arguments as in :func:`online_pass`;
    returns the samples seen after the block.
    """
    B, nb, G = int(batch_size), xb.shape[0], W.shape[0]
    _sq_norms(W, out=wsq)
    S = torch.mm(W, xb.t())                                   # [G, nb]
    gram = torch.mm(xb, xb.t())                               # [nb, nb]
    pending = torch.empty(nb, G, device=W.device, dtype=W.dtype)   # Ĥ
    scale = torch.ones(G, device=W.device, dtype=W.dtype)          # Π c
    best = torch.empty(nb, device=W.device, dtype=W.dtype)
    bmus = torch.empty(nb, device=W.device, dtype=torch.long)
    t, step = t0, step0
    for a in range(0, nb, B):
        b = min(a + B, nb)
        St = S[:, a:b]
        s = decay_factor(decay, t, total)
        lrs[step] = s
        coef = alpha0 * s / (b - a)
        torch.max(bmu_scores(St, wsq, metric), dim=0, out=(best[a:b], bmus[a:b]))
        H = neighbourhood(sqd, bmus[a:b], sigma0 * s)        # [b−a, G]
        c = torch.rsub(torch.sum(H, 0), 1.0, alpha=coef)     # 1 − coef · Σ_b h_bj
        # ‖c W + U‖² = c (c ‖W‖² + 2 coef Σ_b h S) + coef² hᵀ(x xᵀ)h
        wu = (H * St.t()).sum(0)
        uu = (torch.mm(gram[a:b, a:b], H) * H).sum(0)
        wsq.mul_(c).add_(wu, alpha=2.0 * coef).mul_(c).add_(uu, alpha=coef * coef)
        if b < nb:
            S[:, b:].mul_(c[:, None]).addmm_(H.t(), gram[a:b, b:], alpha=coef)
        if a:
            pending[:a].mul_(c)
        torch.mul(H, coef, out=pending[a:b])
        scale.mul_(c)
        t += b - a
        step += 1
    W.mul_(scale[:, None])
    W.addmm_(pending.t(), xb)
    dist = _bmu_distance(best, torch.diagonal(gram), metric)
    steps = torch.arange(nb, device=W.device) // B
    losses[step0:step].index_add_(0, steps, dist)
    return t


def online_pass(W: torch.Tensor, wsq: torch.Tensor, chunk: torch.Tensor, sqd: torch.Tensor, *,
                batch_size: int, t0: int, total: int, alpha0: float, sigma0: float, decay: str,
                metric: str, step0: int, losses: torch.Tensor, lrs: np.ndarray) -> int:
    """Run the online rule over one chunk of rows (already in batch order) on ``W`` in place.

    ``losses[i]`` receives the sum of BMU distances of step ``step0 + i``-th batch of the
    epoch and ``lrs[i]`` its scale ``s``; returns the number of samples seen after the chunk.
    The chunk is processed in blocks of :func:`block_rows` rows (:func:`online_block`); a chunk
    holds whole blocks (except at the end of the epoch), so results do not depend on how the
    data is chunked.
    """
    n = chunk.shape[0]
    t = t0
    step = step0
    rows = block_rows(batch_size, W.shape[1])
    if batch_size > INCREMENTAL_NORMS_MAX_BATCH:  # blocks need the incremental norms
        _sq_norms(W, out=wsq)  # online_step recomputes them after each step
        for start in range(0, n, batch_size):
            x = chunk[start:start + batch_size]
            s = decay_factor(decay, t, total)
            lrs[step] = s
            dist = online_step(W, wsq, x, sqd, alpha0 * s, sigma0 * s, metric)
            losses[step] = dist.sum()
            t += x.shape[0]
            step += 1
        return t
    for start in range(0, n, rows):
        xb = chunk[start:start + rows]
        t = online_block(W, wsq, xb, sqd, batch_size=batch_size, t0=t, total=total, alpha0=alpha0,
                         sigma0=sigma0, decay=decay, metric=metric, step0=step, losses=losses,
                         lrs=lrs)
        step += -(-xb.shape[0] // batch_size)
    return t


def batch_accumulate(W: torch.Tensor, wsq: torch.Tensor, chunk: torch.Tensor, sqd: torch.Tensor,
                     sigma: float, metric: str, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Add one chunk's ``Hᵀ X`` to ``num`` [G, D] and ``Hᵀ 1`` to ``den`` [G]; returns BMU distances."""
    St = torch.mm(W, chunk.t())
    best, bmu = bmu_scores(St, wsq, metric).max(dim=0)
    xsq = (chunk * chunk).sum(1)
    dist = _bmu_distance(best, xsq, metric)
    H = neighbourhood(sqd, bmu, sigma)
    num.addmm_(H.t(), chunk)
    den.add_(H.sum(0))
    return dist


def online_step_shared(W: torch.Tensor, wsq: torch.Tensor, x: torch.Tensor, sqd: torch.Tensor,
                       alpha: float, sigma: float, metric: str, batch_size: int, reduce) -> float:
    """One online update of a mini-batch whose rows are split across processes (data-parallel).

    The update ``W_j ← c_j W_j + α/B (Hᵀ X)_j`` with ``c_j = 1 − α/B (Hᵀ 1)_j`` depends on the
    batch only through the sums ``Hᵀ X`` and ``Hᵀ 1``: each process computes them over its own
    rows ``x``, ``reduce`` sums them over the processes, and every process applies the same
    update to its copy of ``W``. Equal to :func:`online_step` on the whole batch up to the order
    of float additions.

    Parameters
    ----------
    W, wsq, sqd, alpha, sigma, metric
        As in :func:`online_step` (``wsq`` is recomputed exactly after the update).
    x : torch.Tensor [b, D]
        This process's rows of the batch (may be empty).
    batch_size : int
        Rows of the whole (global) batch, ``B`` above.
    reduce : callable
        Sums a flat float32 tensor over the processes in place (``distributed.all_reduce_``).

    Returns
    -------
    float
        Sum of the BMU distances over the whole batch.
    """
    G, D = W.shape
    buf = torch.zeros(G * D + G + 1, device=W.device, dtype=torch.float32)
    if x.shape[0]:
        St = torch.mm(W, x.t())
        best, bmu = bmu_scores(St, wsq, metric).max(dim=0)
        dist = _bmu_distance(best, (x * x).sum(1), metric)
        H = neighbourhood(sqd, bmu, sigma)
        torch.mm(H.t(), x, out=buf[:G * D].view(G, D))
        torch.sum(H, 0, out=buf[G * D:G * D + G])
        buf[-1] = dist.sum()
    reduce(buf)
    coef = alpha / batch_size
    c = buf[G * D:G * D + G].mul(-coef).add_(1.0)
    W.mul_(c[:, None]).add_(buf[:G * D].view(G, D), alpha=coef)
    _sq_norms(W, out=wsq)
    return float(buf[-1])


def online_pass_shared(W: torch.Tensor, wsq: torch.Tensor, chunk: torch.Tensor, counts, sizes,
                       sqd: torch.Tensor, *, t0: int, total: int, alpha0: float, sigma0: float,
                       decay: str, metric: str, step0: int, losses: torch.Tensor, lrs: np.ndarray,
                       reduce) -> int:
    """:func:`online_pass` for a process that holds only its part of every global batch.

    ``chunk`` is this process's rows of consecutive global batches, ``counts[i]`` how many of
    them belong to the ``i``-th batch and ``sizes[i]`` that batch's global size. The schedule
    (α, σ at ``t`` samples seen) follows the global batches, so every process applies the same
    updates; returns the samples seen after the chunk.
    """
    t, start = t0, 0
    for i, (cnt, size) in enumerate(zip(counts, sizes)):
        step = step0 + i
        s = decay_factor(decay, t, total)
        lrs[step] = s
        x = chunk[start:start + int(cnt)]
        losses[step] = online_step_shared(W, wsq, x, sqd, alpha0 * s, sigma0 * s, metric,
                                          int(size), reduce)
        start += int(cnt)
        t += int(size)
    return t

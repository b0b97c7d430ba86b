"""Vector codes: pure tensor functions turning a layer's activation into one vector per sample.

For a conv feature map ``[B, C, H, W]`` each channel's H×W map gives up to four statistics,
laid out stat by stat: ``[max(C) | mean(C) | std(C) | com(C)]`` (ResNet18 CL1–CL4: 256, 512,
1024, 2048 numbers). Token activations ``[B, D]`` (ViT CLS tokens) are kept raw.

Centre of mass (``com``), our definition where the paper is silent: the activation-weighted
centroid of the channel map, with activations shifted by the map's minimum so every weight is
≥ 0.

* ``com="flat"`` (default, one number per channel, matching the paper's 4 × channels): the
  centroid of the row-major flattened map (positions 0 … H·W−1) divided by H·W − 1, so it
  lies in [0, 1];
* ``com="rc"`` (two numbers per channel): the row and the column centroid, divided by H − 1
  and W − 1. The com block is then ``[row(C) | col(C)]``.

A constant map (all weights 0 after the shift) and a 1-pixel axis have no defined centroid:
they get 0.5, the middle of the range.

Statistics are always laid out in the canonical order ``max, mean, std, com`` whatever order
``stats`` lists them in, so codes made with the same subset always line up.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["STATS", "COM_MODES", "vector_code", "center_of_mass", "layer_code", "code_dim",
           "normalize_stats"]

STATS = ("max", "mean", "std", "com")
COM_MODES = ("flat", "rc")


def normalize_stats(stats: str | Sequence[str] = STATS) -> tuple[str, ...]:
    """Validate a stats selection and return it in canonical order.

    Parameters
    ----------
    stats : str or sequence of str
        Names from :data:`STATS`; a string may be comma-separated (``"max,mean"``).

    Raises
    ------
    ValueError
        Empty selection, unknown or repeated names.
    """
    items = [s.strip().lower() for s in (stats.split(",") if isinstance(stats, str) else stats)]
    items = [s for s in items if s]
    if not items:
        raise ValueError(f"no statistics selected: choose from {', '.join(STATS)}")
    bad = [s for s in items if s not in STATS]
    if bad:
        raise ValueError(f"unknown statistic {bad[0]!r}: choose from {', '.join(STATS)}")
    if len(set(items)) != len(items):
        raise ValueError(f"statistic listed twice in {items}: list each once")
    return tuple(s for s in STATS if s in items)


def _check_com(com: str) -> str:
    if com not in COM_MODES:
        raise ValueError(f"unknown centre-of-mass mode {com!r}: use 'flat' or 'rc'")
    return com


def code_dim(channels: int, stats: str | Sequence[str] = STATS, com: str = "flat") -> int:
    """Length of the vector code of a feature map with ``channels`` channels."""
    stats = normalize_stats(stats)
    per = sum(2 if (s == "com" and _check_com(com) == "rc") else 1 for s in stats)
    return per * int(channels)


def _weighted_centroid(w: torch.Tensor, total: torch.Tensor, n: int) -> torch.Tensor:
    """Centroid along the last axis of weights ``w`` [..., n], normalised to [0, 1]."""
    if n == 1:
        return torch.full(w.shape[:-1], 0.5, dtype=w.dtype, device=w.device)
    pos = torch.linspace(0.0, 1.0, n, dtype=w.dtype, device=w.device)
    num = w @ pos
    out = num / total.clamp_min(torch.finfo(w.dtype).tiny)
    # a constant map has no centroid: put it in the middle
    return torch.where(total > 0, out, torch.full_like(out, 0.5))


def _com_from_weights(w: torch.Tensor, H: int, W: int, mode: str) -> torch.Tensor:
    """Centre of mass from min-shifted weights ``w`` [B, C, H·W]."""
    total = w.sum(dim=-1)
    if mode == "flat":
        return _weighted_centroid(w, total, H * W)
    w4 = w.view(*w.shape[:2], H, W)
    row = _weighted_centroid(w4.sum(dim=-1), total, H)
    col = _weighted_centroid(w4.sum(dim=-2), total, W)
    return torch.stack([row, col], dim=-1)


def center_of_mass(fmap: torch.Tensor, mode: str = "flat") -> torch.Tensor:
    """Centre of mass of each channel map (see the module docstring for the definition).

    Parameters
    ----------
    fmap : Tensor [B, C, H, W]
    mode : {"flat", "rc"}

    Returns
    -------
    Tensor
        ``"flat"``: [B, C] in [0, 1]; ``"rc"``: [B, C, 2] (row, column), each in [0, 1].
    """
    _check_com(mode)
    if fmap.ndim != 4:
        raise ValueError(f"center_of_mass needs a feature map [B, C, H, W], got shape {tuple(fmap.shape)}")
    B, C, H, W = fmap.shape
    flat = fmap.reshape(B, C, H * W)
    return _com_from_weights(flat - flat.amin(dim=-1, keepdim=True), H, W, mode)


def vector_code(fmap: torch.Tensor, stats: str | Sequence[str] = STATS, com: str = "flat") -> torch.Tensor:
    """Vector code of a feature map: per-channel statistics concatenated stat by stat.

    Parameters
    ----------
    fmap : Tensor [B, C, H, W]
    stats : sequence of str
        Subset of ``("max", "mean", "std", "com")``; always laid out in that order.
    com : {"flat", "rc"}
        One (flat) or two (row, column) centre-of-mass numbers per channel.

    Returns
    -------
    Tensor [B, D]
        ``D = len(stats) * C`` (``+ C`` more with ``com="rc"``), same dtype as ``fmap``.
        Standard deviation is the population one (divide by H·W).
    """
    stats = normalize_stats(stats)
    _check_com(com)
    if fmap.ndim != 4:
        raise ValueError(f"vector_code needs a feature map [B, C, H, W], got shape {tuple(fmap.shape)}")
    B, C, H, W = fmap.shape
    n = H * W
    flat = fmap.reshape(B, C, n)
    parts: list[torch.Tensor] = []
    # plain reductions (sum, amax, norm) are several times faster on CPU than std_mean/aminmax,
    # which keeps the codes within a few percent of the forward pass (benchmarks/code_overhead.py)
    if "max" in stats:
        parts.append(flat.amax(dim=-1))
    if "mean" in stats or "std" in stats:
        mean = flat.sum(dim=-1) / n
        if "mean" in stats:
            parts.append(mean)
        if "std" in stats:
            # two-pass (centred) population std: no cancellation for maps far from zero
            parts.append(torch.linalg.vector_norm(flat - mean[..., None], dim=-1) / n ** 0.5)
    if "com" in stats:
        c = _com_from_weights(flat - flat.amin(dim=-1, keepdim=True), H, W, com)
        parts.extend([c] if com == "flat" else [c[..., 0], c[..., 1]])
    return torch.cat(parts, dim=1)


def layer_code(activation: torch.Tensor, stats: str | Sequence[str] = STATS, com: str = "flat") -> torch.Tensor:
    """Code of one layer's activation: vector code of a feature map, raw copy of a token.

    Parameters
    ----------
    activation : Tensor
        [B, C, H, W] feature map (``CL`` layers, conv modules) → :func:`vector_code`;
        [B, D] token (``CLS`` layers) → returned unchanged; any other shape (e.g. a module's
        [B, T, D] token sequence) is flattened to [B, -1].
    stats, com
        See :func:`vector_code` (ignored for non-4-D activations).

    Returns
    -------
    Tensor [B, D]
    """
    if activation.ndim == 4:
        return vector_code(activation, stats, com)
    if activation.ndim == 2:
        return activation
    if activation.ndim < 2:
        raise ValueError(f"activation of shape {tuple(activation.shape)} has no batch of vectors")
    return activation.reshape(activation.shape[0], -1)

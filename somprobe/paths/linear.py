"""The straight line between two points: the "linearly connectable" baseline of study 001."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .core import CHUNK, PathBatch, empty_stats, linear_profile
from .spaces import Space

__all__ = ["find_linear"]


def find_linear(space: Space, a: Tensor, b: Tensor, target: Tensor, *, points: int = 100,
                chunk: int = CHUNK, generator: torch.Generator | None = None,
                progress: bool = False) -> PathBatch:
    """The straight path ``a → b`` of each pair, checked at ``points`` points.

    Parameters
    ----------
    space : Space
    a, b : Tensor [P, *shape]
        Start and end points.
    target : LongTensor [P]
        Class every point should be predicted as.
    points : int
        Points along each line, both ends included (default 100).
    chunk : int
        Points per forward pass.
    generator, progress
        Unused (the line has no randomness and one pass); kept so every method has the same call.

    Returns
    -------
    PathBatch
        Two anchors per pair; ``path_ok`` = linearly connectable, ``length_ratio`` = 1,
        ``iterations`` = 0; ``failed`` where an end point is not finite.
    """
    prof = linear_profile(space, a, b, target, points, chunk=chunk)
    stats = empty_stats(len(a))
    stats["path_ok"] = prof["linear_ok"]
    stats["max_loss"] = prof["max_loss"]
    finite = (torch.isfinite(a.flatten(1)).all(1) & torch.isfinite(b.flatten(1)).all(1)).cpu().numpy()
    same = ((a - b).flatten(1).norm(dim=1) == 0).cpu().numpy()
    stats["length_ratio"] = np.where(finite & ~same, 1.0, np.nan)
    stats["failed"] = ~finite
    stats["reason"] = np.where(finite, "", "non-finite end point").astype(object)
    return PathBatch(torch.stack([a, b], 1).detach(), torch.full((len(a),), 2, dtype=torch.long), stats)

"""The curvature detector of study 002 (Fawzi et al. 2018, Algorithm 2), training-free.

Near a natural image the decision boundaries between its predicted class and the others curve
on average *negatively* (seen from the image); an adversarial perturbation puts the input just
across a boundary, where they curve positively. Algorithm 2 averages ``vᵀ G_{F_i} v`` over ``T``
random unit directions and over the classes ``i ≠ k̂`` (``G`` the Hessian of ``F_i = f_i − f_k̂``
projected on the tangent space, :func:`somprobe.geometry.class_curvatures`), flags the input when
this ρ exceeds a threshold ``t`` and recovers the label as the class of the most positively curved
boundary. The only thing fitted here is ``t``: the accuracy-maximising threshold on the training
pairs (the paper sweeps it).
"""
from __future__ import annotations

import numpy as np
import torch

from ..device import resolve_device
from .base import Detector, as_images, eval_mode

__all__ = ["CurvatureDetector"]


class CurvatureDetector(Detector):
    """Study 002's Algorithm 2: average boundary curvature at the input, threshold, label recovery.

    Characteristics: ``[N, L]``, the mean over directions of ``vᵀ G_{F_i} v`` per class ``i``
    (NaN at the predicted class). Score ρ = their mean over ``i ≠ k̂``; recovered label = the
    ``argmax`` over ``i ≠ k̂``.

    Parameters
    ----------
    model : nn.Module
    n_directions : int
        ``T``, random directions uniform on the sphere (default 20; the same for every class of
        an input, as in the algorithm).
    method : {"fd", "exact"}
        Hessian-vector products by finite differences of gradients (default; a ReLU network's
        exact Hessian vanishes almost everywhere) or double backprop.
    h : float, optional
        Finite-difference step in pixel L2 units (default: geometry's ``DEFAULT_H``).
    seed : int
        Seed of the directions (one local generator consumed in input order).
    device, batch_size
        ``batch_size`` inputs at a time; each brings ``(L−1)·T·2`` points, bounded by ``chunk``.
    chunk : int, optional
        Most points through the model at once (geometry's default when None).
    """

    name = "curvature"
    recovers_labels = True

    def __init__(self, model, *, n_directions: int = 20, method: str = "fd", h: float | None = None,
                 seed: int = 0, device="auto", batch_size: int = 16, chunk: int | None = None):
        self.model = model
        self.n_directions = n_directions
        self.method = method
        self.h = h
        self.seed = seed
        self.device = device
        self.batch_size = batch_size
        self.chunk = chunk

    def features(self, x, **context) -> np.ndarray:
        from ..geometry import DEFAULT_H, class_curvatures

        x = as_images(x)
        dev = resolve_device(self.device)
        self.model.to(dev)
        gen = torch.Generator().manual_seed(int(self.seed))
        h = DEFAULT_H if self.h is None else self.h
        out = []
        with eval_mode(self.model):
            for s in range(0, x.shape[0], int(self.batch_size)):
                cc = class_curvatures(self.model, x[s:s + self.batch_size].to(dev),
                                      directions=int(self.n_directions), method=self.method, h=h,
                                      generator=gen, chunk=self.chunk)
                out.append(cc.per_class.double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0))

    @staticmethod
    def rho(f: np.ndarray) -> np.ndarray:
        """Algorithm 2's ρ from the per-class characteristics (mean over the classes ≠ k̂)."""
        return np.nanmean(f, axis=1)

    def _fit(self, clean, adversarial):
        pass  # training-free: only the threshold is chosen (by the base class) on the pairs

    def _score(self, f):
        return self.rho(f)

    def _recover(self, f):
        return np.argmax(np.where(np.isnan(f), -np.inf, f), axis=1)

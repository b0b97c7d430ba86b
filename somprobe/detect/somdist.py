"""The SOM-distance detector (ours, from study 003's functional codes).

Per layer, two characteristics of an input on the run's SOMs: how far its top-k BMUs land from
its *predicted* class's centre (D_class with the prediction as the label), and how far they move
when a small uniform noise is added (the clean-vs-noise BMU shift). An adversarial input is
predicted as a class whose region its deep codes do not sit in, and it sits next to a decision
boundary, so both tend to be larger. Logistic regression on the ``2 × layers`` numbers.
"""
from __future__ import annotations

import numpy as np
import torch

from ..analysis.centres import d_class
from ..analysis.shifts import bmu_shifts
from ..attacks.core import uniform_noise
from ..codes import STATS, layer_code
from ..device import resolve_device
from ..errors import DetectError
from .base import LogisticDetector, as_images, eval_mode

__all__ = ["SOMDistanceDetector"]


class SOMDistanceDetector(LogisticDetector):
    """Distance of the BMUs to the predicted class centre + BMU shift under noise, per layer.

    Parameters
    ----------
    model : NormalizedModel
    soms : dict[str, SOM]
        One fitted SOM per layer (``somprobe.som.SOM``), trained on the layer's vector codes.
    centres : dict[str, DataFrame]
        Class centres per layer (:func:`somprobe.analysis.class_centres` of the SOM-tr BMUs).
    stats, com
        The code definition the SOMs were trained on (the code store's manifest).
    k : int
        BMUs per input (study 003: 10).
    noise_eps : float
        Amplitude of the symmetric uniform noise copy (pixel units).
    seed : int
        Seed of the noise (a local generator; the same inputs in the same order get the same noise).
    C, max_iter, device, batch_size
    """

    name = "som_distance"

    def __init__(self, model, soms: dict, centres: dict, *, stats=STATS, com: str = "flat",
                 k: int = 10, noise_eps: float = 8 / 255, seed: int = 0, C: float = 1.0,
                 max_iter: int = 2000, device="auto", batch_size: int = 128):
        super().__init__(C=C, max_iter=max_iter)
        if not soms:
            raise DetectError("the SOM-distance detector needs fitted SOMs: run `somprobe fit`")
        missing = sorted(set(soms) - set(centres))
        if missing:
            raise DetectError(f"no class centres for layers {missing}: compute them from the "
                              f"SOM-tr BMUs (somprobe.analysis.class_centres)")
        self.model = model
        self.soms = soms
        self.centres = centres
        self.stats = stats
        self.com = com
        self.k = k
        self.noise_eps = noise_eps
        self.seed = seed
        self.device = device
        self.batch_size = batch_size

    @property
    def layers(self) -> list[str]:
        return list(self.soms)

    def feature_names(self) -> list[str]:
        """Column names of :meth:`features`: ``d_pred:<layer>`` and ``noise_shift:<layer>``."""
        return [f"{kind}:{layer}" for layer in self.layers for kind in ("d_pred", "noise_shift")]

    def features(self, x, **context) -> np.ndarray:
        from ..models import ProbedModel

        x = as_images(x)
        dev = resolve_device(self.device)
        self.model.to(dev)
        probe = ProbedModel(self.model, self.layers)
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed))
        codes = {l: [] for l in self.layers}
        noisy = {l: [] for l in self.layers}
        preds = []
        with eval_mode(self.model), torch.no_grad():
            for s in range(0, x.shape[0], int(self.batch_size)):
                b = x[s:s + self.batch_size].to(dev)
                bn = uniform_noise(b, eps=self.noise_eps, symmetric=True, generator=gen)
                logits, acts = probe(torch.cat([b, bn]))
                preds.append(logits[: len(b)].argmax(1).cpu())
                for l in self.layers:
                    c = layer_code(acts[l], self.stats, self.com).float().cpu()
                    codes[l].append(c[: len(b)])
                    noisy[l].append(c[len(b):])
        pred = torch.cat(preds).numpy()
        cols = []
        for l in self.layers:
            som = self.soms[l]
            b_clean, _ = som.bmus(torch.cat(codes[l]), k=self.k)
            b_noise, _ = som.bmus(torch.cat(noisy[l]), k=self.k)
            cols.append(d_class(b_clean, pred, self.centres[l], som.grid, k=self.k))
            cols.append(bmu_shifts(b_clean, b_noise, som.grid).mean(axis=1))
        return np.stack(cols, axis=1)

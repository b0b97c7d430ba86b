"""Synthetic path ends made from noise (studies 000 and 002). Pure tensor code, no I/O.

- :func:`noise_optimal_pairs` — study 000's test on untrained networks: for each class, inputs
  optimised from Gaussian noise to that class (:func:`~somprobe.paths.optimise.class_optimal_inputs`),
  paired two by two within the class.
- :func:`noise_adversarial` — study 002's third scenario, "(b) adversarially perturbed from
  random noise": a uniform-noise image moved by the smallest (DeepFool, targeted) perturbation
  into the class of the natural image it is paired with, with a logit margin so that it is
  labelled that class with some room.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import PathError
from .optimise import OptimResult, _count, class_optimal_inputs

__all__ = ["noise_optimal_pairs", "noise_adversarial"]


def noise_optimal_pairs(
    logits,
    num_classes: int,
    n_pairs: int,
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    device="cpu",
    **optim,
) -> tuple[Tensor, Tensor, Tensor, OptimResult]:
    """Pairs of class-optimal inputs from Gaussian noise, classes taken in turn.

    Pair i joins two inputs optimised to class ``i mod num_classes`` from two different noise
    draws (all ``2 × n_pairs`` inputs in one batch).

    Parameters
    ----------
    logits : callable
        Points → logits (the model on pixels).
    num_classes : int
    n_pairs : int
    shape : tuple
        Shape of one input, e.g. ``(3, 32, 32)``.
    seed : int
        Seeds the noise.
    device : str or torch.device
    **optim
        Passed to :func:`~somprobe.paths.optimise.class_optimal_inputs` (``iters``, ``lr``,
        ``lambda_hf``, ``tol``, ``std`` ...).

    Returns
    -------
    a, b : Tensor [n_pairs, *shape]
    target : LongTensor [n_pairs]
    result : OptimResult
        Of all ``2 × n_pairs`` inputs (rows ``0..n-1`` are the a's, ``n..2n-1`` the b's):
        their loss, iterations, ``converged``.
    """
    num_classes = _count("num_classes", num_classes, low=1)
    n_pairs = _count("n_pairs", n_pairs, low=1)
    cls = np.arange(n_pairs) % num_classes
    res = class_optimal_inputs(logits, np.concatenate([cls, cls]), shape, seed=seed, device=device, **optim)
    target = torch.as_tensor(cls, dtype=torch.long, device=res.x.device)
    return res.x[:n_pairs], res.x[n_pairs:], target, res


def noise_adversarial(
    model: torch.nn.Module,
    target: Tensor,
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    margin: float = 1.0,
    overshoot: float = 0.02,
    max_steps: int = 100,
    clip: tuple[float, float] = (0.0, 1.0),
):
    """Uniform-noise images projected into class ``target`` by targeted DeepFool.

    Parameters
    ----------
    model : nn.Module
        Classifier on pixels in ``clip``.
    target : LongTensor [N]
        Class each image must end up in.
    shape : tuple
        Shape of one image.
    seed : int
        Seeds the noise (a local CPU generator: the same images on every device).
    margin, overshoot, max_steps
        Of :func:`somprobe.attacks.deepfool.deepfool`.
    clip : (float, float)
        Pixel range of the noise and of every iterate.

    Returns
    -------
    DeepFoolResult
        ``images`` (the perturbed noise), ``converged`` (reached the class with the margin),
        ``r`` (the perturbation), ``iterations``.
    """
    from ..attacks.deepfool import deepfool

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise PathError(f"seed must be an integer, got {seed!r}")
    target = torch.as_tensor(target).long()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    lo, hi = clip
    noise = (lo + (hi - lo) * torch.rand((len(target), *shape), generator=gen)).to(target.device)
    return deepfool(model, noise, target=target, margin=margin, overshoot=overshoot,
                    max_iter=max_steps, clip=clip)

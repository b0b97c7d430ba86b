"""Synthetic path ends made from noise (studies 000 and 002). Pure tensor code, no I/O.

- :func:`noise_optimal_pairs` — study 000's test on untrained networks: for each class, inputs
  optimised from Gaussian noise to that class (:func:`~somprobe.paths.optimise.class_optimal_inputs`),
  paired two by two within the class.
- :func:`noise_adversarial` — study 002's third scenario, "(b) adversarially perturbed from
  random noise": a uniform-noise image moved by the smallest (DeepFool, targeted) perturbation
  into the class of the natural image it is paired with, with a logit margin so that it is
  labelled that class with some room (by default the projection of the region paths,
  :func:`~somprobe.paths.projection.project_leading`: one backward pass per step).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import PathError
from .optimise import OptimResult, _count, class_optimal_inputs

__all__ = ["noise_optimal_pairs", "noise_adversarial", "calibrate_untrained_batchnorm"]


def _batchnorms(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


@torch.no_grad()
def calibrate_untrained_batchnorm(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    batches: int = 4,
    batch_size: int = 64,
    mean: float = 0.5,
    std: float = 0.1,
    clip: tuple[float, float] | None = (0.0, 1.0),
) -> bool:
    """Give an untrained network's BatchNorm layers running statistics of Gaussian-noise inputs.

    A freshly initialised network in eval mode normalises with the initial running statistics
    (mean 0, variance 1), i.e. not at all: measured on timm's resnet18 at 32 px, its logits then
    vary by 0.007 (std over N(0.5, 0.1²) inputs, range ±0.1) — nearly a constant function, whose
    cross-entropy no input in [0, 1] can bring far below log C (Adam: 1.7–2.2 after 128 steps at
    any step size). With the statistics of the inputs it is used on (here: the noise the
    class-optimal inputs start from) the logits vary by 0.31 and Adam reaches 1e-3 in a few hundred
    steps. Eval mode is kept afterwards: every input's logits depend on it alone (train-mode
    BatchNorm would make them depend on the batch).

    Only networks whose BatchNorm layers have never seen data (``num_batches_tracked == 0`` in
    every layer) are touched; a trained network is returned unchanged.

    Parameters
    ----------
    model : nn.Module
        Modified in place (running statistics only; no parameter changes).
    shape : tuple
        Shape of one input.
    seed : int
        Seeds the noise (local CPU generator).
    batches, batch_size : int
        Noise batches averaged (cumulative moving average, ``momentum=None`` for the pass).
    mean, std, clip
        The noise N(mean, std²) clipped to ``clip`` (as :func:`class_optimal_inputs` starts from).

    Returns
    -------
    bool
        Whether the statistics were calibrated.
    """
    bns = _batchnorms(model)
    if not bns or any(int(m.num_batches_tracked) > 0 for m in bns):
        return False
    _count("batches", batches, low=1)
    _count("batch_size", batch_size, low=2)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    modes = [(m, m.training) for m in model.modules()]
    moms = [(m, m.momentum) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for _ in range(batches):
            x = mean + std * torch.randn((batch_size, *shape), generator=gen)
            if clip is not None:
                x = x.clamp(*clip)
            model(x.to(device))
    finally:
        for m, mom in moms:
            m.momentum = mom
        for m, mode in modes:
            m.training = mode
    return True


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
    method: str = "leading",
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
    method : {"leading", "deepfool"}
        Linearise the target against the leading class only
        (:func:`~somprobe.paths.projection.project_leading`, one backward pass per step) or
        against every class (:func:`somprobe.attacks.deepfool.deepfool`, C − 1 per step).

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
    if method == "leading":
        from .projection import project_leading

        return project_leading(model, noise, target, margin=margin, overshoot=overshoot,
                               max_steps=max_steps, clip=clip)
    if method != "deepfool":
        raise PathError(f"method={method!r}: use leading or deepfool")
    return deepfool(model, noise, target=target, margin=margin, overshoot=overshoot,
                    max_iter=max_steps, clip=clip)

"""Pair sources made from noise for ``somprobe connect --pair-source`` (studies 000 and 002).

- ``noise-optimal``: both ends optimised from Gaussian noise to a class (study 000's untrained
  networks; :func:`~somprobe.paths.synthetic.noise_optimal_pairs`), classes taken in turn. An
  untrained network's BatchNorm layers first get the running statistics of that noise
  (:func:`~somprobe.paths.synthetic.calibrate_untrained_batchnorm`, in place, so the path
  methods see the same function): with its initial statistics (no normalisation) the network is
  nearly constant and no input reaches low loss;
- ``noise-adversarial``: a correctly classified image of class c and a uniform-noise image moved
  into class c by targeted DeepFool with a logit margin (study 002's third scenario,
  :func:`~somprobe.paths.synthetic.noise_adversarial`).

The job calls :func:`draw_noise_pairs`, which returns the pair table and the end images (or the
dataset positions of natural ends) in the shape the job expects.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..errors import PathError
from .synthetic import calibrate_untrained_batchnorm, noise_adversarial, noise_optimal_pairs

__all__ = ["NOISE_SOURCES", "NOISE_DEFAULTS", "draw_noise_pairs"]

NOISE_SOURCES = ("noise-optimal", "noise-adversarial")
#: Optimisation of noise-optimal ends (Adam on pixels) and DeepFool of noise-adversarial ones.
# lr 0.05: at 0.01, 256 steps left untrained-resnet18 inputs at CE 0.004-0.27; at 0.05 8 of 10
# reached 1e-3 (the rest 0.003-0.1).
NOISE_DEFAULTS = dict(iters=512, lr=0.05, tol=1e-3, std=0.1, lambda_hf=0.05,
                      margin=1.0, overshoot=0.02, proj_steps=100)


def draw_noise_pairs(model, dataset, pool, *, source: str, n_pairs: int | None, seed: int,
                     max_pool: int, size: int, device, predict, options: dict | None = None):
    """Pairs of a noise source.

    Parameters
    ----------
    model : nn.Module
        Classifier on pixels in [0, 1] (eval mode, on ``device``).
    dataset : ImageDataset
        Natural images (``noise-adversarial`` only).
    pool : array of int
        Positions of ``dataset`` the natural ends come from.
    source : {"noise-optimal", "noise-adversarial"}
    n_pairs : int or None
        Pairs (None: one per class).
    seed : int
        Seeds the noise and the choice of natural images.
    max_pool : int
        Natural candidates predicted at most (a seeded subset of ``pool``).
    size : int
        Image side.
    device : torch.device
    predict : callable
        ``predict(model, dataset, positions, size, device) -> preds`` (the job's).
    options : dict, optional
        Overrides of :data:`NOISE_DEFAULTS`.

    Returns
    -------
    table : DataFrame
        ``id_a``, ``id_b``, ``class`` (the job adds ``pair`` and ``source``).
    counts : dict
        What was made and how much of it reached its class (``noise-optimal``: also whether an
        untrained network's BatchNorm statistics were calibrated on noise first).
    a : Tensor or array of int
        Images of the first ends (noise-optimal) or their dataset positions (noise-adversarial).
    b : Tensor
        Images of the second ends, on the CPU.
    """
    if source not in NOISE_SOURCES:
        raise PathError(f"unknown noise pair source {source!r}; use one of {', '.join(NOISE_SOURCES)}")
    opt = dict(NOISE_DEFAULTS)
    opt.update({k: v for k, v in (options or {}).items() if k in NOISE_DEFAULTS})
    n_classes = int(getattr(model, "num_classes", 0) or getattr(dataset, "num_classes", 0) or 0)
    if n_classes < 2:
        raise PathError("noise pair sources need the number of classes of the model (>= 2)")
    shape = (3, int(size), int(size))
    if source == "noise-optimal":
        n = n_classes if n_pairs is None else int(n_pairs)
        calibrated = calibrate_untrained_batchnorm(model, shape, seed=seed + 1, std=opt["std"])
        a, b, target, res = noise_optimal_pairs(
            model, n_classes, n, shape, seed=seed, device=device, iters=opt["iters"], lr=opt["lr"],
            tol=opt["tol"], std=opt["std"], lambda_hf=opt["lambda_hf"])
        ok = res.converged[:n] & res.converged[n:]
        table = pd.DataFrame({"id_a": [f"noise-opt:{seed}:{i}a" for i in range(n)],
                              "id_b": [f"noise-opt:{seed}:{i}b" for i in range(n)],
                              "class": target.cpu().numpy()})
        counts = {"made": 2 * n, "converged": int(res.converged.sum()), "pairs_both_converged": int(ok.sum()),
                  "max_end_loss": float(np.nanmax(res.loss)) if len(res.loss) else None,
                  "batchnorm_calibrated": bool(calibrated)}
        return table, counts, a.cpu(), b.cpu()

    ids = np.asarray(dataset.ids, dtype=object)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(pool))[:max_pool]
    sub = pool[np.sort(order)]
    preds = predict(model, dataset, sub, size, device)
    correct = np.flatnonzero((preds == labels[sub]) | (labels[sub] < 0))
    if not len(correct):
        raise PathError("no correctly classified image in the pool to pair with noise")
    n = len(correct) if n_pairs is None else int(n_pairs)
    if n > len(correct):
        raise PathError(f"asked for {n} pairs but only {len(correct)} correctly classified images are "
                        f"in the pool; pass --pairs {len(correct)} or fewer")
    rng = np.random.default_rng(seed + 1)
    pick = np.sort(rng.permutation(correct)[:n])
    pa = sub[pick]
    target = torch.as_tensor(preds[pick], dtype=torch.long, device=device)
    res = noise_adversarial(model, target, shape, seed=seed, margin=opt["margin"],
                            overshoot=opt["overshoot"], max_steps=opt["proj_steps"])
    conv = res.converged.cpu().numpy()
    table = pd.DataFrame({"id_a": ids[pa], "id_b": [f"noise-adv:{seed}:{i}" for i in range(n)],
                          "class": preds[pick]})
    counts = {"pool": int(len(sub)), "correct": int(len(correct)), "made": int(n),
              "converged": int(conv.sum())}
    return table, counts, pa, res.images.detach().cpu()

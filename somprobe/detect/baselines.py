"""The field's standard baselines: max-softmax (the floor) and Mahalanobis (Lee et al. 2018)."""
from __future__ import annotations

import numpy as np
import torch

from ..device import resolve_device
from ..errors import DetectError
from .base import Detector, as_images, batched_forward, eval_mode

__all__ = ["penultimate", "MaxSoftmaxDetector", "MahalanobisDetector", "class_gaussians",
           "mahalanobis_distances"]


def penultimate(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features right before the classifier layer (timm's ``forward_head(pre_logits=True)``).

    ``model`` is somprobe's normalising wrapper around a timm network (``.net``, ``.normalize``).
    """
    net = getattr(model, "net", None)
    if net is None or not hasattr(net, "forward_features") or not hasattr(net, "forward_head"):
        raise DetectError(
            f"cannot find the penultimate features of a {type(model).__name__}: give a somprobe "
            f"model (build_model / load_trained) or pass feature_fn=callable(images) -> [N, D]")
    z = model.normalize(x) if hasattr(model, "normalize") else x
    return net.forward_head(net.forward_features(z), pre_logits=True).flatten(1)


class _ModelDetector(Detector):
    """Holds the classifier, the device and the batch size of characteristic computations."""

    def __init__(self, model, *, device="auto", batch_size: int = 128):
        self.model = model
        self.device = device
        self.batch_size = batch_size

    def _run(self, fn, x, *, grad: bool = False) -> list:
        dev = resolve_device(self.device)
        self.model.to(dev)
        with eval_mode(self.model):
            return batched_forward(fn, as_images(x), batch_size=int(self.batch_size), device=dev,
                                   grad=grad)


class MaxSoftmaxDetector(_ModelDetector):
    """The floor (Hendrycks & Gimpel 2017): score = 1 − max softmax probability.

    Characteristics: ``[N, 1]`` max softmax probability. Needs no fitting beyond the threshold.
    """

    name = "max_softmax"

    def features(self, x, **context) -> np.ndarray:
        parts = self._run(lambda b: self.model(b).softmax(1).amax(1).double().cpu(), x)
        return torch.cat(parts).numpy()[:, None]

    def _fit(self, clean, adversarial):
        pass

    def _score(self, f):
        return 1.0 - f[:, 0]


def class_gaussians(features, labels, *, shrinkage: str = "ledoit-wolf"):
    """Class means and the precision of a covariance tied across classes (Lee et al. 2018).

    Parameters
    ----------
    features : ndarray [N, D]
    labels : ndarray of int [N]
    shrinkage : {"ledoit-wolf", "none"}
        ``"none"``: pseudo-inverse of the empirical covariance of the class-centred features
        (Lee et al. via scikit-learn's ``EmpiricalCovariance``); ``"ledoit-wolf"`` (default):
        scikit-learn's ``LedoitWolf`` estimate, which stays well conditioned when, as here, there
        are fewer clean training inputs than feature dimensions.

    Returns
    -------
    classes : ndarray int64 [K]
    means : ndarray [K, D]
    precision : ndarray [D, D]
    """
    from sklearn.covariance import EmpiricalCovariance, LedoitWolf

    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if f.ndim != 2 or f.shape[0] != y.size or y.size < 1:
        raise DetectError(f"need features [N, D] with N >= 1 and one label each, got {f.shape} "
                          f"and {y.size} labels")
    classes, inv = np.unique(y, return_inverse=True)
    counts = np.bincount(inv).astype(np.float64)
    means = np.zeros((classes.size, f.shape[1]))
    np.add.at(means, inv, f)
    means /= counts[:, None]
    centred = f - means[inv]
    if shrinkage not in ("ledoit-wolf", "none"):
        raise DetectError(f"unknown shrinkage {shrinkage!r}; use 'ledoit-wolf' or 'none'")
    if y.size < 2:
        # one sample has no spread: every distance is 0 (the estimators would only warn)
        return classes, means, np.zeros((f.shape[1], f.shape[1]))
    if shrinkage == "ledoit-wolf":
        est = LedoitWolf(assume_centered=True).fit(centred)
    elif shrinkage == "none":
        est = EmpiricalCovariance(assume_centered=True).fit(centred)
    else:
        raise DetectError(f"unknown shrinkage {shrinkage!r}; use 'ledoit-wolf' or 'none'")
    return classes, means, est.get_precision()


def mahalanobis_distances(features, means, precision) -> np.ndarray:
    """Squared Mahalanobis distance of every input to every class mean: ``[N, K]``."""
    f = np.asarray(features, dtype=np.float64)
    diff = f[:, None, :] - np.asarray(means)[None]          # N×K×D, small: K classes
    return np.einsum("nkd,de,nke->nk", diff, precision, diff, optimize=True)


class MahalanobisDetector(_ModelDetector):
    """Lee et al. 2018 on the penultimate features, without input preprocessing.

    Class-conditional Gaussians with one tied covariance are fitted on the *clean* training
    inputs (labelled by the model's prediction, which is the true class there: the benchmark keeps
    correctly classified images only); score = the smallest squared Mahalanobis distance to a
    class mean (higher = further from every class = more adversarial). Lee et al.'s input
    preprocessing (a gradient step before scoring) and multi-layer ensemble are off.

    Characteristics: ``[N, 1 + D]``: column 0 the predicted class, then the D penultimate features.

    Parameters
    ----------
    model : nn.Module
    shrinkage : {"ledoit-wolf", "none"}
        Covariance estimate (see :func:`class_gaussians`).
    feature_fn : callable, optional
        ``images -> [N, D]`` tensor instead of :func:`penultimate`.
    device, batch_size
    """

    name = "mahalanobis"

    def __init__(self, model, *, shrinkage: str = "ledoit-wolf", feature_fn=None, device="auto",
                 batch_size: int = 128):
        super().__init__(model, device=device, batch_size=batch_size)
        self.shrinkage = shrinkage
        self.feature_fn = feature_fn

    def features(self, x, **context) -> np.ndarray:
        def one(b):
            feats = self.feature_fn(b) if self.feature_fn is not None else penultimate(self.model, b)
            pred = self.model(b).argmax(1)
            return torch.cat([pred[:, None].double(), feats.double()], 1).cpu()
        return torch.cat(self._run(one, x)).numpy()

    def _fit(self, clean, adversarial):
        self.classes_, self.means_, self.precision_ = class_gaussians(
            clean[:, 1:], clean[:, 0], shrinkage=self.shrinkage)

    def _score(self, f):
        return mahalanobis_distances(f[:, 1:], self.means_, self.precision_).min(axis=1)

    def _training_scores(self, clean, adversarial):
        # In-sample distances of the clean inputs the Gaussians were fitted on are too small (a
        # few hundred points in 512 dimensions), which would put the threshold below every test
        # clean input. Score each clean half with Gaussians fitted on the other half instead.
        n = len(clean)
        if n < 4:
            return super()._training_scores(clean, adversarial)
        half = np.arange(n) % 2 == 0
        out = np.empty(n)
        for fit_rows, score_rows in ((half, ~half), (~half, half)):
            _, means, prec = class_gaussians(clean[fit_rows, 1:], clean[fit_rows, 0],
                                             shrinkage=self.shrinkage)
            out[score_rows] = mahalanobis_distances(clean[score_rows, 1:], means, prec).min(axis=1)
        return np.r_[out, self._score(adversarial)]

"""Adversarial detectors with one fit/score interface, and the detection benchmark.

Modules: :mod:`.base` (the :class:`Detector` interface), :mod:`.metrics` (AUC, TPR at 5 % FPR,
the paired split), one module per detector family — :mod:`.curvature` (study 002, Algorithm 2),
:mod:`.losscurve` (study 000), :mod:`.somdist` (study 003's codes), :mod:`.spectral` (InputMFS),
:mod:`.baselines` (Mahalanobis, max-softmax) — and :mod:`.job` (``somprobe detect``).
"""
from __future__ import annotations

from .base import Detector, LogisticDetector
from .curvature import CurvatureDetector
from .baselines import MahalanobisDetector, MaxSoftmaxDetector, class_gaussians, mahalanobis_distances, penultimate
from .losscurve import LossCurveDetector, class_references, straight_line_loss
from .metrics import accuracy, best_threshold, paired_split, roc_auc, roc_curve, tpr_at_fpr
from .somdist import SOMDistanceDetector
from .spectral import InputMFSDetector, magnitude_spectrum

__all__ = [
    "Detector", "LogisticDetector", "CurvatureDetector", "InputMFSDetector", "magnitude_spectrum", "MaxSoftmaxDetector",
    "MahalanobisDetector", "class_gaussians", "mahalanobis_distances", "penultimate",
    "LossCurveDetector", "class_references", "straight_line_loss", "SOMDistanceDetector",
    "roc_curve", "roc_auc", "tpr_at_fpr", "accuracy", "best_threshold", "paired_split",
]

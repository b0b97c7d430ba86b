"""Exception types of somprobe. Each message names the problem and the fix."""
from __future__ import annotations

__all__ = [
    "SomprobeError", "DataError", "ModelError", "StoreError", "SOMError", "AnalysisError",
    "AttackError",
    "PathError",
    "DecoderError",
    "DetectError", "NotFittedError",
    "DistributedError",
    "GeometryError",
]


class SomprobeError(ValueError):
    """Base class of somprobe's errors (a ``ValueError``, so callers may catch either)."""


class DataError(SomprobeError):
    """A dataset cannot be found, read or split as asked."""


class ModelError(SomprobeError):
    """A model, checkpoint or layer name cannot be resolved."""


class StoreError(SomprobeError):
    """A code store is missing, incomplete, inconsistent or corrupt."""


class SOMError(SomprobeError):
    """A SOM cannot be built, trained or applied to the given data."""


class AnalysisError(SomprobeError):
    """An analysis lacks its inputs or they do not fit together."""


class AttackError(SomprobeError):
    """An attack's parameters or inputs are out of range."""


# detect (issue 11) -----------------------------------------------------------
class DetectError(SomprobeError):
    """A detector or the detection benchmark lacks its inputs or gets inconsistent ones."""


class NotFittedError(DetectError):
    """A detector was asked to score or predict before ``fit``."""


# distributed (issue 12) ------------------------------------------------------
class DistributedError(SomprobeError):
    """Ranks of a torchrun job disagree (devices, directory) or one of them failed or died."""


# paths (issues 9, 10) --------------------------------------------------------
class PathError(SomprobeError):
    """A path method's parameters or inputs are out of range (negative budgets, delta <= 0 ...)."""


class DecoderError(SomprobeError):
    """A latent-to-image decoder is missing, corrupt, foreign or asked for the wrong latent."""


# geometry (issue 11) ---------------------------------------------------------
class GeometryError(SomprobeError):
    """A curvature, Hessian or subspace computation gets bad parameters (h <= 0, k too large ...)."""

"""The one interface every adversarial detector follows (scikit-learn-like).

A detector turns each input into a row of *characteristics* (``features``: needs the model, no
fitting), learns from the characteristics of clean and adversarial training inputs
(``fit_features``) and scores new ones (``score_features``, higher = more adversarial). The
image-level verbs ``fit`` / ``score`` / ``predict`` / ``recover_labels`` compose the two, and the
benchmark job calls the two halves separately so characteristics are computed once and cached.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from ..errors import DetectError, NotFittedError
from .metrics import best_threshold

__all__ = ["Detector", "LogisticDetector", "as_images", "eval_mode", "batched_forward"]


def as_images(x) -> torch.Tensor:
    """Images ``[N, C, H, W]`` in [0, 1] as a float32 tensor (numpy arrays are accepted)."""
    t = torch.as_tensor(x)
    if t.ndim != 4:
        raise DetectError(f"inputs must be images [N, C, H, W], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise DetectError(f"inputs must be float pixels in [0, 1], got dtype {t.dtype}; divide "
                          "uint8 images by 255")
    return t.float()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration of a block; every submodule's own flag is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def batched_forward(fn, x: torch.Tensor, *, batch_size: int, device: torch.device,
                    grad: bool = False) -> list:
    """Apply ``fn`` to ``x`` in batches on ``device``; returns the list of per-batch results."""
    out = []
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        for s in range(0, x.shape[0], batch_size):
            out.append(fn(x[s:s + batch_size].to(device)))
    return out


class Detector:
    """Base class: fit on clean + adversarial training inputs, score test inputs.

    Subclasses implement :meth:`features` (inputs → characteristics ``[N, F]``), ``_fit`` and
    ``_score``; label-recovering ones also ``_recover``. After fitting, ``threshold_`` splits
    scores into the two decisions: the accuracy-maximising threshold on the training scores, or
    ``fixed_threshold`` when the subclass has one (0.5 for a probability).

    Attributes (after fit)
    ----------------------
    threshold_ : float
        ``predict`` flags ``score > threshold_``.
    n_features_ : int
        Width of the characteristics it was fitted on.
    """

    #: short name used in tables and on the command line
    name = "detector"
    #: whether :meth:`recover_labels` can give the pre-attack class
    recovers_labels = False
    #: a threshold that needs no fitting (e.g. 0.5 on a probability), or None
    fixed_threshold: float | None = None

    # ------------------------------------------------------------------ to implement
    def features(self, x, **context) -> np.ndarray:
        """Characteristics ``[N, F]`` (float64) of images ``x``; no fitted state is used."""
        raise NotImplementedError

    def _fit(self, clean: np.ndarray, adversarial: np.ndarray) -> None:
        raise NotImplementedError

    def _score(self, f: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _recover(self, f: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------ the interface
    def fit(self, clean, adversarial, **context) -> "Detector":
        """Fit on clean images and their adversarial counterparts (``[N, C, H, W]`` each)."""
        return self.fit_features(self.features(clean, **context),
                                 self.features(adversarial, **context))

    def score(self, x, **context) -> np.ndarray:
        """Score images ``x``: float64 ``[N]``, higher = more likely adversarial."""
        self._check_fitted()
        return self.score_features(self.features(x, **context))

    def predict(self, x, **context) -> np.ndarray:
        """Boolean ``[N]``: flagged as adversarial (``score > threshold_``)."""
        self._check_fitted()
        return self.predict_features(self.features(x, **context))

    def recover_labels(self, x, **context) -> np.ndarray:
        """Int64 ``[N]``: the class each input had before the attack (label-recovering detectors)."""
        self._check_recovers()
        self._check_fitted()
        return self.recover_labels_features(self.features(x, **context))

    # ------------------------------------------------------------------ on characteristics
    def fit_features(self, clean, adversarial) -> "Detector":
        """Fit on precomputed characteristics of clean and adversarial training inputs."""
        clean = self._as_features(clean, "clean")
        adversarial = self._as_features(adversarial, "adversarial")
        if clean.shape[1] != adversarial.shape[1]:
            raise DetectError(f"clean characteristics have {clean.shape[1]} columns but adversarial "
                              f"ones {adversarial.shape[1]}: compute both with the same detector")
        if clean.shape[0] == 0 or adversarial.shape[0] == 0:
            raise DetectError(f"cannot fit the {self.name} detector on {clean.shape[0]} clean and "
                              f"{adversarial.shape[0]} adversarial inputs: it needs both kinds")
        self.n_features_ = int(clean.shape[1])
        self._fit(clean, adversarial)
        self._fitted = True
        if self.fixed_threshold is not None:
            self.threshold_ = float(self.fixed_threshold)
        else:
            y = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
            self.threshold_ = best_threshold(y, self._training_scores(clean, adversarial))
        return self

    def _training_scores(self, clean, adversarial) -> np.ndarray:
        """Scores the threshold is chosen on (clean rows first); in-sample unless overridden."""
        return self._score(np.concatenate([clean, adversarial]))

    def score_features(self, f) -> np.ndarray:
        """Scores ``[N]`` of precomputed characteristics."""
        self._check_fitted()
        f = self._as_features(f, "inputs")
        if f.shape[1] != self.n_features_:
            raise DetectError(f"the {self.name} detector was fitted on {self.n_features_} "
                              f"characteristics per input but got {f.shape[1]}")
        return np.asarray(self._score(f), dtype=np.float64).reshape(-1)

    def predict_features(self, f) -> np.ndarray:
        """Flags ``[N]`` of precomputed characteristics."""
        return self.score_features(f) > self.threshold_

    def recover_labels_features(self, f) -> np.ndarray:
        """Recovered classes ``[N]`` from precomputed characteristics."""
        self._check_recovers()
        self._check_fitted()
        return np.asarray(self._recover(self._as_features(f, "inputs")), dtype=np.int64)

    # ------------------------------------------------------------------ helpers
    @property
    def is_fitted(self) -> bool:
        return bool(getattr(self, "_fitted", False))

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"the {self.name} detector is not fitted yet: call fit(clean, adversarial) (or "
                f"fit_features) on training pairs before score/predict/recover_labels")

    def _check_recovers(self) -> None:
        if not self.recovers_labels:
            raise DetectError(f"the {self.name} detector cannot recover labels; only detectors with "
                              f"recovers_labels=True (e.g. curvature) can")

    @staticmethod
    def _as_features(f, what: str) -> np.ndarray:
        f = np.asarray(f, dtype=np.float64)
        if f.ndim == 1:
            f = f[:, None]
        if f.ndim != 2:
            raise DetectError(f"{what} characteristics must be [N, F], got shape {f.shape}")
        return f

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'fitted' if self.is_fitted else 'not fitted'})"


class LogisticDetector(Detector):
    """Characteristics → standardised → logistic regression (Harder et al.'s light classifier).

    Score = predicted probability of "adversarial"; threshold 0.5.

    Parameters
    ----------
    C : float
        Inverse L2 regularisation strength of scikit-learn's ``LogisticRegression``.
    max_iter : int
    """

    fixed_threshold = 0.5

    def __init__(self, *, C: float = 1.0, max_iter: int = 2000):
        self.C = C
        self.max_iter = max_iter

    def _fit(self, clean, adversarial):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        X = np.concatenate([clean, adversarial])
        y = np.r_[np.zeros(len(clean), dtype=int), np.ones(len(adversarial), dtype=int)]
        self.classifier_ = make_pipeline(StandardScaler(),
                                         LogisticRegression(C=self.C, max_iter=self.max_iter))
        self.classifier_.fit(X, y)

    def _score(self, f):
        return self.classifier_.predict_proba(f)[:, 1]

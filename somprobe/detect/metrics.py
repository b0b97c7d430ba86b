"""Detection metrics and the paired train/test split (pure numpy, no I/O).

Labels are 1 for adversarial and 0 for clean; scores are higher for "more adversarial". The
ROC curve and AUC follow scikit-learn's definitions (``roc_curve`` with every threshold kept,
``roc_auc_score``); they live here so the benchmark has one small, dependency-light place for
them and the tests check them against scikit-learn.
"""
from __future__ import annotations

import numpy as np

from ..errors import DetectError

__all__ = ["roc_curve", "roc_auc", "tpr_at_fpr", "accuracy", "best_threshold", "paired_split",
           "detection_metrics"]


def _check(y, s) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).reshape(-1)
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise DetectError(f"{y.size} labels but {s.size} scores: give one score per input")
    if not np.isin(y, (0, 1)).all():
        raise DetectError("labels must be 0 (clean) or 1 (adversarial)")
    if not np.isfinite(s).all():
        raise DetectError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite; check the "
                          "detector's features")
    return y.astype(np.int64), s


def roc_curve(y, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: false and true positive rates at every distinct score threshold.

    Parameters
    ----------
    y : array of {0, 1} [N]
        1 = adversarial (positive).
    scores : array of float [N]
        Higher = more adversarial.

    Returns
    -------
    fpr, tpr, thresholds : ndarray
        Starting at (0, 0) with threshold ``inf`` (scikit-learn's convention), then one point per
        distinct score in decreasing order (input flagged when ``score >= threshold``).
        Rates are NaN when a class is absent.
    """
    y, s = _check(y, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # last position of each run of equal scores: all tied inputs cross the threshold together
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.array([], dtype=int)
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    p, n = int(y.sum()), int(y.size - y.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0.0, tps / p] if p else np.full(last.size + 1, np.nan)
        fpr = np.r_[0.0, fps / n] if n else np.full(last.size + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_auc(y, scores) -> float:
    """Area under the ROC curve (= P(score_adv > score_clean) + ½ P(tie)); NaN if a class is absent."""
    y, s = _check(y, scores)
    p, n = int(y.sum()), int(y.size - y.sum())
    if p == 0 or n == 0:
        return float("nan")
    # Mann–Whitney U with average ranks for ties: identical to the trapezoidal area of roc_curve.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    ss = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ss)) + 1]
    ends = np.r_[starts[1:], ss.size]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie block
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y == 1].sum() - p * (p + 1) / 2.0
    return float(u / (p * n))


def tpr_at_fpr(y, scores, fpr: float = 0.05) -> float:
    """Highest true positive rate among ROC points whose false positive rate is ``<= fpr``.

    No interpolation between points: the value is reachable by an actual threshold. NaN when a
    class is absent.
    """
    f, t, _ = roc_curve(y, scores)
    if np.isnan(f).any() or np.isnan(t).any():
        return float("nan")
    ok = f <= fpr + 1e-12
    return float(t[ok].max())


def accuracy(y, predicted) -> float:
    """Fraction of inputs whose predicted flag (bool / {0, 1}) equals the label; NaN when empty."""
    y = np.asarray(y).reshape(-1).astype(bool)
    predicted = np.asarray(predicted).reshape(-1).astype(bool)
    if y.shape != predicted.shape:
        raise DetectError(f"{y.size} labels but {predicted.size} predictions")
    return float((y == predicted).mean()) if y.size else float("nan")


def best_threshold(y, scores) -> float:
    """Threshold ``t`` (flag when ``score > t``) with the highest accuracy on ``(y, scores)``.

    Candidates are midpoints between consecutive distinct scores plus one below the minimum and
    one above the maximum; ties in accuracy go to the midpoint of the best run, so the threshold
    sits in the middle of the gap it found.
    """
    y, s = _check(y, scores)
    if s.size == 0:
        raise DetectError("cannot choose a threshold on zero training inputs")
    u = np.unique(s)
    cands = np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2.0, u[-1] + 1.0]
    # flagged when s > c: count correct decisions for every candidate at once via sorted scores
    pos = np.sort(s[y == 1])
    neg = np.sort(s[y == 0])
    tp = pos.size - np.searchsorted(pos, cands, side="right")
    tn = np.searchsorted(neg, cands, side="right")
    acc = tp + tn
    best = np.flatnonzero(acc == acc.max())
    return float(cands[best[best.size // 2]])


def paired_split(n_pairs: int, *, test_size: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split pair indices ``0..n_pairs-1`` into train and test (Harder et al.'s paired split).

    The split is over *pairs*: a clean image and its adversarial copy always land on the same
    side, so a detector never sees the clean twin of a test input while fitting.

    Returns
    -------
    train, test : ndarray of int64
        Sorted pair indices; ``test`` has ``round(test_size * n_pairs)`` entries (at least one
        and leaving at least one for training when ``n_pairs >= 2``).
    """
    if isinstance(n_pairs, bool) or int(n_pairs) != n_pairs or n_pairs < 0:
        raise DetectError(f"n_pairs must be a non-negative integer, got {n_pairs!r}")
    if not 0.0 < float(test_size) < 1.0:
        raise DetectError(f"test_size must lie in (0, 1), got {test_size!r}")
    n_pairs = int(n_pairs)
    n_test = int(round(test_size * n_pairs))
    if n_pairs >= 2:
        n_test = min(max(n_test, 1), n_pairs - 1)
    perm = np.random.default_rng(seed).permutation(n_pairs)
    return np.sort(perm[n_test:]).astype(np.int64), np.sort(perm[:n_test]).astype(np.int64)


def detection_metrics(y, scores, predicted) -> dict:
    """AUC, accuracy and TPR at 5 % FPR of one test set, as a dict of floats (NaN when undefined)."""
    y = np.asarray(y).reshape(-1)
    if y.size == 0:
        return {"auc": float("nan"), "accuracy": float("nan"), "tpr_at_5fpr": float("nan")}
    return {"auc": roc_auc(y, scores), "accuracy": accuracy(y, predicted),
            "tpr_at_5fpr": tpr_at_fpr(y, scores, 0.05)}

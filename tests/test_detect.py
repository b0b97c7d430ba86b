"""Detectors and detection metrics: hand cases, scikit-learn / numpy references, known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from somprobe.detect import (InputMFSDetector, MahalanobisDetector, MaxSoftmaxDetector,
                             class_gaussians, class_references, mahalanobis_distances,
                             magnitude_spectrum, straight_line_loss)
from somprobe.detect import metrics as M
from somprobe.errors import DetectError, NotFittedError


# --------------------------------------------------------------------------- metrics
HAND = [
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]),            # sklearn's docstring example: AUC 0.75
    ([0, 1, 0, 1, 1, 0], [0.5, 0.5, 0.2, 0.9, 0.5, 0.2]),  # ties across classes
    ([1, 1, 0], [3.0, 3.0, 3.0]),                      # all tied: AUC 0.5
    ([0, 1], [1.0, 0.0]),                              # perfectly wrong: AUC 0
]


@pytest.mark.parametrize("y,s", HAND)
def test_roc_and_auc_match_sklearn(y, s):
    assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    fpr, tpr, thr = M.roc_curve(y, s)
    f2, t2, th2 = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr[1:], th2[1:])


def test_auc_hand_value_and_random_cases_match_sklearn():
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 50)
        s = rng.integers(0, 6, 50).astype(float)  # many ties
        assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_tpr_at_fpr_hand_case():
    # scores: negatives 0.1 0.2 ... 2.0 (20), positives 1.05, 1.95, 3, 4
    neg = np.arange(1, 21) / 10
    pos = np.array([1.05, 1.95, 3.0, 4.0])
    y = np.r_[np.zeros(20), np.ones(4)]
    s = np.r_[neg, pos]
    # no false positive: only 3 and 4 flagged (1/2); one (2.0, 5 %): 1.95 joins (3/4); 1.05
    # joins only once 1.1 … 2.0 (10 negatives, 50 %) are flagged too.
    assert M.tpr_at_fpr(y, s, 0.0) == pytest.approx(0.5)
    assert M.tpr_at_fpr(y, s, 0.05) == pytest.approx(0.75)
    assert M.tpr_at_fpr(y, s, 0.49) == pytest.approx(0.75)
    assert M.tpr_at_fpr(y, s, 0.50) == pytest.approx(1.0)
    assert np.isnan(M.tpr_at_fpr([1, 1], [0.2, 0.3]))


def test_best_threshold_separates_a_separable_case():
    y = np.r_[np.zeros(5), np.ones(5)]
    s = np.r_[np.arange(5), np.arange(5) + 10.0]
    t = M.best_threshold(y, s)
    assert 4 < t < 10 and M.accuracy(y, s > t) == 1.0


def test_paired_split_never_separates_a_pair():
    for n in (2, 3, 7, 50, 101):
        for seed in range(5):
            tr, te = M.paired_split(n, seed=seed)
            assert np.intersect1d(tr, te).size == 0
            assert np.array_equal(np.sort(np.r_[tr, te]), np.arange(n))
            assert te.size == min(max(round(0.2 * n), 1), n - 1)
    assert not np.array_equal(M.paired_split(50, seed=0)[1], M.paired_split(50, seed=1)[1])
    with pytest.raises(DetectError):
        M.paired_split(10, test_size=1.5)


def test_metrics_bad_input():
    with pytest.raises(DetectError, match="one score per input"):
        M.roc_auc([0, 1], [0.1])
    with pytest.raises(DetectError, match="NaN"):
        M.roc_auc([0, 1], [0.1, np.nan])
    assert np.isnan(M.roc_auc([1, 1], [0.1, 0.2]))
    assert all(np.isnan(v) for v in M.detection_metrics([], [], []).values())


# --------------------------------------------------------------------------- interface
def test_score_before_fit_is_a_clear_error():
    det = InputMFSDetector()
    x = torch.rand(4, 3, 8, 8)
    for call in (lambda: det.score(x), lambda: det.predict(x), lambda: det.score_features(np.ones((2, 3)))):
        with pytest.raises(NotFittedError, match="not fitted yet: call fit"):
            call()
    with pytest.raises(DetectError, match="cannot recover labels"):
        det.recover_labels(x)


def test_fit_needs_both_kinds_and_matching_widths():
    det = InputMFSDetector()
    with pytest.raises(DetectError, match="needs both kinds"):
        det.fit_features(np.ones((0, 4)), np.ones((3, 4)))
    with pytest.raises(DetectError, match="columns"):
        det.fit_features(np.ones((3, 4)), np.ones((3, 5)))
    det.fit_features(np.random.default_rng(0).normal(size=(6, 4)), np.random.default_rng(1).normal(size=(6, 4)) + 3)
    with pytest.raises(DetectError, match="fitted on 4"):
        det.score_features(np.ones((2, 5)))


# --------------------------------------------------------------------------- InputMFS
def test_magnitude_spectrum_equals_numpy_fft():
    x = np.random.default_rng(0).random((3, 3, 8, 6)).astype(np.float32)
    ref = np.abs(np.fft.fftshift(np.fft.fft2(x.astype(np.float64), axes=(-2, -1)), axes=(-2, -1)))
    np.testing.assert_allclose(magnitude_spectrum(x), ref.reshape(3, -1), rtol=1e-10, atol=1e-10)


def _smooth_images(n, seed, size=16):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(n, 3, size, size).clamp(0, 1).contiguous()


def test_input_mfs_known_answers():
    """High-frequency pattern added → AUC ≈ 1; the same distribution on both sides → AUC ≈ 0.5."""
    size = 16
    r = torch.arange(size)
    checker = ((r[:, None] + r[None, :]) % 2).float() * 2 - 1   # highest spatial frequency
    clean_tr, clean_te = _smooth_images(100, 0), _smooth_images(100, 1)
    adv_tr = (_smooth_images(100, 2) + 0.2 * checker).clamp(0, 1)
    adv_te = (_smooth_images(100, 3) + 0.2 * checker).clamp(0, 1)
    det = InputMFSDetector().fit(clean_tr, adv_tr)
    y = np.r_[np.zeros(100), np.ones(100)]
    s = det.score(torch.cat([clean_te, adv_te]))
    assert M.roc_auc(y, s) > 0.99
    assert M.accuracy(y, det.predict(torch.cat([clean_te, adv_te]))) > 0.95

    same = InputMFSDetector(C=0.01).fit(_smooth_images(200, 10), _smooth_images(200, 11))
    s0 = same.score(torch.cat([_smooth_images(200, 12), _smooth_images(200, 13)]))
    assert abs(M.roc_auc(np.r_[np.zeros(200), np.ones(200)], s0) - 0.5) < 0.1


# --------------------------------------------------------------------------- Mahalanobis
def test_class_gaussians_and_distances_match_brute_force():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(40, 5)) + np.repeat(np.arange(4), 10)[:, None]
    y = np.repeat(np.arange(4), 10)
    classes, means, prec = class_gaussians(f, y, shrinkage="none")
    # brute force: per-class means, pooled covariance of centred features (1/N), inverse
    mu = np.stack([f[y == c].mean(0) for c in range(4)])
    centred = np.concatenate([f[y == c] - mu[c] for c in range(4)])
    cov = centred.T @ centred / len(f)
    np.testing.assert_array_equal(classes, np.arange(4))
    np.testing.assert_allclose(means, mu)
    np.testing.assert_allclose(prec, np.linalg.inv(cov), rtol=1e-8)
    q = rng.normal(size=(7, 5))
    d = mahalanobis_distances(q, means, prec)
    brute = np.array([[(q[i] - mu[c]) @ np.linalg.inv(cov) @ (q[i] - mu[c]) for c in range(4)]
                      for i in range(7)])
    np.testing.assert_allclose(d, brute, rtol=1e-8)
    # Ledoit-Wolf: the precision sklearn's LedoitWolf gives on the centred features
    from sklearn.covariance import LedoitWolf
    _, _, prec_lw = class_gaussians(f, y)
    np.testing.assert_allclose(prec_lw, LedoitWolf(assume_centered=True).fit(centred).get_precision())


class _Linear(torch.nn.Module):
    """A linear classifier on the mean pixel of each channel (known penultimate features)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.as_tensor(w, dtype=torch.float32))

    def features(self, x):
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.features(x) @ self.w.t()


def test_mahalanobis_detector_scores_far_inputs_higher():
    # two classes by which channel is brighter; "adversarial" inputs sit far from both means
    model = _Linear([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    base = torch.rand(60, 3, 4, 4, generator=g) * 0.1
    clean = base.clone()
    clean[:30, 0] += 0.8
    clean[30:, 1] += 0.8
    adv = base.clone()
    adv[:, 2] += 0.9                         # off both class clusters
    adv[:, 0] += 0.45
    det = MahalanobisDetector(model, feature_fn=model.features, device="cpu")
    f_clean, f_adv = det.features(clean), det.features(adv)
    np.testing.assert_array_equal(f_clean[:, 0], np.r_[np.zeros(30), np.ones(30)])  # predictions
    np.testing.assert_allclose(f_clean[:, 1:], clean.mean(dim=(2, 3)).numpy(), rtol=1e-6)
    det.fit_features(f_clean[::2], f_adv[::2])
    s = det.score_features(np.concatenate([f_clean[1::2], f_adv[1::2]]))
    assert M.roc_auc(np.r_[np.zeros(30), np.ones(30)], s) == 1.0
    # score = smallest distance to a class mean, recomputed by hand
    expect = mahalanobis_distances(f_adv[1::2, 1:], det.means_, det.precision_).min(1)
    np.testing.assert_allclose(s[30:], expect)


def test_max_softmax_features_and_floor():
    model = _Linear([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    x = torch.zeros(2, 3, 2, 2)
    x[0, 0] = 1.0                           # logits (4, 0): confident
    x[1, 0] = x[1, 1] = 0.5                 # logits (2, 2): p = 0.5
    det = MaxSoftmaxDetector(model, device="cpu")
    f = det.features(x)
    np.testing.assert_allclose(f[:, 0], [1 / (1 + np.exp(-4.0)), 0.5], rtol=1e-6)
    det.fit_features(f[:1], f[1:])
    assert det.score_features(f)[1] > det.score_features(f)[0]
    assert det.predict_features(f).tolist() == [False, True]


# --------------------------------------------------------------------------- loss curve
def test_straight_line_loss_and_references_match_a_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).eval()
    a, b = torch.rand(5, 3, 4, 4), torch.rand(5, 3, 4, 4)
    t = torch.tensor([0, 1, 2, 0, 1])
    got = straight_line_loss(model, a, b, t, n_points=7)
    for i in range(5):
        for j, al in enumerate(np.linspace(0, 1, 7)):
            x = (1 - al) * a[i:i + 1] + al * b[i:i + 1]
            ref = torch.nn.functional.cross_entropy(model(x), t[i:i + 1]).item()
            assert got[i, j] == pytest.approx(ref, rel=1e-4, abs=1e-5)
    images = torch.rand(12, 3, 4, 4)
    labels = np.array([0, 1, 2] * 4)
    refs, pos = class_references(model, images, labels, device="cpu")
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(images), torch.as_tensor(labels), reduction="none")
    for c in range(3):
        rows = np.flatnonzero(labels == c)
        assert pos[c] == rows[int(loss[rows].argmin())]
        assert torch.equal(refs[c], images[pos[c]])
    with pytest.raises(DetectError, match="classes \\[3\\]"):
        class_references(model, images, labels, num_classes=4, device="cpu")


# --------------------------------------------------------------------------- curvature (Algorithm 2)
class _Ball(torch.nn.Module):
    """Three classes with known boundaries: class 0 inside a ball of radius r around c (logit 0),
    class 1 outside it (logit a·‖x−c‖² − r²), class 2 a plane far away (never predicted)."""

    def __init__(self, c, r=1.0, a=0.5):
        super().__init__()
        self.register_buffer("c", c)
        self.r, self.a = r, a

    def forward(self, x):
        q = self.a * (x - self.c).flatten(1).pow(2).sum(1) - self.r ** 2 * self.a
        lin = x.flatten(1).sum(1) * 0.01 - 10.0
        return torch.stack([torch.zeros_like(q), q, lin], 1)


@pytest.mark.parametrize("method", ["exact", "fd"])
def test_curvature_detector_known_curvatures_threshold_and_labels(method):
    from somprobe.detect.curvature import CurvatureDetector

    g = torch.Generator().manual_seed(0)
    c = torch.full((1, 3, 4, 4), 0.5)
    d = 48
    model = _Ball(c).double()

    def at_radius(n, radius):
        u = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
        u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return c + radius * u

    inside, outside = at_radius(8, 0.5), at_radius(8, 2.0)
    det = CurvatureDetector(model, n_directions=200, method=method, h=1e-3, device="cpu",
                            batch_size=8)
    f_in, f_out = det.features(inside), det.features(outside)
    # inside (k̂ = 0): F_1 = a‖x−c‖² − a r² → vᵀGv = ‖Pv‖² / ‖x−c‖, mean (1 − 1/d)/0.5; F_2 is linear
    assert np.isnan(f_in[:, 0]).all()
    np.testing.assert_allclose(f_in[:, 1], (1 - 1 / d) / 0.5, rtol=0.1)
    np.testing.assert_allclose(f_in[:, 2], 0.0, atol=1e-6)
    # outside (k̂ = 1): F_0 = −F_1 curves the other way: −(1 − 1/d)/2
    assert np.isnan(f_out[:, 1]).all()
    np.testing.assert_allclose(f_out[:, 0], -(1 - 1 / d) / 2.0, rtol=0.1)
    # natural = outside (negative ρ), "adversarial" = inside (positive): perfectly separated
    det.fit_features(f_out[:4], f_in[:4])
    s = det.score_features(np.concatenate([f_out[4:], f_in[4:]]))
    assert M.roc_auc(np.r_[np.zeros(4), np.ones(4)], s) == 1.0
    assert det.predict_features(f_in[4:]).all() and not det.predict_features(f_out[4:]).any()
    # label recovery: the most positively curved boundary of an inside point is class 1's
    assert det.recover_labels(inside[4:]).tolist() == [1] * 4
    np.testing.assert_allclose(det.score_features(f_in), np.nanmean(f_in, axis=1))


def test_mahalanobis_threshold_uses_out_of_fold_clean_scores():
    # 40 clean points in 30 dimensions: in-sample distances are far smaller than fresh ones
    rng = np.random.default_rng(0)
    clean = np.c_[np.zeros(40), rng.normal(size=(40, 30))]
    fresh = np.c_[np.zeros(200), rng.normal(size=(200, 30))]
    adv = np.c_[np.zeros(40), rng.normal(size=(40, 30)) * 1.3]
    det = MahalanobisDetector(None).fit_features(clean, adv)
    in_sample = det._score(clean)
    assert np.median(det._score(fresh)) > np.median(in_sample)
    # a threshold on in-sample scores would flag most fresh clean inputs; the out-of-fold one not
    t_in = M.best_threshold(np.r_[np.zeros(40), np.ones(40)], np.r_[in_sample, det._score(adv)])
    assert (det._score(fresh) > t_in).mean() > 0.3
    assert det.predict_features(fresh).mean() < 0.2
    assert det.predict_features(adv).mean() > 0.8

"""Math tests of the evaluation metrics against closed forms and independent computations."""
import warnings

import numpy as np
import pytest

from eval.frechet import RankDeficientWarning, scipy_sqrtm, feature_stats, frechet_distance
from eval.metrics import (classifier_accuracy, inception_score, inception_score_from_probs, kernel_inception_distance,
                          polynomial_mmd2_unbiased, precision_recall)


# ---- Fréchet distance --------------------------------------------------------------------------------------
def test_fd_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(closed, rel=1e-10)


def test_fd_of_full_covariances_matches_eigen_formula():
    # independent truth: tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), computed with symmetric eigh only
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    w, v = np.linalg.eigh(s1)
    s1_half = v @ np.diag(np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(s1_half @ s2 @ s1_half)).sum()
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fd_of_identical_sets_is_zero_and_of_shifted_set_is_shift_squared():
    feats = np.random.default_rng(2).normal(size=(500, 16)).astype(np.float32)
    s = feature_stats(feats)
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-6
    shifted = feature_stats(feats + 0.5)  # same covariance, mean moved by 0.5 in every dimension
    assert frechet_distance(s.mu, s.sigma, shifted.mu, shifted.sigma) == pytest.approx(16 * 0.25, abs=1e-6)


def test_stats_are_float64_unbiased_covariance():
    feats = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
    s = feature_stats(feats)
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
    np.testing.assert_allclose(s.sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)


def _fails_first_call():
    """A sqrtm that returns NaN for the raw product (what some BLAS builds give for a singular one) and
    scipy's root afterwards: the eps*I path then runs on every machine."""
    calls = []

    def sqrtm(mat):
        calls.append(mat.copy())
        if len(calls) == 1:
            return np.full_like(mat, np.nan), True
        return scipy_sqrtm(mat)
    return sqrtm, calls


def test_sqrtm_stabilisation_matches_closed_form_on_singular_diagonal_covariances():
    # diagonal (commuting) covariances with zero variances: ((S1 + eps I)(S2 + eps I))^1/2 is exactly
    # diag(sqrt((a + eps)(b + eps))), and FD keeps the unshifted traces
    a = np.array([0.0, 2.0, 0.0, 1.5, 3.0])
    b = np.array([1.0, 0.0, 0.0, 0.5, 3.0])
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1].copy()
    eps = 1e-3
    sqrtm, calls = _fails_first_call()
    with pytest.warns(RankDeficientWarning, match="not finite"):
        fd = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), eps=eps, sqrtm=sqrtm)
    expected = np.sum((mu1 - mu2) ** 2) + a.sum() + b.sum() - 2 * np.sqrt((a + eps) * (b + eps)).sum()
    assert fd == pytest.approx(expected, rel=1e-12)
    assert len(calls) == 2
    np.testing.assert_array_equal(calls[1], np.diag((a + eps) * (b + eps)))


def test_sqrtm_stabilisation_on_rank_one_covariances_is_within_offset_bias():
    # S1 = x x^T has rank 1, so (S1 S2)^1/2 has the single non-zero eigenvalue sqrt(x^T S2 x)
    x = np.array([[0.0, 1.0, -1.0, 1.0, 1.0]])
    y = np.array([[1.0, -1.0, -1.0, 0.0, -1.0], [-1.0, -1.0, -1.0, 1.0, 1.0]])
    s1, s2 = x.T @ x, y.T @ y
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt((x @ s2 @ x.T).item())
    mu = np.zeros(5)
    sqrtm, _ = _fails_first_call()
    with pytest.warns(RankDeficientWarning, match="not finite"):
        fd = frechet_distance(mu, s1, mu, s2, eps=1e-6, sqrtm=sqrtm)
    assert fd == pytest.approx(expected, abs=0.02)  # the eps*I offset moves it by O(sqrt(eps) * dim)
    with warnings.catch_warnings():  # scipy's own root: finite or not depending on the BLAS, close either way
        warnings.simplefilter("ignore")
        assert frechet_distance(mu, s1, mu, s2, eps=1e-6) == pytest.approx(expected, abs=0.02)


def test_sqrtm_still_not_finite_after_offset_is_an_error():
    with pytest.warns(RankDeficientWarning), pytest.raises(ValueError, match="even after the eps"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3),
                         sqrtm=lambda mat: (np.full_like(mat, np.nan), True))


def test_rank_deficient_warning_when_too_few_samples():
    with pytest.warns(RankDeficientWarning, match="rank-deficient"):
        feature_stats(np.random.default_rng(4).normal(size=(8, 16)))


def test_fd_rejects_statistics_of_different_dimension():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(5), np.eye(5))


def test_fd_rejects_non_psd_covariance_with_imaginary_root():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


# ---- Inception Score ---------------------------------------------------------------------------------------
def test_is_of_one_hot_predictions_equals_num_classes_and_uniform_equals_one():
    k, n = 10, 1000
    one_hot = np.eye(k)[np.arange(n) % k]
    assert inception_score_from_probs(one_hot, splits=10)[0] == pytest.approx(k, rel=1e-12)
    assert inception_score_from_probs(np.full((n, k), 1 / k), splits=10)[0] == pytest.approx(1.0, rel=1e-12)


def test_is_matches_direct_kl_computation():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(200, 7)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = [np.exp(np.mean([np.sum(q * np.log(q / part.mean(0))) for q in part])) for part in np.split(p, 4)]
    mean, std = inception_score(logits, splits=4)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10) and std == pytest.approx(np.std(scores), rel=1e-8)


# ---- precision / recall ------------------------------------------------------------------------------------
def test_precision_recall_known_overlap():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(400, 8))
    far = rng.normal(size=(400, 8)) + 100.0  # a mode the real data never visits
    fake = np.concatenate([real, far])  # every real point is reproduced exactly, plus as many junk points
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == pytest.approx(0.5) and recall == pytest.approx(1.0)
    precision, recall = precision_recall(fake, real, k=3)  # roles swapped: mode dropping
    assert precision == pytest.approx(1.0) and recall == pytest.approx(0.5)


def test_precision_recall_matches_brute_force_with_small_blocks():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(60, 3)), rng.normal(size=(50, 3)) * 0.7 + 0.8

    def brute(a, b, k=3):  # share of b inside manifold(a)
        d_aa = ((a[:, None] - a[None]) ** 2).sum(-1)
        radii = np.sort(d_aa, axis=1)[:, k]
        d_ba = ((b[:, None] - a[None]) ** 2).sum(-1)
        return (d_ba <= radii[None]).any(1).mean()

    p, r = precision_recall(real, fake, k=3, block=7)
    assert p == pytest.approx(brute(real, fake), abs=1e-12) and r == pytest.approx(brute(fake, real), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1


# ---- KID -----------------------------------------------------------------------------------------------------
def test_mmd_unbiased_matches_double_loop():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 4)) + 0.3
    k = lambda a, b: (a @ b / 4 + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_unbiased_on_equal_distributions():
    rng = np.random.default_rng(9)
    real, fake = rng.normal(size=(3000, 16)), rng.normal(size=(3000, 16))
    mean, std = kernel_inception_distance(real, fake, num_subsets=50, subset_size=200)
    assert abs(mean) < 3 * std / np.sqrt(50) + 1e-4  # zero within the standard error
    # the biased estimator (diagonal kept) is clearly positive on the same data: the test can tell them apart
    x, y = real[:200], fake[:200]
    biased = ((x @ x.T / 16 + 1) ** 3).mean() + ((y @ y.T / 16 + 1) ** 3).mean() - 2 * ((x @ y.T / 16 + 1) ** 3).mean()
    assert biased > 10 * std / np.sqrt(50)
    shifted, _ = kernel_inception_distance(real, fake + 0.5, num_subsets=10, subset_size=200)
    assert shifted > 10 * abs(mean)


def test_classifier_accuracy_and_label_range_check():
    logits = np.eye(4)[[0, 1, 2, 3, 0]]
    assert classifier_accuracy(logits, np.array([0, 1, 2, 0, 0])) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="do not fit"):
        classifier_accuracy(logits, np.array([0, 1, 2, 3, 9]))

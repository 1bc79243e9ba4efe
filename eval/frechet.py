"""Gaussian statistics of feature sets and the Fréchet distance between them (FID, sFID, proxy FD).

FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

Numerics follow the reference implementations (pytorch-fid, ADM's evaluator) so values agree with them:
float64 statistics, `scipy.linalg.sqrtm` of the product, an eps*I offset on both covariances when the
square root comes back non-finite, and a hard error when the result has a non-negligible imaginary part.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import linalg


class RankDeficientWarning(UserWarning):
    """Fewer samples than feature dimensions: the covariance is singular and FD is biased / unstable."""


@dataclass
class GaussianStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    num_samples: int

    @property
    def dim(self) -> int:
        return self.mu.shape[0]


def feature_stats(feats_ND: np.ndarray, name: str = "features") -> GaussianStats:
    """Mean and (unbiased, ddof=1) covariance in float64, as np.cov does in pytorch-fid and ADM."""
    feats_ND = np.asarray(feats_ND)
    if feats_ND.ndim != 2:
        raise ValueError(f"{name}: expected a (num_samples, dim) array, got shape {feats_ND.shape}")
    n, d = feats_ND.shape
    if n < 2:
        raise ValueError(f"{name}: need at least 2 samples for a covariance, got {n}")
    if not np.isfinite(feats_ND).all():
        raise ValueError(f"{name}: features contain NaN/Inf; check the images and the feature network weights")
    if n <= d:
        warnings.warn(f"{name}: {n} samples for {d} feature dimensions: the covariance has rank <= {n - 1} < {d} "
                      f"(rank-deficient), so the Fréchet distance is strongly biased and not comparable with "
                      f"published values; use more samples than dimensions (50k is the FID standard)",
                      RankDeficientWarning, stacklevel=2)
    feats = feats_ND.astype(np.float64)
    return GaussianStats(feats.mean(axis=0), np.cov(feats, rowvar=False), n)


def check_compatible(a: GaussianStats, b: GaussianStats, what: str = "statistics") -> None:
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"{what} have different dimensions: mu {a.mu.shape} / sigma {a.sigma.shape} vs "
                         f"mu {b.mu.shape} / sigma {b.sigma.shape}; they were computed with different feature "
                         f"networks or layers (e.g. Inception pool 2048 vs spatial 2023 vs a proxy classifier); "
                         f"recompute the reference statistics with the same network")
    for s in (a, b):
        if s.sigma.shape != (s.dim, s.dim):
            raise ValueError(f"{what}: sigma must be ({s.dim}, {s.dim}) for a mean of length {s.dim}, got {s.sigma.shape}")


def scipy_sqrtm(mat: np.ndarray) -> tuple[np.ndarray, bool]:
    """scipy's sqrtm, also reporting whether scipy flagged the matrix as singular / ill-conditioned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = linalg.sqrtm(mat)
    flagged = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    return np.asarray(root), flagged


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6,
                     sqrtm: Callable[[np.ndarray], tuple[np.ndarray, bool]] = scipy_sqrtm) -> float:
    """`sqrtm(mat) -> (root, flagged)` is scipy's by default; tests inject one that fails so the eps*I
    stabilisation runs whatever the BLAS (whether scipy's root of a singular product is finite depends on it)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    check_compatible(GaussianStats(mu1, sigma1, 0), GaussianStats(mu2, sigma2, 0), "the two statistics")
    diff = mu1 - mu2
    covmean, flagged = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product can have no square root in floating point (Schur recurrence divides 0 by 0);
        # the standard fix shifts both covariances by eps*I, which changes FD by O(sqrt(eps) * dim).
        warnings.warn(f"sqrtm(sigma1 @ sigma2) is not finite (singular product, typical with too few samples); "
                      f"adding {eps:g} * I to both covariances", RankDeficientWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean, flagged = sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("sqrtm of the covariance product is not finite even after the eps*I offset; "
                             "the statistics are degenerate (constant features? NaN?)")
    elif flagged:
        warnings.warn("sigma1 @ sigma2 is singular or ill-conditioned; the Fréchet distance may be inaccurate "
                      "(more samples than feature dimensions fix this)", RankDeficientWarning, stacklevel=2)
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > 1e-3:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component {max_imag:.3g} on its diagonal; "
                             f"the covariances are not valid (not PSD) or far too few samples were used")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_stats(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    check_compatible(a, b)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, eps)


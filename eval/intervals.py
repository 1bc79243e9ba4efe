"""95 % confidence intervals for the evaluation metrics: seeded vectorised bootstrap and analytic forms.

  * bootstrap_ci: percentile or BCa interval of any statistic vectorised over a leading resample axis;
  * fd_bootstrap_ci: Fréchet distance, resampling the sample features (and the reference features when
    they are known), with tr((S1 S2)^1/2) from batched symmetric eigenvalues (exact for PSD covariances).
    It is a *basic* (reverse-percentile) interval: the FD estimate is biased upwards by O(dim^2 / N) and
    a bootstrap replicate adds that bias once more, so percentile intervals sit too high (65 % coverage
    at dim 8, N 500); reflecting the quantiles around the estimate removes the bias to first order
    (94-97 % measured), clipped to FD >= 0;
  * kid_bootstrap_ci: the unbiased polynomial-kernel MMD^2 under multinomial resampling weights, pairs of
    the same original point excluded (so a bootstrap replicate is a U-statistic too, not a biased V-one);
  * wilson_ci: a proportion (classifier accuracy; precision/recall conditional on the k-NN manifolds);
  * mean_ci: a mean from the t distribution (PSNR).
An interval is {"low", "high", "level", "method"}; significantly_different() compares two of them and
paired_difference_ci() bootstraps the difference of two metrics measured on the same items.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats as sps

DEFAULT_LEVEL = 0.95
DEFAULT_BOOT = 200


def interval(low: float, high: float, level: float, method: str, **extra) -> dict:
    return {"low": float(low), "high": float(high), "level": level, "method": method, **extra}


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return (1 - level) / 2


def _percentile(boot_B: np.ndarray, level: float) -> tuple[float, float]:
    alpha = _check_level(level)
    lo, hi = np.quantile(boot_B[np.isfinite(boot_B)], [alpha, 1 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(data_N: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], *, n_boot: int = DEFAULT_BOOT,
                 level: float = DEFAULT_LEVEL, method: str = "percentile", seed: int = 0) -> dict:
    """`statistic(x_BN...)` maps a stack of B resamples (B, N, ...) to (B,) values; it is called once with
    all bootstrap resamples (and, for BCa, once with the N leave-one-out sets)."""
    data_N = np.asarray(data_N)
    n = len(data_N)
    if n < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 observations, got {n}")
    idx_BN = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot_B = np.asarray(statistic(data_N[idx_BN]), np.float64)
    if method == "percentile":
        lo, hi = _percentile(boot_B, level)
        return interval(lo, hi, level, f"bootstrap percentile, {n_boot} resamples, seed {seed}")
    if method != "bca":
        raise ValueError(f"unknown bootstrap method {method!r}; use 'percentile' or 'bca'")
    alpha = _check_level(level)
    theta = float(np.asarray(statistic(data_N[None]), np.float64)[0])
    # BCa (Efron 1987): z0 corrects the median bias, the jackknife skewness gives the acceleration
    frac_below = (np.sum(boot_B < theta) + 0.5 * np.sum(boot_B == theta)) / n_boot
    z0 = sps.norm.ppf(np.clip(frac_below, 1 / (2 * n_boot), 1 - 1 / (2 * n_boot)))
    loo_NN = np.arange(n)[None].repeat(n, 0)
    loo_idx = loo_NN[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    jack = np.asarray(statistic(data_N[loo_idx]), np.float64)
    d = jack.mean() - jack
    denom = 6 * np.sum(d**2) ** 1.5
    accel = float(np.sum(d**3) / denom) if denom > 0 else 0.0
    z = sps.norm.ppf([alpha, 1 - alpha])
    adj = sps.norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))
    lo, hi = np.quantile(boot_B, adj)
    return interval(lo, hi, level, f"bootstrap BCa, {n_boot} resamples, seed {seed}")


def mean_ci(values_N: np.ndarray, level: float = DEFAULT_LEVEL) -> dict:
    """Student-t interval of a mean (non-finite values, e.g. PSNR of exact reconstructions, are left out)."""
    v = np.asarray(values_N, np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        raise ValueError(f"a mean interval needs at least 2 finite values, got {len(v)}")
    half = sps.t.ppf(1 - _check_level(level), len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return interval(v.mean() - half, v.mean() + half, level, "t interval of the mean", n=len(v))


def wilson_ci(successes: int, n: int, level: float = DEFAULT_LEVEL) -> dict:
    """Wilson score interval of a binomial proportion (well-behaved near 0 and 1, unlike p +- z se)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"Wilson interval needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = sps.norm.ppf(1 - _check_level(level))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return interval(max(0.0, centre - half), min(1.0, centre + half), level, "Wilson score", n=n)


# ---- Fréchet distance ------------------------------------------------------------------------------------
def _weighted_stats(x_ND: np.ndarray, w_BN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ddof=1 covariance of every resample given by multinomial counts w (each row sums to N)."""
    n = len(x_ND)
    mu_BD = w_BN @ x_ND / n
    sigma = np.empty((len(w_BN), x_ND.shape[1], x_ND.shape[1]))
    for b, w in enumerate(w_BN):  # one BLAS product per resample: far faster than a batched einsum
        sigma[b] = ((x_ND * w[:, None]).T @ x_ND - n * np.outer(mu_BD[b], mu_BD[b])) / (n - 1)
    return mu_BD, sigma


def _sym_sqrt(s_BDD: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s_BDD)
    return (v * np.sqrt(np.clip(w, 0, None))[..., None, :]) @ np.swapaxes(v, -1, -2)


def fd_batched(mu1_BD, sigma1_BDD, mu2_BD, sigma2_BDD) -> np.ndarray:
    """FD of stacks of Gaussians: tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) for PSD S1, S2."""
    root1 = _sym_sqrt(sigma1_BDD)
    eig = np.linalg.eigvalsh(root1 @ sigma2_BDD @ root1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum(-1)
    diff = mu1_BD - mu2_BD
    return (diff * diff).sum(-1) + np.trace(sigma1_BDD, axis1=-2, axis2=-1) + \
        np.trace(sigma2_BDD, axis1=-2, axis2=-1) - 2 * tr_covmean


def _bootstrap_weights(n: int, n_boot: int, rng) -> np.ndarray:
    """(n_boot + 1, n) multiplicities of the rows in each resample; row 0 (all ones): the data itself."""
    return np.concatenate([np.ones((1, n)), rng.multinomial(n, np.full(n, 1 / n), size=n_boot)]).astype(np.float64)


def _resampled_stats(feats_ND: np.ndarray, n_boot: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance stacks of n_boot + 1 resamples of the rows; row 0: the data itself."""
    return _weighted_stats(feats_ND, _bootstrap_weights(len(feats_ND), n_boot, rng))


def _reference_stats(ref_feats_MD, ref_mu, ref_sigma, n_boot: int, rng,
                     caller: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The reference side of an FD bootstrap as n_boot + 1 stacked statistics: resampled from its features, or
    its stored mu/sigma held fixed (e.g. ADM's); with the words naming what varies."""
    if ref_feats_MD is not None:
        mu, sigma = _resampled_stats(np.asarray(ref_feats_MD, np.float64), n_boot, rng)
        return mu, sigma, "and reference"
    if ref_mu is None or ref_sigma is None:
        raise ValueError(f"{caller} needs reference features or reference mu/sigma")
    mu, sigma = np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
    stack = (n_boot + 1,)
    return np.broadcast_to(mu, stack + mu.shape), np.broadcast_to(sigma, stack + sigma.shape), \
        "(reference statistics fixed)"


def fd_bootstrap_ci(fake_ND: np.ndarray, ref_feats_MD: np.ndarray | None = None, ref_mu=None, ref_sigma=None, *,
                    n_boot: int = DEFAULT_BOOT, level: float = DEFAULT_LEVEL, seed: int = 0) -> dict:
    """Basic bootstrap interval of the Fréchet distance. Without reference features the reference
    statistics are held fixed (only the sample side varies, e.g. ADM's stored mu/sigma)."""
    rng = np.random.default_rng(seed)
    mu1, s1 = _resampled_stats(np.asarray(fake_ND, np.float64), n_boot, rng)
    mu2, s2, ref_side = _reference_stats(ref_feats_MD, ref_mu, ref_sigma, n_boot, rng, "fd_bootstrap_ci")
    fd = fd_batched(mu2, s2, mu1, s1)
    estimate = float(fd[0])
    q_lo, q_hi = _percentile(fd[1:], level)
    # FD >= 0, and its plug-in estimate is biased upwards (the squared Bures-Wasserstein distance is jointly
    # convex): where the bias dominates (true FD ~ 0) the reflected interval would fall below the estimate,
    # even below 0, so the low end is clipped at 0 and the high end kept at or above the estimate
    low, high = max(0.0, 2 * estimate - q_hi), max(estimate, 2 * estimate - q_lo)
    return interval(low, high, level, f"basic bootstrap over samples {ref_side}, {n_boot} resamples, seed {seed}")


def fd_paired_difference_ci(fake_a_ND: np.ndarray, fake_b_ND: np.ndarray, ref_feats_MD: np.ndarray | None = None,
                            ref_mu=None, ref_sigma=None, *, n_boot: int = DEFAULT_BOOT, level: float = DEFAULT_LEVEL,
                            seed: int = 0) -> dict:
    """Basic bootstrap interval of FD(a) - FD(b) for two sample sets made on the same items (row i of a and of b:
    the same label and seed, two samplers). Each resample draws the same rows from both sets (and one resample of
    the reference, shared), so what the two sets share cancels: a much tighter interval than comparing two
    separate FD intervals. `significant` when it excludes 0."""
    a, b = np.asarray(fake_a_ND, np.float64), np.asarray(fake_b_ND, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired FD needs sample sets of equal shape (the same items), got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    w = _bootstrap_weights(len(a), n_boot, rng)
    mu_a, s_a = _weighted_stats(a, w)  # the same resampled rows for both sets
    mu_b, s_b = _weighted_stats(b, w)
    mu_r, s_r, ref_side = _reference_stats(ref_feats_MD, ref_mu, ref_sigma, n_boot, rng, "fd_paired_difference_ci")
    diff = fd_batched(mu_r, s_r, mu_a, s_a) - fd_batched(mu_r, s_r, mu_b, s_b)
    estimate = float(diff[0])
    q_lo, q_hi = _percentile(diff[1:], level)
    out = interval(2 * estimate - q_hi, 2 * estimate - q_lo, level,
                   f"basic bootstrap of FD(a) - FD(b) over paired samples {ref_side}, {n_boot} resamples, seed {seed}")
    out["estimate"] = estimate
    out["significant"] = not out["low"] <= 0 <= out["high"]
    return out


# ---- KID ---------------------------------------------------------------------------------------------------
def _within(k_NN: np.ndarray, w_BN: np.ndarray) -> np.ndarray:
    """Mean kernel over pairs of *different* original points of each weighted resample."""
    total = np.einsum("bi,ij,bj->b", w_BN, k_NN, w_BN, optimize=True) - (w_BN**2) @ np.diag(k_NN)
    return total / (w_BN.sum(1) ** 2 - (w_BN**2).sum(1))


def kid_bootstrap_ci(real_ND: np.ndarray, fake_MD: np.ndarray, *, n_boot: int = DEFAULT_BOOT,
                     level: float = DEFAULT_LEVEL, seed: int = 0, max_points: int = 2000,
                     centre: float | None = None) -> dict:
    """Percentile interval of the unbiased cubic-kernel MMD^2. Sets larger than `max_points` are subsampled
    and the interval's offsets from the subsample estimate are shrunk by sqrt(max_points / N) around
    `centre` (the reported KID): exact for the 1/N variance of distinct distributions, conservative when
    they are equal (variance 1/N^2)."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(real_ND, np.float64), np.asarray(fake_MD, np.float64)
    n_full = min(len(x), len(y))
    if len(x) > max_points:
        x = x[rng.choice(len(x), max_points, replace=False)]
    if len(y) > max_points:
        y = y[rng.choice(len(y), max_points, replace=False)]
    d = x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    ones = lambda n: np.ones((1, n))  # noqa: E731
    estimate = float(_within(k_xx, ones(len(x)))[0] + _within(k_yy, ones(len(y)))[0] - 2 * k_xy.mean())
    w = rng.multinomial(len(x), np.full(len(x), 1 / len(x)), size=n_boot).astype(np.float64)
    v = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=n_boot).astype(np.float64)
    cross = np.einsum("bi,ij,bj->b", w, k_xy, v, optimize=True) / (len(x) * len(y))
    lo, hi = _percentile(_within(k_xx, w) + _within(k_yy, v) - 2 * cross, level)
    shrink = np.sqrt(min(len(x), len(y)) / n_full)
    centre = estimate if centre is None else centre
    method = f"bootstrap percentile, {n_boot} resamples, seed {seed}"
    if shrink < 1:
        method += f", on {min(len(x), len(y))}-point subsamples rescaled by sqrt(n_sub/N)"
    return interval(centre + (lo - estimate) * shrink, centre + (hi - estimate) * shrink, level, method)


# ---- comparisons -------------------------------------------------------------------------------------------
def significantly_different(ci_a: dict, ci_b: dict) -> bool:
    """Conservative: True when the two intervals do not overlap (non-overlap of 95 % intervals implies a
    difference at well below the 5 % level; overlap does not prove equality, use paired_difference_ci)."""
    return ci_a["high"] < ci_b["low"] or ci_b["high"] < ci_a["low"]


def paired_difference_ci(values_a_N: np.ndarray, values_b_N: np.ndarray, *, n_boot: int = 1000,
                         level: float = DEFAULT_LEVEL, seed: int = 0) -> dict:
    """Bootstrap interval of mean(a) - mean(b) for per-item values measured on the same items (e.g. PSNR
    or correctness of two samplers on the same seeds and labels); significant when it excludes 0."""
    a, b = np.asarray(values_a_N, np.float64), np.asarray(values_b_N, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal shapes, got {a.shape} and {b.shape}")
    ci = bootstrap_ci(a - b, lambda d: d.mean(axis=1), n_boot=n_boot, level=level, seed=seed)
    ci["significant"] = not ci["low"] <= 0 <= ci["high"]
    return ci


# ---- all intervals of one evaluation -----------------------------------------------------------------------
FD_BOOTSTRAP_MAX_DIM = 512  # above this (Inception's 2048) 200 eigendecompositions cost minutes on a CPU


def metric_intervals(fake: dict[str, np.ndarray], ref_stats: dict[str, np.ndarray], ref_feats: dict | None,
                     metrics: dict, *, prefix: str = "", n_boot: int = DEFAULT_BOOT, seed: int = 0,
                     level: float = DEFAULT_LEVEL, fd_max_dim: int = FD_BOOTSTRAP_MAX_DIM) -> dict[str, dict]:
    """Intervals for the Fréchet distance (bootstrap, feature dimension <= fd_max_dim), accuracy (Wilson),
    precision/recall (Wilson, conditional on the k-NN manifolds) and KID (bootstrap) of compute_metrics."""
    out: dict[str, dict] = {}
    pool = np.asarray(fake["pool"])
    ref_pool = None if ref_feats is None else ref_feats.get("pool")
    fd_key = f"{prefix}fd" if prefix else "fid"
    if fd_key in metrics and pool.shape[1] <= fd_max_dim:
        # resample the reference only when its features are the ones its statistics were made from
        same = ref_pool is not None and np.allclose(np.asarray(ref_pool, np.float64).mean(0), ref_stats["mu"])
        out[fd_key] = fd_bootstrap_ci(pool, ref_pool if same else None, ref_stats["mu"], ref_stats["sigma"],
                                      n_boot=n_boot, level=level, seed=seed)
    if f"{prefix}accuracy" in metrics:
        acc = metrics[f"{prefix}accuracy"]
        out[f"{prefix}accuracy"] = wilson_ci(int(round(acc * len(pool))), len(pool), level)
    if ref_pool is not None:
        for key, n in ((f"{prefix}precision", len(pool)), (f"{prefix}recall", len(ref_pool))):
            if key in metrics:
                ci = wilson_ci(int(round(metrics[key] * n)), n, level)
                out[key] = {**ci, "method": ci["method"] + ", conditional on the k-NN manifolds"}
        if f"{prefix}kid" in metrics:
            out[f"{prefix}kid"] = kid_bootstrap_ci(ref_pool, pool, n_boot=n_boot, level=level, seed=seed,
                                                   centre=metrics[f"{prefix}kid"])
    return out

"""Inception Score, precision/recall (k-NN manifolds), KID, and the combination of all metrics.

Conventions follow the reference evaluators so that numbers are comparable:
  * IS: softmax of the logits, KL(p(y|x) || p(y)) averaged per split, exp, mean/std over splits
    (ADM splits into chunks of 5000; torch-fidelity into 10 equal splits; `splits` picks the count).
  * Precision/recall: Kynkäänniemi et al. 2019 as in ADM's evaluator: a point lies in a set's manifold
    if it is within the k-th nearest-neighbour radius (k=3, self excluded) of some point of that set;
    precision = share of samples inside the reference manifold, recall = share of references inside the
    sample manifold. Squared Euclidean distances in float32, computed block-wise.
  * KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (Bińkowski et al. 2018),
    averaged over random subsets (torch-fidelity defaults: 100 subsets of 1000).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import log_softmax

from eval.frechet import GaussianStats, feature_stats, frechet_distance


def inception_score(logits_NK: np.ndarray, splits: int = 10) -> tuple[float, float]:
    logits_NK = np.asarray(logits_NK, np.float64)
    if logits_NK.ndim != 2 or len(logits_NK) < splits:
        raise ValueError(f"IS needs (N, num_classes) logits with N >= splits={splits}, got {logits_NK.shape}")
    return _inception_score_log_probs(log_softmax(logits_NK, axis=1), splits)


def inception_score_from_probs(probs_NK: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS from probabilities (exact zeros allowed: 0 log 0 = 0)."""
    with np.errstate(divide="ignore"):
        return _inception_score_log_probs(np.log(np.asarray(probs_NK, np.float64)), splits)


def _inception_score_log_probs(log_p_NK: np.ndarray, splits: int) -> tuple[float, float]:
    scores = []
    for part in np.array_split(log_p_NK, splits):
        p = np.exp(part)
        log_py = np.log(np.maximum(p.mean(axis=0), np.finfo(np.float64).tiny))
        kl_terms = p * (np.where(p > 0, part, 0.0) - log_py)  # 0 log 0 = 0 (a class with p(y) = 0 has p = 0)
        scores.append(np.exp(kl_terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a_MD: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    d = a_MD.square().sum(1, keepdim=True) - 2 * a_MD @ b_ND.T + b_ND.square().sum(1)
    return d.clamp_min_(0)


def knn_radii(feats_ND: torch.Tensor, k: int = 3, block: int = 10000) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest other point."""
    if len(feats_ND) <= k:
        raise ValueError(f"k-NN manifold with k={k} needs more than {k} points, got {len(feats_ND)}")
    radii = []
    for i in range(0, len(feats_ND), block):
        d = _sq_dists(feats_ND[i:i + block], feats_ND)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the smallest is the point itself (distance 0)
    return torch.cat(radii)


def _inside_fraction(points_MD: torch.Tensor, manifold_ND: torch.Tensor, radii_N: torch.Tensor, block: int) -> float:
    inside = []
    for i in range(0, len(points_MD), block):
        d = _sq_dists(points_MD[i:i + block], manifold_ND)
        inside.append((d <= radii_N).any(dim=1))
    return torch.cat(inside).double().mean().item()


@torch.inference_mode()
def precision_recall(real_ND: np.ndarray, fake_MD: np.ndarray, k: int = 3, block: int = 10000,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    real = torch.as_tensor(np.asarray(real_ND), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_MD), dtype=torch.float32, device=device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall: feature dimensions differ ({real.shape[1]} vs {fake.shape[1]})")
    precision = _inside_fraction(fake, real, knn_radii(real, k, block), block)
    recall = _inside_fraction(real, fake, knn_radii(fake, k, block), block)
    return precision, recall


def polynomial_mmd2_unbiased(x_MD: np.ndarray, y_MD: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    x, y = np.asarray(x_MD, np.float64), np.asarray(y_MD, np.float64)
    m, d = x.shape
    if y.shape != (m, d) or m < 2:
        raise ValueError(f"MMD needs two subsets of equal shape (m >= 2), got {x.shape} and {y.shape}")
    k_xx = (x @ x.T / d + coef0) ** degree
    k_yy = (y @ y.T / d + coef0) ** degree
    k_xy = (x @ y.T / d + coef0) ** degree
    # the diagonal (a point with itself) is dropped from the within-set terms: that is what makes it unbiased
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kernel_inception_distance(real_ND: np.ndarray, fake_MD: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Mean and std of the unbiased MMD^2 over random subsets (without replacement within a subset)."""
    if real_ND.shape[1] != fake_MD.shape[1]:
        raise ValueError(f"KID: feature dimensions differ ({real_ND.shape[1]} vs {fake_MD.shape[1]})")
    m = min(subset_size, len(real_ND), len(fake_MD))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    mmds = [polynomial_mmd2_unbiased(real_ND[rng.choice(len(real_ND), m, replace=False)],
                                     fake_MD[rng.choice(len(fake_MD), m, replace=False)])
            for _ in range(num_subsets)]
    return float(np.mean(mmds)), float(np.std(mmds))


def classifier_accuracy(logits_NK: np.ndarray, labels_N: np.ndarray) -> float:
    labels_N = np.asarray(labels_N)
    if len(labels_N) != len(logits_NK):
        raise ValueError(f"{len(labels_N)} labels for {len(logits_NK)} samples")
    if labels_N.min() < 0 or labels_N.max() >= logits_NK.shape[1]:
        raise ValueError(f"labels in [{labels_N.min()}, {labels_N.max()}] do not fit a {logits_NK.shape[1]}-class "
                         f"classifier; were the samples generated for another dataset?")
    return float((np.asarray(logits_NK).argmax(1) == labels_N).mean())


def compute_metrics(fake: dict[str, np.ndarray], ref_stats: dict[str, np.ndarray], ref_feats: dict[str, np.ndarray] | None,
                    *, labels: np.ndarray | None = None, prefix: str = "", is_splits: int = 10, pr_k: int = 3,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, compute_is: bool = True,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """All metrics the available features allow. `ref_stats` holds mu/sigma (and mu_s/sigma_s);
    `ref_feats` holds raw reference features ("pool") for KID and precision/recall when known."""
    out: dict[str, float] = {"num_samples": len(fake["pool"])}
    stats = feature_stats(fake["pool"], f"{prefix or ''}sample pool features")
    ref = GaussianStats(ref_stats["mu"], ref_stats["sigma"], 0)
    out[f"{prefix}fd" if prefix else "fid"] = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    if "spatial" in fake and "mu_s" in ref_stats:
        s = feature_stats(fake["spatial"], "sample spatial features")
        out[f"{prefix}sfd" if prefix else "sfid"] = frechet_distance(s.mu, s.sigma, ref_stats["mu_s"], ref_stats["sigma_s"])
    if "logits" in fake and compute_is and len(fake["logits"]) >= is_splits:
        out[f"{prefix}is"], out[f"{prefix}is_std"] = inception_score(fake["logits"], is_splits)
    if "logits" in fake and labels is not None:
        out[f"{prefix}accuracy"] = classifier_accuracy(fake["logits"], labels)
    if ref_feats is not None and "pool" in ref_feats:
        out[f"{prefix}kid"], out[f"{prefix}kid_std"] = kernel_inception_distance(
            ref_feats["pool"], fake["pool"], kid_subsets, kid_subset_size)
        out[f"{prefix}precision"], out[f"{prefix}recall"] = precision_recall(ref_feats["pool"], fake["pool"], pr_k,
                                                                             device=device)
    return out

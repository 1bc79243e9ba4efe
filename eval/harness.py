"""Glue between images, a feature network and a reference: the evaluation used by every CLI here.

The same code path serves Inception (FID, sFID, IS, precision/recall, KID) and any other FeatureNetwork
(the proxy classifier: Fréchet distance / KID / precision-recall in its features, accuracy on the labels).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eval.data import ArraySource, ImageSource, RefStats, fashion_mnist_uint8, load_npz, load_ref_stats, npz_images
from eval.features import extract_features
from eval.frechet import feature_stats
from eval.metrics import compute_metrics


@dataclass
class Reference:
    stats: dict[str, np.ndarray]  # mu, sigma[, mu_s, sigma_s]
    feats: dict[str, np.ndarray] | None  # raw "pool" features for KID / precision-recall, when known
    info: dict = field(default_factory=dict)  # path, content hash, how the statistics were obtained


def stats_from_features(feats: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    pool = feature_stats(feats["pool"], f"{name} pool features")
    stats = {"mu": pool.mu, "sigma": pool.sigma}
    if "spatial" in feats:
        spatial = feature_stats(feats["spatial"], f"{name} spatial features")
        stats.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
    return stats


def network_info(net) -> dict:
    return {"name": net.name, "weights_sha256": getattr(net, "weights_sha256", None),
            "feature_dims": {k: int(v) for k, v in getattr(net, "feature_dims", {}).items()}}


def check_reference_network(ref: RefStats, net, pool_dim: int) -> None:
    """Statistics must come from the same network (and ideally the same weights) as the sample features."""
    mu_dim = ref.arrays["mu"].shape[0]
    if mu_dim != pool_dim:
        raise ValueError(f"reference statistics {ref.source} have dimension {mu_dim} but {net.name} gives {pool_dim}-d "
                         f"features; they were computed with another feature network (Inception pool = 2048, proxy "
                         f"classifier = its last width); recompute them with `python -m eval.ref_stats`")
    stored = ref.meta.get("network", {})
    if stored.get("name") and stored["name"] != net.name:
        raise ValueError(f"reference statistics {ref.source} were computed with {stored['name']!r}, not {net.name!r}")
    sha = getattr(net, "weights_sha256", None)
    if stored.get("weights_sha256") and sha and stored["weights_sha256"] != sha:
        warnings.warn(f"reference statistics {ref.source} were computed with other weights of {net.name} "
                      f"(sha256 {stored['weights_sha256'][:12]}... vs {sha[:12]}...); the metrics are not comparable")


def load_reference(path: str | Path, net, *, batch_size: int = 100, device=None,
                   recompute_from_images: bool = True) -> Reference:
    """A statistics file (ours or ADM's) or an ADM reference batch. For a batch with `arr_0` images, features
    are computed with `net` (needed for KID / precision-recall); FID uses statistics of those same features
    unless `recompute_from_images=False`, in which case the file's stored mu/sigma are used as ADM does
    (those come from TensorFlow's Inception, so they differ slightly from any PyTorch network's)."""
    data = load_npz(path)
    info = {"path": str(path)}
    feats = None
    if "arr_0" in data:
        source = npz_images(path, data)
        feats = extract_features(net, source, batch_size, device, desc=f"reference features ({net.name})")
        info["num_images"] = len(source)
    if feats is not None and (recompute_from_images or "mu" not in data):
        stats = stats_from_features(feats, "reference")
        info["stats_from"] = f"features of arr_0 computed with {net.name}"
        info["content_sha256"] = RefStats(stats).content_hash
        return Reference(stats, feats, info)
    ref = load_ref_stats(path, data)
    pool_dim = int(net.feature_dims["pool"]) if hasattr(net, "feature_dims") else ref.arrays["mu"].shape[0]
    check_reference_network(ref, net, pool_dim)
    if feats is None and "pool" in ref.arrays:
        feats = {"pool": ref.arrays["pool"]}
    info.update(stats_from=f"stored statistics ({ref.meta.get('format')})", content_sha256=ref.content_hash,
                ref_meta={k: v for k, v in ref.meta.items() if k != "format"})
    return Reference({k: ref.arrays[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in ref.arrays}, feats, info)


def fashion_mnist_reference(root: str | Path, net, image_size: int, batch_size: int = 500, device=None,
                            split: str = "test") -> Reference:
    images, labels, _ = fashion_mnist_uint8(root, split, image_size)
    feats = extract_features(net, ArraySource(images, f"fashion-mnist {split}"), batch_size, device,
                             desc=f"Fashion-MNIST {split} features ({net.name})", keys=("pool",))
    stats = stats_from_features(feats, f"Fashion-MNIST {split}")
    return Reference(stats, feats, {"path": str(root), "split": split, "num_images": len(images),
                                    "stats_from": f"Fashion-MNIST {split} set, {net.name}",
                                    "content_sha256": RefStats(stats).content_hash})


def evaluate(net, source: ImageSource, reference: Reference, *, prefix: str = "", batch_size: int = 100,
             device=None, labels: np.ndarray | None = None, compute_is: bool = True, **metric_kwargs) -> dict:
    """Features of `source` with `net`, then every metric the features and the reference allow."""
    keys = tuple(k for k in net.feature_names if k != "spatial" or "mu_s" in reference.stats)
    t0 = time.perf_counter()
    feats = extract_features(net, source, batch_size, device, desc=f"sample features ({net.name})", keys=keys)
    t1 = time.perf_counter()
    metrics = compute_metrics(feats, reference.stats, reference.feats, labels=labels, prefix=prefix,
                              compute_is=compute_is, device=device or "cpu", **metric_kwargs)
    t2 = time.perf_counter()
    return {"metrics": metrics, "network": network_info(net), "reference": reference.info,
            "timings_s": {"features": round(t1 - t0, 3), "metrics": round(t2 - t1, 3)}}


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

"""Glue between images, a feature network and a reference: the evaluation used by every CLI here.

The same code path serves Inception (FID, sFID, IS, precision/recall, KID) and any other FeatureNetwork
(the proxy classifier: Fréchet distance / KID / precision-recall in its features, accuracy on the labels).
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eval.data import ArraySource, ImageSource, RefStats, fashion_mnist_uint8, load_npz, load_ref_stats, npz_images
from eval.features import extract_features
from eval.frechet import feature_stats
from eval.intervals import metric_intervals
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
    info = {"name": net.name, "weights_sha256": getattr(net, "weights_sha256", None),
            "feature_dims": {k: int(v) for k, v in getattr(net, "feature_dims", {}).items()}}
    if getattr(net, "fid_mode", None):
        info.update(fid_mode=net.fid_mode, resize=net.resize)
    return info


class FIDModeError(ValueError):
    """Reference statistics and sample features come from different FID protocols."""


def stored_fid_mode(data) -> str | None:
    """The FID mode of the statistics a reference file carries: ours record it; an ADM reference batch's
    came from the TF graph ("adm"); ours from before modes existed used pytorch-fid's path ("recompute")."""
    if "mu" not in data:
        return None
    if "meta" not in data:
        return "adm"
    meta = json.loads(str(data["meta"]))
    network = meta.get("network", {})
    if network.get("name") != "inception-v3-fid":
        return None  # proxy statistics: the FID protocol does not apply
    return meta.get("fid_mode") or network.get("fid_mode") or "recompute"


def default_fid_mode(path: str | Path) -> str:
    """"adm" for an ADM reference batch, the recorded mode of our statistics, "recompute" for images only."""
    try:  # lazily: an ADM batch's arr_0 is 2 GB and is not needed to read the mode
        with np.load(path, allow_pickle=False) as data:
            return stored_fid_mode(data) or "recompute"
    except (ValueError, OSError, EOFError):
        load_npz(path)  # raises the error that names the problem
        raise


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


def load_reference(path: str | Path, net, *, batch_size: int = 100, device=None) -> Reference:
    """A statistics file (ours or ADM's) or an ADM reference batch, for `net` in its FID mode.

    Stored statistics are used as they are when they were made in the network's FID mode (always the case
    for an ADM batch in mode "adm"); otherwise they are recomputed from the file's `arr_0` images with `net`,
    and a statistics-only file of another mode is refused (FIDModeError). Reference features for KID /
    precision-recall come from `arr_0` through `net`, or from the file's stored "pool" features."""
    data = load_npz(path)
    info = {"path": str(path)}
    mode, stored_mode = getattr(net, "fid_mode", None), stored_fid_mode(data)
    if mode and stored_mode and stored_mode != mode and "arr_0" not in data:
        raise FIDModeError(f"reference statistics {path} were made in FID mode '{stored_mode}' but the samples are "
                           f"evaluated in mode '{mode}'; use --fid-mode {stored_mode} or recompute the statistics "
                           f"with `python -m eval.ref_stats --fid-mode {mode}`")
    use_stored = "mu" in data and (stored_mode is None or stored_mode == mode)
    feats = None
    if "arr_0" in data:
        source = npz_images(path, data)
        feats = extract_features(net, source, batch_size, device, desc=f"reference features ({net.name})")
        info["num_images"] = len(source)
    if feats is not None and not use_stored:
        stats = stats_from_features(feats, "reference")
        info["stats_from"] = f"features of arr_0 computed with {net.name}" + (f" (FID mode {mode})" if mode else "")
        info["content_sha256"] = RefStats(stats).content_hash
        if mode:
            info["fid_mode"] = mode
        return Reference(stats, feats, info)
    ref = load_ref_stats(path, data)
    pool_dim = int(net.feature_dims["pool"]) if hasattr(net, "feature_dims") else ref.arrays["mu"].shape[0]
    check_reference_network(ref, net, pool_dim)
    if feats is None and "pool" in ref.arrays:
        feats = {"pool": ref.arrays["pool"]}
    info.update(stats_from=f"stored statistics ({ref.meta.get('format')}), used as they are",
                content_sha256=ref.content_hash, ref_meta={k: v for k, v in ref.meta.items() if k != "format"})
    if stored_mode:
        info["fid_mode"] = stored_mode
    return Reference({k: ref.arrays[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in ref.arrays}, feats, info)


def fashion_mnist_reference(root: str | Path, net, image_size: int | None = None, batch_size: int = 500, device=None,
                            split: str = "test", pad_small: bool | None = None) -> Reference:
    """Reference features of a real split. The layout (size, padded or upsampled) defaults to the one the
    proxy classifier was trained on (its config), which is the layout of the models it scores."""
    config = getattr(net, "config", None)
    image_size = image_size or getattr(config, "real_image_size", None) or getattr(config, "image_size")
    pad_small = getattr(config, "pad_small", True) if pad_small is None else pad_small
    images, labels, _ = fashion_mnist_uint8(root, split, image_size, pad_small)
    feats = extract_features(net, ArraySource(images, f"fashion-mnist {split}"), batch_size, device,
                             desc=f"Fashion-MNIST {split} features ({net.name})", keys=("pool",))
    stats = stats_from_features(feats, f"Fashion-MNIST {split}")
    return Reference(stats, feats, {"path": str(root), "split": split, "num_images": len(images),
                                    "stats_from": f"Fashion-MNIST {split} set, {net.name}",
                                    "content_sha256": RefStats(stats).content_hash})


def evaluate(net, source: ImageSource, reference: Reference, *, prefix: str = "", batch_size: int = 100,
             device=None, labels: np.ndarray | None = None, compute_is: bool = True, bootstrap: int = 0,
             ci_seed: int = 0, ci_level: float = 0.95, keep_features: bool = False, **metric_kwargs) -> dict:
    """Features of `source` with `net`, then every metric the features and the reference allow; with
    `bootstrap` > 0 also their confidence intervals (eval.intervals.metric_intervals); with `keep_features` the
    features themselves under "features" (arrays: not for a JSON report)."""
    keys = tuple(k for k in net.feature_names if k != "spatial" or "mu_s" in reference.stats)
    t0 = time.perf_counter()
    feats = extract_features(net, source, batch_size, device, desc=f"sample features ({net.name})", keys=keys)
    t1 = time.perf_counter()
    metrics = compute_metrics(feats, reference.stats, reference.feats, labels=labels, prefix=prefix,
                              compute_is=compute_is, device=device or "cpu", **metric_kwargs)
    t2 = time.perf_counter()
    report = {"metrics": metrics, "network": network_info(net), "reference": reference.info}
    if getattr(net, "fid_mode", None):
        report["protocol"] = {"fid_mode": net.fid_mode, "weights_sha256": getattr(net, "weights_sha256", None),
                              "resize": net.resize, "num_samples": len(source),
                              "reference_stats": reference.info.get("stats_from")}
    if bootstrap > 0:
        report["intervals"] = metric_intervals(feats, reference.stats, reference.feats, metrics, prefix=prefix,
                                               n_boot=bootstrap, seed=ci_seed, level=ci_level)
    report["timings_s"] = {"features": round(t1 - t0, 3), "metrics": round(t2 - t1, 3),
                           "intervals": round(time.perf_counter() - t2, 3)}
    if keep_features:
        report["features"] = feats
    return report


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

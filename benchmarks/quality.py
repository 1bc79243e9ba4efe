"""The benchmark's quality pass: proxy scores of a sampler on class-balanced images with per-image seeds, its
agreement with the baseline on the same seeds, and paired FD differences between samplers.

Every sampler draws image i with the same label and seed, so two samplers' image sets are paired item by item:
`paired_fd` gives FD(a) - FD(b) with one bootstrap over the shared items (eval.intervals.fd_paired_difference_ci),
much tighter than comparing two separate FD intervals.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from eval.data import ArraySource
from eval.harness import evaluate, fashion_mnist_reference
from eval.intervals import fd_paired_difference_ci, mean_ci
from eval.proxy import load_classifier
from samplers.seeding import image_seed
from training.images import psnr


def mean_psnr(a_N3HW: torch.Tensor, b_N3HW: torch.Tensor) -> float:
    """Mean over images of the one per-image PSNR (training.images.psnr); +inf when all images are equal."""
    per_image = psnr(a_N3HW, b_N3HW)
    finite = per_image[torch.isfinite(per_image)]
    return float("inf") if finite.numel() == 0 else float(finite.mean())


class ProxyQuality:
    """Offline proxy quality of a sampler (eval/: classifier-feature Fréchet distance vs the real Fashion-MNIST
    test set, and classifier accuracy on the intended labels) from `count` class-balanced images."""

    def __init__(self, classifier: str, data: str, count: int, batch: int, seed: int, device: torch.device):
        self.net = load_classifier(classifier, device)
        self.reference = fashion_mnist_reference(data, self.net, device=device)
        self.count, self.batch, self.seed, self.device = count, batch, seed, device

    def __call__(self, sampler, num_classes: int, sample_kwargs: dict, baseline: dict | None = None):
        """Scores of `sampler`; with `baseline` (what this returned for the baseline sampler, same labels and
        seeds) also per-image PSNR and token agreement against its images, with t intervals. Also returns the
        images, tokens and proxy pool features (for `paired_fd`)."""
        labels = torch.arange(self.count, device=self.device) % num_classes
        arrays, images, tokens = [], [], []
        for start in range(0, self.count, self.batch):
            idx = list(range(start, min(start + self.batch, self.count)))
            out = sampler.sample(labels[idx], seed=[image_seed(self.seed, 10**6 + i) for i in idx], **sample_kwargs)
            arrays.append(out.images.mul(255).add_(0.5).clamp_(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy())
            images.append(out.images.cpu())
            tokens.append(torch.cat(out.tokens, dim=1).cpu())
        images_N3HW, tokens_NL = torch.cat(images), torch.cat(tokens)
        source = ArraySource(np.concatenate(arrays), "benchmark samples", labels.cpu().numpy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank-deficiency is expected and stated for small counts
            report = evaluate(self.net, source, self.reference, prefix="proxy_", labels=source.labels,
                              compute_is=False, device=self.device, kid_subset_size=min(1000, self.count),
                              bootstrap=200, ci_seed=self.seed, keep_features=True)
        m, ci = report["metrics"], report.get("intervals", {})
        out = {key: m[key] for key in ("proxy_fd", "proxy_accuracy", "proxy_precision", "proxy_recall") if key in m}
        out["proxy_images"] = self.count
        for key in ("proxy_fd", "proxy_accuracy", "proxy_precision", "proxy_recall"):  # 95 % intervals
            if key in ci:
                out[f"{key}_ci"] = [ci[key]["low"], ci[key]["high"]]
        if baseline is not None:
            psnr_N = psnr(images_N3HW, baseline["images"]).numpy()
            agree_N = (tokens_NL == baseline["tokens"]).float().mean(1).numpy()
            out["quality_psnr_db"] = mean_psnr(images_N3HW, baseline["images"])
            out["quality_token_agreement"] = float(agree_N.mean())
            if np.isfinite(psnr_N).sum() >= 2:
                out["quality_psnr_db_ci"] = [(c := mean_ci(psnr_N))["low"], c["high"]]
            if agree_N.std() > 0:
                out["quality_token_agreement_ci"] = [(c := mean_ci(agree_N))["low"], c["high"]]
        return out, {"images": images_N3HW, "tokens": tokens_NL, "features": report["features"]["pool"]}


def paired_fd(quality: ProxyQuality, features: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> list[dict]:
    """FD(a) - FD(b) with its paired 95 % interval for each (a, b) of sampler labels scored by `quality`."""
    out = []
    ref = quality.reference
    for a, b in pairs:
        missing = [x for x in (a, b) if x not in features]
        if missing:
            raise ValueError(f"--paired-fd {a}..{b}: no proxy scores for {missing[0]!r} (not a --sampler of this run)")
        ci = fd_paired_difference_ci(features[a], features[b], None if ref.feats is None else ref.feats["pool"],
                                     ref.stats["mu"], ref.stats["sigma"], n_boot=200, seed=quality.seed)
        out.append({"a": a, "b": b, "fd_difference": ci["estimate"], "ci": [ci["low"], ci["high"]],
                    "significant": ci["significant"], "method": ci["method"]})
    return out

"""The feature-network interface and the batched extraction loop shared by every metric.

A FeatureNetwork is any nn.Module that maps RGB images (B, 3, H, W) float in [0, 1] to a dict of 2-D
feature tensors; it declares which keys it returns in `feature_names`:
  "pool"    (required) features for Fréchet distance, KID and precision/recall;
  "spatial" (optional) features for sFID;
  "logits"  (optional) class logits for Inception Score / classifier accuracy.
It also carries `feature_dims` ({key: dimension}), `name` and, when loaded from a file, `weights_sha256`, which end up in the reports.
InceptionFeatures (eval.inception) and ProxyClassifier (eval.proxy) both follow it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from eval.data import ImageSource


@runtime_checkable
class FeatureNetwork(Protocol):
    name: str
    feature_names: tuple[str, ...]
    feature_dims: dict[str, int]

    def __call__(self, img_B3HW_01: torch.Tensor) -> dict[str, torch.Tensor]: ...


@contextmanager
def full_fp32(device_type: str):
    """Plain float32 inside: autocast off, and no TF32 in CUDA matmuls or convolutions (on by default for
    cuDNN, and the trainer turns it on for matmuls), so features do not depend on the GPU generation."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_feature_network(net) -> None:
    if not isinstance(net, FeatureNetwork) or "pool" not in getattr(net, "feature_names", ()):
        raise TypeError(f"{type(net).__name__} is not a FeatureNetwork: it needs `name`, `feature_names` "
                        f"containing 'pool', and a forward(images in [0, 1]) returning a dict of features")


def uint8_to_input(img_BHWC: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(img_BHWC)).to(device)
    return rearrange(x, "b h w c -> b c h w").float().div_(255.0)


@torch.inference_mode()
def extract_features(net, source: ImageSource, batch_size: int = 100, device: str | torch.device | None = None,
                     desc: str | None = None, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Run `net` over all images of `source`; returns {key: (N, D) float32} for the requested keys.

    Runs in float32 (`full_fp32`): FID is sensitive to feature precision, and the reference statistics it is
    compared with were computed in float32.
    """
    check_feature_network(net)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    keys = tuple(keys or net.feature_names)
    absent = [k for k in keys if k not in net.feature_names]
    if absent:
        raise ValueError(f"{net.name} does not produce {absent}; it gives {net.feature_names}")
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    with full_fp32(device.type), tqdm(total=len(source), desc=desc or f"features ({net.name})", unit="img") as bar:
        for batch in source.batches(batch_size):
            out = net(uint8_to_input(batch, device))
            for k in keys:
                chunks[k].append(out[k].float().cpu().numpy())
            bar.update(len(batch))
    return {k: np.concatenate(v) for k, v in chunks.items()}


@torch.inference_mode()
def extract_from_tensors(net, img_N3HW_01: torch.Tensor, batch_size: int = 100, desc: str | None = None,
                         keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Same as extract_features for float images already in memory (e.g. tokenizer reconstructions)."""
    check_feature_network(net)
    device = next(net.parameters()).device
    keys = tuple(keys or net.feature_names)
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    with full_fp32(device.type):
        for i in tqdm(range(0, len(img_N3HW_01), batch_size), desc=desc or f"features ({net.name})", leave=False):
            out = net(img_N3HW_01[i:i + batch_size].to(device).float())
            for k in keys:
                chunks[k].append(out[k].float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}

"""Offline quality proxy: a small CNN classifier whose penultimate features stand in for Inception's.

Numbers computed with it are a *proxy* (Fréchet distance / KID in this classifier's feature space, and its
accuracy on the intended labels); they are not FID and are not comparable with any published FID.

Input convention (the one every FeatureNetwork here follows): RGB float images in [0, 1], (B, 3, H, W) —
what samplers and tokenizers produce. The classifier averages the channels (Fashion-MNIST is grayscale,
replicated to 3 channels by training.data) and resizes to its training resolution when H, W differ.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from training.atomic import atomic_write, atomic_write_json, file_sha256

FORMAT_NAME = "var-toolkit-proxy-classifier"
FORMAT_VERSION = 1


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    image_size: int = 32  # the network's input resolution (other sizes are resized to it)
    # how the real Fashion-MNIST images (training set, FD reference) are laid out, as the tokenizer's data:
    # 28x28 centre-padded (pad_small, the 32 px models) or upsampled with Lanczos, at data_size (0: image_size)
    pad_small: bool = True
    data_size: int = 0
    widths: tuple[int, ...] = (32, 64, 128)  # conv stages, each ending in a 2x2 max-pool
    convs_per_stage: int = 1
    feature_dim: int = 128  # penultimate layer: the proxy's feature space
    class_names: list[str] = field(default_factory=list)

    @property
    def real_image_size(self) -> int:
        """The resolution the real images are rendered at (before the network resizes them)."""
        return self.data_size or self.image_size

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.num_classes < 2 or not self.widths or self.image_size % 2 ** len(self.widths):
            raise ValueError(f"invalid classifier config {self}: need >= 2 classes, >= 1 stage and an image "
                             f"size divisible by 2^{len(self.widths)} (one 2x pooling per stage)")
        if self.data_size < 0 or (self.data_size and self.data_size < self.image_size):
            raise ValueError(f"data_size must be 0 (= image_size) or >= image_size {self.image_size}, got {self.data_size}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ProxyClassifier(nn.Module):
    """FeatureNetwork: images in [0, 1] -> {"pool": penultimate pre-activation (B, feature_dim), "logits": (B, K)}."""

    feature_names = ("pool", "logits")

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        stages, c_in = [], 1
        for width in config.widths:
            stage = [_conv_bn(c_in if j == 0 else width, width) for j in range(config.convs_per_stage)]
            stages.append(nn.Sequential(*stage, nn.MaxPool2d(2)))
            c_in = width
        self.stages = nn.Sequential(*stages)
        side = config.image_size // 2 ** len(config.widths)
        # flatten, not global pooling: where a shape sits in the frame matters for Fashion-MNIST classes
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, config.feature_dim))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(config.feature_dim, config.num_classes))
        self.name = f"proxy-cnn{'-'.join(map(str, config.widths))}-fc{config.feature_dim}"
        self.feature_dims = {"pool": config.feature_dim, "logits": config.num_classes}
        self.weights_sha256: str | None = None

    def preprocess(self, img_B3HW_01: torch.Tensor) -> torch.Tensor:
        if img_B3HW_01.ndim != 4 or img_B3HW_01.shape[1] not in (1, 3):
            raise ValueError(f"proxy classifier expects images (B, 3, H, W) in [0, 1], got {tuple(img_B3HW_01.shape)}")
        gray = img_B3HW_01.float().mean(dim=1, keepdim=True)
        size = self.config.image_size
        if gray.shape[-2:] != (size, size):
            gray = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return gray * 2 - 1

    def forward(self, img_B3HW_01: torch.Tensor) -> dict[str, torch.Tensor]:
        # features are taken *before* the ReLU: after it, units that never fire (48 of 128 in the shipped
        # model) are constant zeros and make every feature covariance singular
        feat_BC = self.embed(self.stages(self.preprocess(img_B3HW_01)))
        return {"pool": feat_BC, "logits": self.head(F.relu(feat_BC))}


def save_classifier(path: str | Path, model: ProxyClassifier, record: dict | None = None) -> Path:
    """safetensors (weights + config metadata) and a JSON twin (config + training record), both atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    config = asdict(model.config)
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "config": json.dumps(config)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    write_json_atomic(path.with_suffix(".json"), {"config": config, **(record or {})})
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> ProxyClassifier:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"proxy classifier {path} does not exist; the shipped one is "
                                f"eval/weights/fmnist_classifier.safetensors, or train one with "
                                f"`python -m eval.train_classifier --data /usr/share/datasets/fashion-mnist --out {path}`")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            state_dict = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a proxy classifier written by eval.train_classifier "
                         f"(format {meta.get('format')!r}); tokenizer/VAR checkpoints are not feature networks")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(f"{path} has a newer format version than this code; update the toolkit")
    model = ProxyClassifier(ClassifierConfig(**json.loads(meta["config"])))
    model.load_state_dict(state_dict, strict=True)
    model.weights_sha256 = file_sha256(path)
    return model.to(device).eval()


def write_json_atomic(path: str | Path, obj) -> None:
    """JSON that may hold numpy scalars/arrays (metric reports)."""
    atomic_write_json(path, obj, default=_json_default)


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (np.ndarray, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

"""Pixels -> model input: the VAR train / eval transforms and the per-sample random generator.

The public VAR recipe: resize the shorter side to round(mid_reso * S) with Lanczos (PIL, as torchvision's
PIL path does), a random S x S crop for training (centre crop for evaluation), an optional horizontal flip
(training only), then the map to [-1, 1]. With mid_reso = 1 and no random crop (the default, no
augmentation) the transform is `to_model_range`, bit for bit, so the shipped Fashion-MNIST and procedural
runs keep their exact inputs; images no larger than S at mid_reso = 1 are centre-padded with the
background -1 rather than upsampled (Fashion-MNIST's 28x28 digits stay unresampled in 32 px).

Randomness comes only from the generator passed in, and `sample_generator(seed, epoch, index)` derives it
from the sample's identity, so a batch is the same whichever DataLoader worker (or how many) produced it.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_model_range(img_uint8_HWC: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W[, C]) -> float (3, size, size) in [-1, 1].

    Images no larger than `size` are centre-padded with the background value -1 (pixels stay exact, which
    keeps Fashion-MNIST's 28x28 digits unresampled); larger ones are resized (antialiased) so the shorter
    side is `size`, then centre-cropped, so aspect ratios are kept."""
    img = _to_float_CHW(img_uint8_HWC)
    h, w = img.shape[-2:]
    if h <= size and w <= size:
        return _centre_pad(img, size)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = F.interpolate(img.unsqueeze(0), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top: top + size, left: left + size].clamp(-1, 1).contiguous()


def _to_float_CHW(img_uint8_HWC: np.ndarray) -> torch.Tensor:
    """uint8 (H, W[, C]) -> float (3, H, W) = v / 127.5 - 1; one channel is replicated, alpha dropped."""
    img = torch.from_numpy(np.array(img_uint8_HWC, dtype=np.float32)).div_(127.5).sub_(1)
    img = img.unsqueeze(-1) if img.ndim == 2 else img
    img = img.permute(2, 0, 1)[:3]
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def _centre_pad(img_3HW: torch.Tensor, size: int) -> torch.Tensor:
    h, w = img_3HW.shape[-2:]
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(img_3HW, (left, size - w - left, top, size - h - top), value=-1.0).contiguous()


def _as_rgb_uint8(img_uint8_HWC: np.ndarray) -> np.ndarray:
    img = np.asarray(img_uint8_HWC)
    if img.dtype != np.uint8:
        raise TypeError(f"VARTransform takes uint8 pixels (H, W[, C]), got dtype {img.dtype}")
    img = img[..., None] if img.ndim == 2 else img
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img[..., :3]


def resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(height, width) with the shorter side `short`; the longer one truncated, as torchvision's Resize(int)."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded by a hash of (seed, epoch, index): every sample of every epoch gets its own stream,
    independent of which worker decodes it and of the other samples in its batch."""
    digest = hashlib.sha256(f"var-transform:{seed}:{epoch}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class VARTransform:
    """uint8 (H, W[, C]) pixels -> float (3, S, S) in [-1, 1], see the module docstring."""

    def __init__(self, image_size: int, mid_reso: float = 1.0, random_crop: bool = False, hflip: bool = False,
                 pad_small: bool = True):
        if mid_reso < 1:
            raise ValueError(f"mid_reso must be >= 1 (the crop is taken from the resized image), got {mid_reso}")
        self.image_size, self.mid_reso, self.random_crop, self.hflip = int(image_size), float(mid_reso), random_crop, hflip
        # False: images smaller than S are upsampled (Lanczos) like any other, e.g. 28 px Fashion-MNIST at 64 px
        self.pad_small = bool(pad_small)
        self.mid_size = round(self.mid_reso * self.image_size)

    @classmethod
    def from_config(cls, data_cfg) -> "VARTransform":
        return cls(data_cfg.image_size, data_cfg.mid_reso, data_cfg.random_crop, data_cfg.hflip, data_cfg.pad_small)

    @property
    def legacy(self) -> bool:
        """True for the unaugmented default, which is `to_model_range` exactly."""
        return self.mid_reso == 1 and not self.random_crop and self.pad_small

    def is_random(self, train: bool = True) -> bool:
        return train and (self.hflip or (self.random_crop and not self.legacy))

    def describe(self) -> dict:
        """The settings that change the pixels (for cache fingerprints)."""
        settings = {"image_size": self.image_size, "mid_reso": self.mid_reso, "random_crop": self.random_crop,
                    "hflip": self.hflip}
        return settings if self.pad_small else {**settings, "pad_small": False}  # older fingerprints stay valid

    def fingerprint(self, train: bool = True) -> str:
        return hashlib.sha256(json.dumps({**self.describe(), "train": train}, sort_keys=True).encode()).hexdigest()

    def params(self, h: int, w: int, generator: torch.Generator | None, train: bool = True):
        """(top, left, flip) for an (h, w) image after the resize: the crop window and the flip this call
        takes. The draws are made in this order: crop top, crop left, flip (a draw is only made for a
        random choice, so turning hflip on leaves the crops of a seed unchanged)."""
        S = self.image_size
        if self.is_random(train) and generator is None:
            raise ValueError("VARTransform with random_crop / hflip needs a generator for training samples; pass "
                             "training.transforms.sample_generator(seed, epoch, index)")
        if train and self.random_crop and not self.legacy and (h > S or w > S):
            top = int(torch.randint(0, h - S + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - S + 1, (1,), generator=generator))
        else:  # torchvision's CenterCrop rounding
            top, left = int(round((h - S) / 2.0)), int(round((w - S) / 2.0))
        flip = bool(train and self.hflip and float(torch.rand((), generator=generator)) < 0.5)
        return top, left, flip

    def resize(self, img_uint8_HWC: np.ndarray) -> np.ndarray:
        """The shorter side to round(mid_reso * S) with Lanczos; images no larger than S at mid_reso = 1 are
        returned as they are (they get padded, not upsampled)."""
        rgb = _as_rgb_uint8(img_uint8_HWC)
        h, w = rgb.shape[:2]
        if self.pad_small and self.mid_reso == 1 and h <= self.image_size and w <= self.image_size:
            return rgb
        nh, nw = resized_size(h, w, self.mid_size)
        if (nh, nw) == (h, w):
            return rgb
        return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((nw, nh), Image.Resampling.LANCZOS))

    def __call__(self, img_uint8_HWC: np.ndarray, generator: torch.Generator | None = None,
                 train: bool = True) -> torch.Tensor:
        S = self.image_size
        if self.legacy:
            img = to_model_range(img_uint8_HWC, S)
            _, _, flip = self.params(S, S, generator, train)
        else:
            resized = self.resize(img_uint8_HWC)
            h, w = resized.shape[:2]
            top, left, flip = self.params(h, w, generator, train)
            if h <= S and w <= S:  # only at mid_reso = 1: pad instead of upsampling
                img = _centre_pad(_to_float_CHW(resized), S)
            else:
                img = _to_float_CHW(resized[top: top + S, left: left + S]).contiguous()
        return img.flip(-1).contiguous() if flip else img

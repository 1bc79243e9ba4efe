"""Datasets: Fashion-MNIST from its idx files, class-subfolder image folders, and a procedural set for tests.

All return (image (3, S, S) float in [-1, 1], label int). Grayscale is replicated to 3 channels so every
model, grid and feature network sees the usual RGB layout.
"""
from __future__ import annotations

import gzip
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from training.config import DataConfig
from training.images import read_rgb_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def to_model_range(img_uint8_HWC: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W[, C]) -> float (3, size, size) in [-1, 1].

    Images no larger than `size` are centre-padded with the background value -1 (pixels stay exact, which
    keeps Fashion-MNIST's 28x28 digits unresampled); larger ones are resized (antialiased) so the shorter
    side is `size`, then centre-cropped, so aspect ratios are kept."""
    img = torch.from_numpy(np.array(img_uint8_HWC, dtype=np.float32)).div_(127.5).sub_(1)
    img = img.unsqueeze(-1) if img.ndim == 2 else img
    img = img.permute(2, 0, 1)[:3]
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img
    h, w = img.shape[-2:]
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(img, (left, size - w - left, top, size - h - top), value=-1.0).contiguous()
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = F.interpolate(img.unsqueeze(0), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top: top + size, left: left + size].clamp(-1, 1).contiguous()


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise ValueError(f"{path} is truncated: header says {shape}, found {body.size} values")
    return body.reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST from `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` in `root`."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 32):
        root = Path(root)
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        if not root.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST folder {root} does not exist; on Debian/Ubuntu run "
                                    f"`apt-get install dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist/) "
                                    f"or pass the folder holding the idx files")
        self.images = _read_idx(self._find(root, f"{prefix}-images-idx3-ubyte"))
        self.labels = _read_idx(self._find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{root}: {len(self.images)} images but {len(self.labels)} labels")
        self.image_size = image_size

    @staticmethod
    def _find(root: Path, stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (root / name).is_file():
                return root / name
        raise FileNotFoundError(f"{root} has no {stem}[.gz]; is this the Fashion-MNIST folder?")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return to_model_range(self.images[i], self.image_size), int(self.labels[i])


class ImageFolder(Dataset):
    """`root/<class name>/<image>`; classes sorted by name give labels 0..N-1 (saved as the label map).

    Hidden folders (`.ipynb_checkpoints`, `.git`, ...) are not classes. A class folder without images is an
    error naming it (it would become a label no sample has); with `skip_empty_classes` such folders are
    left out with one warning counting them, and the labels are numbered over the remaining classes.
    Pixels are decoded by `training.images.to_rgb_uint8` (16-bit scaled, transparency on white)."""

    def __init__(self, root: str | Path, image_size: int, skip_corrupt: bool = False,
                 skip_empty_classes: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist; set data.root to a folder holding one "
                                    f"subfolder of images per class")
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"{root} has no class subfolders; expected root/<class>/<image files>")
        files = {c: [p for p in sorted((root / c).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
                 for c in folders}
        empty = [c for c in folders if not files[c]]
        if len(empty) == len(folders):
            raise ValueError(f"{root} has class folders but no images with suffixes {sorted(IMAGE_SUFFIXES)}")
        if empty and not skip_empty_classes:
            raise ValueError(f"{root}: class folder(s) without images: {', '.join(str(root / c) for c in empty)}; "
                             f"add images, remove the folder(s), or set data.skip_empty_classes = true to skip them")
        if empty:
            warnings.warn(f"{root}: skipping {len(empty)} class folder(s) without images ({', '.join(empty)}); "
                          f"labels are numbered over the other {len(folders) - len(empty)}")
        self.classes = [c for c in folders if files[c]]
        self.skipped_classes = empty
        self.items = [(p, label) for label, c in enumerate(self.classes) for p in files[c]]
        self.image_size, self.skip_corrupt, self.bad = image_size, skip_corrupt, set()

    def __len__(self) -> int:
        return len(self.items)

    def load(self, path: Path) -> np.ndarray:
        try:  # decoded fully now: a truncated file must fail here, naming the file, not later
            return read_rgb_uint8(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}; remove or replace the file, "
                             f"or set data.skip_corrupt = true to skip unreadable images") from err

    def __getitem__(self, i: int):
        """With skip_corrupt, an unreadable file is replaced by the next readable one; each bad file is
        warned about once and counted in `skipped` (and not read again)."""
        for attempt in range(len(self.items)):
            path, label = self.items[(i + attempt) % len(self.items)]
            if path in self.bad:
                continue
            try:
                return to_model_range(self.load(path), self.image_size), label
            except ValueError:
                if not self.skip_corrupt:
                    raise
                self.bad.add(path)
                warnings.warn(f"skipping unreadable image {path} ({self.skipped} skipped so far)")
        raise ValueError(f"no readable image among the {len(self.items)} files of {self.items[0][0].parents[1]}")

    @property
    def skipped(self) -> int:
        return len(self.bad)


class ProceduralShapes(Dataset):
    """Deterministic synthetic classes (class c = a disc/bar pattern at a class-specific position and
    orientation, random jitter per index). Fast, and learnable by a tiny model: for tests and smoke runs."""

    def __init__(self, num_samples: int, image_size: int, num_classes: int = 10, seed: int = 0):
        self.n, self.size, self.num_classes, self.seed = num_samples, image_size, num_classes, seed
        self.classes = [f"shape_{c}" for c in range(num_classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % self.num_classes
        angle = math.pi * label / self.num_classes
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, self.size), torch.linspace(-1, 1, self.size), indexing="ij")
        jitter = (torch.rand(2, generator=g) - 0.5) * 0.3
        u = (xx - jitter[0]) * math.cos(angle) + (yy - jitter[1]) * math.sin(angle)
        v = -(xx - jitter[0]) * math.sin(angle) + (yy - jitter[1]) * math.cos(angle)
        bar = ((u.abs() < 0.7) & (v.abs() < 0.15 + 0.05 * (label % 3))).float()
        disc = (((u - 0.4) ** 2 + v**2) < 0.08).float() * (label % 2)
        gray = (bar + disc).clamp(0, 1) * 2 - 1
        return gray.expand(3, -1, -1).contiguous(), label


def build_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    if cfg.kind == "fashion_mnist":
        return FashionMNIST(cfg.root, cfg.split, cfg.image_size)
    if cfg.kind == "image_folder":
        # getattr: the DataConfig field may not exist yet (training/config.py is owned elsewhere)
        return ImageFolder(cfg.root, cfg.image_size, cfg.skip_corrupt, getattr(cfg, "skip_empty_classes", False))
    return ProceduralShapes(cfg.num_samples, cfg.image_size, cfg.num_classes, seed)

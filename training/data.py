"""Datasets: Fashion-MNIST from its idx files, class-subfolder image folders, and a procedural set for tests.

Indexing returns (image (3, S, S) float in [-1, 1], label int), the unaugmented model input. The data
pipeline (training/loader.py) reads `load_raw(i) -> (uint8 (H, W, C), label)` instead and applies the VAR
transform (training/transforms.py) in DataLoader workers. `fingerprint()` is a sha256 naming the item list
(files with sizes and mtimes / idx bytes / procedural parameters) and the image size, for token caches.
Grayscale is replicated to 3 channels so every model, grid and feature network sees the usual RGB layout.
`build_datasets` also returns the held-out validation split (data.val_root or data.val_fraction).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from training.config import DataConfig
from training.images import read_rgb_uint8
from training.transforms import to_model_range  # noqa: F401  (re-exported: its callers import it from here)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


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

    def load_raw(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i][..., None], int(self.labels[i])

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"fashion_mnist:{self.image_size}:{self.images.shape}".encode())
        h.update(np.ascontiguousarray(self.images).data)
        h.update(np.ascontiguousarray(self.labels).data)
        return h.hexdigest()


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
        self.root, self.image_size, self.skip_corrupt, self.bad = root, image_size, skip_corrupt, set()

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

    def load_raw(self, i: int) -> tuple[np.ndarray, int]:
        """The decoded pixels of item i (no skipping: ValueError naming the file, see `load`)."""
        path, label = self.items[i]
        return self.load(path), label

    def fingerprint(self) -> str:
        """Files (relative path, label, size, mtime) and the image size: a changed, added or removed file
        changes it; reading the pixels is not needed."""
        h = hashlib.sha256(json.dumps({"kind": "image_folder", "image_size": self.image_size,
                                       "classes": self.classes}).encode())
        for path, label in self.items:
            st = path.stat()
            h.update(f"\n{path.relative_to(self.root).as_posix()}\t{label}\t{st.st_size}\t{st.st_mtime_ns}".encode())
        return h.hexdigest()


class ProceduralShapes(Dataset):
    """Deterministic synthetic classes (class c = a disc/bar pattern at a class-specific position and
    orientation, random jitter per index). Fast, and learnable by a tiny model: for tests and smoke runs."""

    def __init__(self, num_samples: int, image_size: int, num_classes: int = 10, seed: int = 0):
        self.n, self.size, self.num_classes, self.seed = num_samples, image_size, num_classes, seed
        self.classes = [f"shape_{c}" for c in range(num_classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self._pattern_01(i).mul(2).sub(1).expand(3, -1, -1).contiguous(), i % self.num_classes

    def load_raw(self, i: int) -> tuple[np.ndarray, int]:
        """The pattern as uint8 0 / 255 (S, S, 1): v / 127.5 - 1 gives exactly indexing's -1 / 1."""
        return (self._pattern_01(i) * 255).to(torch.uint8).unsqueeze(-1).numpy(), i % self.num_classes

    def fingerprint(self) -> str:
        return hashlib.sha256(f"procedural:{self.n}:{self.size}:{self.num_classes}:{self.seed}".encode()).hexdigest()

    def _pattern_01(self, i: int) -> torch.Tensor:
        """(S, S) float, 0 (background) or 1 (shape)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % self.num_classes
        angle = math.pi * label / self.num_classes
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, self.size), torch.linspace(-1, 1, self.size), indexing="ij")
        jitter = (torch.rand(2, generator=g) - 0.5) * 0.3
        u = (xx - jitter[0]) * math.cos(angle) + (yy - jitter[1]) * math.sin(angle)
        v = -(xx - jitter[0]) * math.sin(angle) + (yy - jitter[1]) * math.cos(angle)
        bar = ((u.abs() < 0.7) & (v.abs() < 0.15 + 0.05 * (label % 3))).float()
        disc = (((u - 0.4) ** 2 + v**2) < 0.08).float() * (label % 2)
        return (bar + disc).clamp(0, 1)


class Split(Dataset):
    """The items `indices` of `base` (a training or held-out part), with the base's interface."""

    def __init__(self, base: Dataset, indices: list[int], name: str):
        self.base, self.indices, self.name = base, list(indices), name
        self.classes = list(getattr(base, "classes", []))
        self.image_size = getattr(base, "image_size", getattr(base, "size", None))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    def load_raw(self, i: int) -> tuple[np.ndarray, int]:
        return self.base.load_raw(self.indices[i])

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"split:{self.name}:{self.base.fingerprint()}:".encode())
        h.update(np.asarray(self.indices, dtype=np.int64).tobytes())
        return h.hexdigest()


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices, each ascending: val = the last ceil(fraction * n) of a seeded permutation of
    range(n). The permutation's seed is derived from `seed` apart from the epoch orders' seeds."""
    n_val = math.ceil(fraction * n)
    if not 0 < n_val < n:
        raise ValueError(f"data.val_fraction = {fraction} holds out {n_val} of the {n} items; choose a fraction that "
                         f"leaves at least one item for validation and one for training")
    digest = hashlib.sha256(f"val-split:{seed}".encode()).digest()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return sorted(perm[: n - n_val].tolist()), sorted(perm[n - n_val:].tolist())


def build_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """The whole training set of `cfg` (no held-out split; see `build_datasets`)."""
    if cfg.kind == "fashion_mnist":
        return FashionMNIST(cfg.root, cfg.split, cfg.image_size)
    if cfg.kind == "image_folder":
        return ImageFolder(cfg.root, cfg.image_size, cfg.skip_corrupt, cfg.skip_empty_classes)
    return ProceduralShapes(cfg.num_samples, cfg.image_size, cfg.num_classes, seed)


def build_datasets(cfg: DataConfig, seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """(train, val | None). data.val_root: a second image folder whose class names must equal the
    training ones; data.val_fraction: a seeded split of the training items (see `split_indices`),
    the same for every process and every resume of a run with this seed."""
    full = build_dataset(cfg, seed)
    if cfg.val_root:
        val = ImageFolder(cfg.val_root, cfg.image_size, cfg.skip_corrupt, cfg.skip_empty_classes)
        if val.classes != full.classes:
            only_train = sorted(set(full.classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(full.classes))
            detail = f"only in training: {only_train[:5]}, only in validation: {only_val[:5]}"
            raise ValueError(f"data.val_root {cfg.val_root} has classes that differ from data.root {cfg.root} ({detail}); "
                             f"give both folders the same class subfolders")
        return full, val
    if cfg.val_fraction > 0:
        train_idx, val_idx = split_indices(len(full), cfg.val_fraction, seed)
        return Split(full, train_idx, "train"), Split(full, val_idx, "val")
    return full, None

"""Evaluation inputs: image folders, ADM-style `.npz` batches, and reference statistics files.

Images travel as uint8 (N, H, W, 3) numpy batches (the ADM `arr_0` layout); feature networks receive them
as float [0, 1]. Reference statistics are npz files holding `mu`/`sigma` (pool features), optionally
`mu_s`/`sigma_s` (spatial features, ADM naming) and raw features, plus a JSON `meta` record with a
content hash so an eval card can name exactly which reference it was scored against.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.atomic import atomic_write
from training.data import FashionMNIST
from training.images import UnsupportedImageError, read_rgb_uint8
from training.transforms import VARTransform

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
STATS_FORMAT = "var-toolkit-ref-stats"


class ImageSource(ABC):
    """A fixed, ordered set of images of one size, read lazily in batches."""

    def __init__(self, name: str, count: int, image_size: tuple[int, int], labels: np.ndarray | None = None):
        self.name, self.count, self.image_size, self.labels = name, count, image_size, labels

    def __len__(self) -> int:
        return self.count

    @abstractmethod
    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (b, H, W, 3) batches covering all images in order."""


class ArraySource(ImageSource):
    def __init__(self, images_NHWC: np.ndarray, name: str = "array", labels: np.ndarray | None = None):
        images_NHWC = _check_uint8_nhwc(images_NHWC, name)
        super().__init__(name, len(images_NHWC), images_NHWC.shape[1:3], labels)
        self.images = images_NHWC

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, self.count, batch_size):
            yield self.images[i:i + batch_size]


class FolderSource(ImageSource):
    """All PNG/JPEG files of a folder (recursively, sorted by relative path). Headers are checked up front
    so that mixed sizes fail before any compute; a file that cannot be decoded fails naming the file."""

    def __init__(self, root: str | Path, labels: np.ndarray | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"sample folder {root} does not exist")
        self.files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"{root} contains no {sorted(IMAGE_SUFFIXES)} files")
        first_size = None
        for path in self.files:
            size = _header_size(path)
            if first_size is None:
                first_size, first = size, path
            elif size != first_size:
                raise ValueError(f"images of mixed sizes in {root}: {first.name} is {first_size[0]}x{first_size[1]} "
                                 f"but {path.relative_to(root)} is {size[0]}x{size[1]} (W x H); metrics need one size: "
                                 f"resize the samples or evaluate each size separately")
        super().__init__(str(root), len(self.files), (first_size[1], first_size[0]), labels)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, self.count, batch_size):
            yield np.stack([read_image(p) for p in self.files[i:i + batch_size]])


def _header_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}; remove or regenerate this file") from err


def read_image(path: Path) -> np.ndarray:
    """One image file -> uint8 (H, W, 3), decoded as training reads images (`training.images.to_rgb_uint8`:
    grayscale replicated, 16-bit scaled to 8 bits, transparency composited on white)."""
    try:
        return read_rgb_uint8(path)
    except UnsupportedImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"corrupt or truncated image {path}: {err}; remove or regenerate this file") from err


def _check_uint8_nhwc(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 3:  # (N, H, W) grayscale
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: images must be uint8 (N, H, W, 3) (ADM `arr_0` layout), got shape {arr.shape}; "
                         f"channel-first (N, 3, H, W) arrays must be transposed first")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        raise ValueError(f"{name}: images must be uint8 in [0, 255], got dtype {arr.dtype}; convert floats in [0, 1] "
                         f"with (x * 255 + 0.5).clip(0, 255).astype(np.uint8)")
    return arr


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err})") from err


def npz_images(path: str | Path, data: dict[str, np.ndarray] | None = None) -> ArraySource:
    """ADM sample / reference batch: `arr_0` uint8 NHWC; class labels from `arr_1` (ADM) or `labels`."""
    data = load_npz(path) if data is None else data
    if "arr_0" not in data:
        raise KeyError(f"{path} has no 'arr_0' (keys: {sorted(data)}); image batches use the ADM layout "
                       f"np.savez(path, arr_0=uint8 NHWC images[, arr_1=labels]); statistics files (mu/sigma) "
                       f"can only be used as --ref")
    labels = data.get("arr_1", data.get("labels"))
    return ArraySource(data["arr_0"], name=str(path), labels=None if labels is None else np.asarray(labels))


def open_images(path: str | Path, labels_path: str | Path | None = None) -> ImageSource:
    """A folder of PNG/JPEG files or an ADM-format .npz; optional labels (.npy / .txt, one per image)."""
    path = Path(path)
    source = FolderSource(path) if path.is_dir() else npz_images(path)
    if labels_path is not None:
        lp = Path(labels_path)
        labels = np.load(lp) if lp.suffix == ".npy" else np.loadtxt(lp, dtype=np.int64, ndmin=1)
        source.labels = np.asarray(labels)
    if source.labels is not None and len(source.labels) != len(source):
        raise ValueError(f"{len(source.labels)} labels for {len(source)} images in {path}")
    return source


def fashion_mnist_uint8(root: str | Path, split: str, image_size: int, pad_small: bool = True
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A Fashion-MNIST split as uint8 (N, S, S, 3), laid out exactly like the tokenizer's training data (and
    therefore what its models reproduce): centre-padded with the background (data.pad_small = true, the 32 px
    models), or upsampled to S x S with Lanczos (data.pad_small = false, the 64 px models of v2)."""
    ds = FashionMNIST(root, split, image_size)
    n, h, w = ds.images.shape
    if not pad_small:
        resize = VARTransform(image_size, pad_small=False).resize
        out = np.stack([resize(np.repeat(img[..., None], 3, axis=-1)) for img in ds.images])
        return out, ds.labels.copy(), list(ds.classes)
    if h > image_size or w > image_size:
        raise ValueError(f"image size {image_size} is smaller than the {h}x{w} Fashion-MNIST images")
    top, left = (image_size - h) // 2, (image_size - w) // 2
    out = np.zeros((n, image_size, image_size), np.uint8)
    out[:, top:top + h, left:left + w] = ds.images
    return np.repeat(out[..., None], 3, axis=-1), ds.labels.copy(), list(ds.classes)


# ---- reference statistics ------------------------------------------------------------------------------
@dataclass
class RefStats:
    """Statistics of one reference set. Keys follow ADM: mu/sigma (pool), mu_s/sigma_s (spatial)."""

    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    source: str = ""

    def get(self, key: str) -> np.ndarray | None:
        return self.arrays.get(key)

    @property
    def content_hash(self) -> str:
        return stats_hash(self.arrays)


STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FEATURE_KEYS = ("pool", "spatial", "logits", "labels")


def stats_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over (key, dtype, shape, bytes) of every array, in key order: independent of npz packing."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def save_ref_stats(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> str:
    """Atomic write of a statistics npz; returns its content hash (also stored in meta)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference statistics are saved as .npz, got {path}")
    unknown = set(arrays) - set(STAT_KEYS) - set(FEATURE_KEYS)
    if unknown or "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"statistics need mu and sigma and only keys {STAT_KEYS + FEATURE_KEYS}; got {sorted(arrays)}")
    content_hash = stats_hash(arrays)
    meta = {**meta, "format": STATS_FORMAT, "content_sha256": content_hash}
    atomic_write(path, lambda tmp: np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays), suffix=".tmp.npz")
    return content_hash


def load_ref_stats(path: str | Path, data: dict[str, np.ndarray] | None = None) -> RefStats:
    """Our statistics file, or an ADM reference batch (mu/sigma[/mu_s/sigma_s] next to arr_0)."""
    data = load_npz(path) if data is None else data
    meta = json.loads(str(data.pop("meta"))) if "meta" in data else {"format": "adm-reference-batch"}
    arrays = {k: v for k, v in data.items() if k in STAT_KEYS + FEATURE_KEYS}
    if "mu" not in arrays or "sigma" not in arrays:
        missing = [k for k in ("mu", "sigma") if k not in arrays]
        raise KeyError(f"{path} has no {missing} (keys: {sorted(data)}); a reference needs either mu/sigma "
                       f"statistics or arr_0 images (compute statistics with `python -m eval.ref_stats`)")
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if mu_key in arrays:
            d = arrays[mu_key].shape
            if len(d) != 1 or sigma_key not in arrays or arrays[sigma_key].shape != (d[0], d[0]):
                raise ValueError(f"{path}: {mu_key} {d} and {sigma_key} "
                                 f"{arrays[sigma_key].shape if sigma_key in arrays else 'missing'} do not fit "
                                 f"(expected (D,) and (D, D)); the file is damaged or not a statistics file")
    stored = meta.get("content_sha256")
    if stored is not None and stored != stats_hash(arrays):
        raise ValueError(f"{path}: content hash mismatch (stored {stored[:12]}..., computed "
                         f"{stats_hash(arrays)[:12]}...); the file was modified or damaged, recompute it")
    return RefStats(arrays, meta, str(path))

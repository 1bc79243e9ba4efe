"""Small image helpers shared by training, sampling and evaluation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from training.atomic import atomic_write


def to_uint8_hwc(img_B3HW_01: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1] -> uint8 (B, H, W, 3) with round-to-nearest."""
    return img_B3HW_01.detach().float().clamp(0, 1).mul(255).add_(0.5).floor_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_image(img_B3HW_01: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    nrow = nrow or max(1, math.ceil(math.sqrt(img_B3HW_01.shape[0])))
    grid = make_grid(img_B3HW_01.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=padding, pad_value=1.0)
    return Image.fromarray(to_uint8_hwc(grid.unsqueeze(0))[0])


def save_png_atomic(image: Image.Image, path: str | Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))

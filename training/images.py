"""Small image helpers shared by training, sampling and evaluation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from training.atomic import atomic_write


_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class UnsupportedImageError(ValueError):
    """A readable image in a mode with no defined 8-bit RGB meaning (32-bit float)."""


def to_rgb_uint8(im: Image.Image, source: str = "image") -> np.ndarray:
    """A decoded PIL image of any on-disk mode -> uint8 (H, W, 3); every image reader goes through this.

    * 16-bit grayscale (I;16, I;16B, I;16L; 32-bit I clipped to 0..65535): value v -> v >> 8 (its high byte,
      as Pillow itself decodes 16-bit RGB PNGs). `convert("RGB")` would clip every v > 255 to 255: all white.
    * transparency (RGBA, LA, PA, or P/L/RGB with a transparent colour) is composited on white, the
      usual background of cut-out product and icon images; the hidden colour of a transparent pixel is
      arbitrary (often black), so dropping alpha would show it.
    * grayscale / bilevel are replicated to 3 channels; palette, CMYK and YCbCr use Pillow's conversion.
    * 32-bit float (F) images have no fixed range and are refused (UnsupportedImageError naming `source`)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        v_HW = np.clip(np.asarray(im).astype(np.int64), 0, 65535)  # asarray honours the I;16B byte order
        return np.repeat((v_HW >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    if mode == "F":
        raise UnsupportedImageError(f"{source} is a 32-bit float image, whose value range is unknown; save it as an 8- or "
                         f"16-bit PNG")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba_HW4 = np.asarray(im.convert("RGBA"), dtype=np.int64)
        alpha_HW1 = rgba_HW4[..., 3:]
        # integer "over" onto white, rounded to nearest: opaque pixels stay exact, transparent ones become 255
        return ((rgba_HW4[..., :3] * alpha_HW1 + 255 * (255 - alpha_HW1) + 127) // 255).astype(np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_rgb_uint8(path: str | Path) -> np.ndarray:
    """Decode one image file fully (a truncated file fails here) -> uint8 (H, W, 3), see `to_rgb_uint8`.
    Raises PIL's/OSError's errors for unreadable files and ValueError for unsupported modes; callers wrap
    them into their own message naming the fix."""
    with Image.open(path) as im:
        im.load()
        return to_rgb_uint8(im, str(path))


def to_uint8_hwc(img_B3HW_01: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1] -> uint8 (B, H, W, 3) with round-to-nearest."""
    return img_B3HW_01.detach().float().clamp(0, 1).mul(255).add_(0.5).floor_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_image(img_B3HW_01: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    nrow = nrow or max(1, math.ceil(math.sqrt(img_B3HW_01.shape[0])))
    grid = make_grid(img_B3HW_01.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=padding, pad_value=1.0)
    return Image.fromarray(to_uint8_hwc(grid.unsqueeze(0))[0])


def save_png_atomic(image: Image.Image, path: str | Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def psnr(x_B3HW: torch.Tensor, y_B3HW: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,) float64: 10 log10(data_range^2 / MSE_b); identical images give +inf.
    The one PSNR of the toolkit (training logs, tokenizer metrics, model cards, benchmarks average it over images)."""
    mse_B = (x_B3HW.double() - y_B3HW.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse_B)

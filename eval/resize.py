"""The three ways FID pipelines bring images to Inception's 299x299 input, one per FID mode.

  * tf1_resize_bilinear: TensorFlow 1's `resize_bilinear(align_corners=False)` as the 2015 Inception graph
    runs it inside ADM's evaluator: source coordinate src = dst * in/out (no half-pixel centres, so the
    image is sampled from its top-left corner and the last rows/columns are clamped), float32 arithmetic
    in TF's order (lerp the two rows first, then between them). Mode "adm".
  * torch bilinear with half-pixel centres (F.interpolate, align_corners=False, no antialias): what
    pytorch-fid does. Mode "recompute".
  * clean_resize_bicubic: clean-fid's resize: PIL bicubic on each channel separately as a float ('F')
    image, clipped to [0, 255], never quantised. PIL filters with support scaled to the down-sampling
    factor, i.e. antialiased. Mode "clean".
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FID_MODES = ("adm", "recompute", "clean")
RESIZE_DESCRIPTIONS = {
    "adm": "tf1-bilinear-299 (TensorFlow 1 resize_bilinear, align_corners=False, no half-pixel centres)",
    "recompute": "torch-bilinear-299 (F.interpolate align_corners=False, half-pixel centres, no antialias)",
    "clean": "pil-bicubic-299 (clean-fid: PIL bicubic per channel on float images, antialiased, no quantisation)",
}


def _tf1_axis(in_size: int, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower / upper source index and the float32 interpolation weight of every output position."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale  # TF: in = out * scale, both float32
    lower = src.floor()
    upper = torch.minimum(src.ceil(), torch.tensor(in_size - 1, dtype=torch.float32))
    return lower.long().to(device), upper.long().to(device), (src - lower).to(device)


def tf1_resize_bilinear(x_BCHW: torch.Tensor, size: tuple[int, int] = (299, 299)) -> torch.Tensor:
    """TF1 resize_bilinear(align_corners=False, half_pixel_centers=False) of a float batch, in float32."""
    if x_BCHW.ndim != 4:
        raise ValueError(f"tf1_resize_bilinear expects (B, C, H, W), got {tuple(x_BCHW.shape)}")
    x = x_BCHW.float()
    (h, w), (out_h, out_w) = x.shape[-2:], size
    y_lo, y_hi, y_lerp = _tf1_axis(h, out_h, x.device)
    x_lo, x_hi, x_lerp = _tf1_axis(w, out_w, x.device)
    rows_lo, rows_hi = x.index_select(2, y_lo), x.index_select(2, y_hi)
    top_left, top_right = rows_lo.index_select(3, x_lo), rows_lo.index_select(3, x_hi)
    bottom_left, bottom_right = rows_hi.index_select(3, x_lo), rows_hi.index_select(3, x_hi)
    top = top_left + (top_right - top_left) * x_lerp
    bottom = bottom_left + (bottom_right - bottom_left) * x_lerp
    return top + (bottom - top) * y_lerp[:, None]


def torch_resize_bilinear(x_BCHW: torch.Tensor, size: tuple[int, int] = (299, 299)) -> torch.Tensor:
    return F.interpolate(x_BCHW.float(), size=size, mode="bilinear", align_corners=False)


def clean_resize_bicubic(x_BCHW_255: torch.Tensor, size: tuple[int, int] = (299, 299)) -> torch.Tensor:
    """clean-fid's resize of images in [0, 255] (any float values): PIL, so it runs on the CPU."""
    out_h, out_w = size
    arr = x_BCHW_255.detach().float().cpu().numpy()
    out = np.empty(arr.shape[:2] + (out_h, out_w), np.float32)
    for b in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            img = Image.fromarray(arr[b, c])  # float32 -> PIL mode "F"
            out[b, c] = np.asarray(img.resize((out_w, out_h), resample=Image.BICUBIC)).clip(0, 255)
    return torch.from_numpy(out).to(x_BCHW_255.device)


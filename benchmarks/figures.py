"""Picture figures of the shipped Fashion-MNIST models, written with a provenance JSON each (settings, sha256 of
the models and data files, of the PNG itself) that tests/test_figures_current.py checks.

  OMP_NUM_THREADS=1 python -m benchmarks.figures          # ~10 s on one CPU thread

editing.png: test-set images (one per class shown), the mask (white = regenerate) and the zero-shot edit by
  the 'edit' sampler with the image's own label: tokens outside the mask are teacher-forced at every scale.
coarse_to_fine.png: the tokenizer's reconstruction from the first 1..K scales (f_hat accumulated scale by
  scale, VQVAE.tokens_to_img(last_scale=k)); the header gives the PSNR vs the original over the rows shown.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from benchmarks.plot import ROOT, write_provenance
from benchmarks.plotting import load_font
from benchmarks.quality import mean_psnr
from samplers import build_sampler
from training.atomic import atomic_write
from training.checkpoint import load_any
from training.data import FASHION_MNIST_CLASSES, FashionMNIST

SHIPPED = ROOT / "checkpoints" / "fmnist"
DATA = Path("/usr/share/datasets/fashion-mnist")
OUT = ROOT / "benchmarks" / "results" / "figures"
ZOOM = 4  # 32 px images drawn at 128 px, nearest neighbour so tokens stay visible as blocks
RENDERER = f"PIL {Image.__version__}"
MASKS = ("centre", "bottom half", "right half", "top half")


def make_mask(kind: str, side: int) -> torch.Tensor:
    """(1, side, side) float, 1 = regenerate."""
    m = torch.zeros(1, side, side)
    q, h = side // 4, side // 2
    region = {"centre": (slice(q, side - q), slice(q, side - q)), "bottom half": (slice(h, None), slice(None)),
              "right half": (slice(None), slice(h, None)), "top half": (slice(None, h), slice(None))}[kind]
    m[(slice(None),) + region] = 1.0
    return m


def first_of_classes(ds: FashionMNIST, classes: list[int]) -> list[int]:
    """Index of the first test image of each class: a fixed, reproducible pick."""
    return [int(np.flatnonzero(ds.labels == c)[0]) for c in classes]


def to_tile(img_3HW: torch.Tensor) -> Image.Image:
    """[0, 1] (3, H, W) -> PIL, zoomed."""
    arr = (img_3HW.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    im = Image.fromarray(arr)
    return im.resize((im.width * ZOOM, im.height * ZOOM), Image.NEAREST)


def grid(rows: list[list[Image.Image]], headers: list[str], row_labels: list[str], title: str) -> Image.Image:
    font_, small = load_font(15), load_font(12)
    tile = rows[0][0].width
    gap, left, head = 8, 118, 64
    width = left + len(headers) * (tile + gap)
    sheet = Image.new("RGB", (width, head + len(rows) * (tile + gap) + 4), "white")
    d = ImageDraw.Draw(sheet)
    d.text((8, 6), title, fill="black", font=font_)
    for j, h in enumerate(headers):
        d.multiline_text((left + j * (tile + gap), 30), h, fill="black", font=small)
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = head + i * (tile + gap)
        d.multiline_text((8, y + tile // 2 - 16), label, fill="black", font=small)
        for j, im in enumerate(row):
            x = left + j * (tile + gap)
            sheet.paste(im, (x, y))
            d.rectangle((x - 1, y - 1, x + tile, y + tile), outline=(160, 160, 160))  # tiles stay apart from the page
    return sheet


def editing_figure(var, vae, ds: FashionMNIST, settings: dict) -> Image.Image:
    idx = first_of_classes(ds, settings["classes"])
    images = torch.stack([ds[i][0] for i in idx]).add(1).div(2)  # [0, 1]
    labels = torch.tensor([ds[i][1] for i in idx])
    side = vae.config.image_size
    masks = torch.stack([make_mask(k, side) for k in settings["masks"]])
    out = build_sampler("edit", var=var, vae=vae).edit(images, masks, labels, cfg=settings["cfg"],
                                                       top_k=settings["top_k"], seed=settings["seeds"])
    red = torch.tensor([1.0, 0.15, 0.15]).view(3, 1, 1)
    overlay = images * (1 - 0.6 * masks) + red * 0.6 * masks  # the region to regenerate, tinted red
    rows = [[to_tile(images[b]), to_tile(overlay[b]), to_tile(out.images[b])]
            for b in range(len(idx))]
    row_labels = [f"test #{i}\n{FASHION_MNIST_CLASSES[int(c)]}\nmask: {k}" for i, c, k in zip(idx, labels, settings["masks"])]
    settings["test_indices"] = idx
    return grid(rows, ["original", "mask\n(red = regenerate)", "edited (own label)"], row_labels,
                f"Zero-shot editing, 'edit' sampler, cfg {settings['cfg']}, top-k {settings['top_k']}")


def coarse_to_fine_figure(vae, ds: FashionMNIST, settings: dict) -> Image.Image:
    idx = first_of_classes(ds, settings["classes"])
    images = torch.stack([ds[i][0] for i in idx])  # [-1, 1], the tokenizer's range
    tokens = vae.img_to_tokens(images)
    views = [vae.tokens_to_img(tokens, last_scale=k).add(1).div(2) for k in range(len(vae.patch_nums))]
    originals = images.add(1).div(2)
    rows = [[to_tile(originals[b])] + [to_tile(v[b]) for v in views] for b in range(len(idx))]
    psnrs = [mean_psnr(v, originals) for v in views]
    headers = ["original"] + [f"scales 1..{k + 1}\n({pn}x{pn}) {p:.1f} dB"
                              for k, (pn, p) in enumerate(zip(vae.patch_nums, psnrs))]
    settings.update(test_indices=idx, psnr_db_per_scale=[round(p, 3) for p in psnrs])
    return grid(rows, headers, [f"test #{i}\n{FASHION_MNIST_CLASSES[ds[i][1]]}" for i in idx],
                "Tokenizer coarse to fine: reconstruction from the first k scales of f_hat")


def save(img: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), suffix=".png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", type=Path, default=SHIPPED / "tokenizer.safetensors")
    p.add_argument("--var", type=Path, default=SHIPPED / "var_drafter.safetensors")
    p.add_argument("--data", type=Path, default=DATA, help="Fashion-MNIST folder (idx files)")
    p.add_argument("--out-dir", type=Path, default=OUT)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=0)
    args = p.parse_args(argv)
    command = " ".join(["python -m benchmarks.figures"] + (argv if argv is not None else sys.argv[1:]))
    torch.manual_seed(0)
    var, vae = load_any(args.var, "var"), load_any(args.vae, "vqvae", patch_nums=None)
    ds = FashionMNIST(args.data, "test", image_size=vae.config.image_size)
    data_files = [ds._find(args.data, f"t10k-{k}-ubyte") for k in ("images-idx3", "labels-idx1")]
    common = {"torch": torch.__version__, "threads": torch.get_num_threads(), "data_split": "test"}
    with torch.no_grad():
        edit = {"classes": [0, 1, 7, 9], "masks": list(MASKS), "seeds": [11, 12, 13, 14], "cfg": args.cfg,
                "top_k": args.top_k, **common}
        png = save(editing_figure(var, vae, ds, edit), args.out_dir / "editing.png")
        write_provenance(png, [args.var, args.vae] + data_files, edit, command, renderer=RENDERER)
        print(f"wrote {png}")
        ctf = {"classes": [0, 3, 5, 8, 9], **common}
        png = save(coarse_to_fine_figure(vae, ds, ctf), args.out_dir / "coarse_to_fine.png")
        write_provenance(png, [args.vae] + data_files, ctf, command, renderer=RENDERER)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()

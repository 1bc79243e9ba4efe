"""Tokenizer reconstruction quality: PSNR, SSIM, codebook usage / perplexity per scale, rFID (and proxy rFD).

    python -m eval.tokenizer_metrics --tokenizer runs/tok/tokenizer.safetensors \
        --data /usr/share/datasets/fashion-mnist [--inception PATH] [--proxy-classifier PATH]

--data: a Fashion-MNIST folder (idx files, centre-padded to the tokenizer's resolution), an image folder or
an ADM .npz whose images already have the tokenizer's resolution. PSNR/SSIM are on [0, 1] images
(data range 1); SSIM uses the standard Gaussian window (11 taps, sigma 1.5, K1 = 0.01, K2 = 0.03, valid
region only), averaged over channels and pixels per image, then over images.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from eval.data import ArraySource, fashion_mnist_uint8, open_images
from eval.features import uint8_to_input
from eval.intervals import mean_ci
from training.images import psnr  # noqa: F401  (the one PSNR; re-exported for metric users)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    return g / g.sum()


def ssim(x_B3HW: torch.Tensor, y_B3HW: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), float64, separable Gaussian filter over the valid region."""
    if x_B3HW.shape != y_B3HW.shape or x_B3HW.ndim != 4:
        raise ValueError(f"SSIM needs two (B, C, H, W) batches of equal shape, got {tuple(x_B3HW.shape)} and {tuple(y_B3HW.shape)}")
    if min(x_B3HW.shape[-2:]) < win_size:
        raise ValueError(f"SSIM window {win_size} is larger than the {tuple(x_B3HW.shape[-2:])} images")
    c = x_B3HW.shape[1]
    g = gaussian_window(win_size, sigma).to(x_B3HW.device)
    g_row, g_col = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, g_row, groups=c), g_col, groups=c)

    x, y = x_B3HW.double(), y_B3HW.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s_map.flatten(1).mean(1)


def codebook_stats(counts_SV: np.ndarray) -> list[dict]:
    """Per scale: share of codes used at least once, and perplexity exp(H) of the empirical code distribution
    (= number of codes for a uniform distribution over them, 1 when a single code is used)."""
    out = []
    for counts in np.asarray(counts_SV, np.float64):
        p = counts / max(counts.sum(), 1.0)
        nz = p[p > 0]
        out.append({"usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
                    "tokens": int(counts.sum())})
    return out


@torch.inference_mode()
def reconstruct(vae, source, batch_size: int, device: torch.device):
    """Yield (originals in [0, 1], reconstructions in [0, 1], token maps) batch by batch."""
    for batch in source.batches(batch_size):
        x01 = uint8_to_input(batch, device)
        idx_per_scale = vae.img_to_tokens(x01 * 2 - 1)
        recon01 = (vae.tokens_to_img(idx_per_scale) + 1) / 2
        yield x01, recon01.clamp(0, 1), idx_per_scale


@torch.inference_mode()
def evaluate_tokenizer(vae, source, batch_size: int = 64, device: torch.device | str = "cpu",
                       feature_nets: dict | None = None) -> dict:
    """PSNR / SSIM / codebook statistics; Fréchet distance of reconstructions vs originals per feature network."""
    from eval.frechet import feature_stats, frechet_distance

    device = torch.device(device)
    size = vae.config.image_size
    if tuple(source.image_size) != (size, size):
        raise ValueError(f"{source.name}: images are {source.image_size[0]}x{source.image_size[1]} but the tokenizer "
                         f"works at {size}x{size}; resize the data or use a tokenizer built for this size")
    feature_nets = feature_nets or {}
    psnrs, ssims = [], []
    counts = np.zeros((len(vae.patch_nums), vae.vocab_size), np.int64)
    feats = {name: ([], []) for name in feature_nets}
    start = time.perf_counter()
    with tqdm(total=len(source), desc="tokenizer reconstruction", unit="img") as bar:
        for x01, r01, idx_per_scale in reconstruct(vae, source, batch_size, device):
            psnrs.append(psnr(r01, x01).cpu())
            ssims.append(ssim(r01, x01).cpu())
            for si, idx in enumerate(idx_per_scale):
                counts[si] += np.bincount(idx.flatten().cpu().numpy(), minlength=vae.vocab_size)
            for name, net in feature_nets.items():
                feats[name][0].append(net(x01)["pool"].float().cpu().numpy())
                feats[name][1].append(net(r01)["pool"].float().cpu().numpy())
            bar.update(len(x01))
    psnr_all = torch.cat(psnrs)
    finite = psnr_all[torch.isfinite(psnr_all)]
    report = {"num_images": len(source), "image_size": size,
              "psnr_db": float(finite.mean()) if len(finite) else float("inf"),
              "psnr_exact_images": int((~torch.isfinite(psnr_all)).sum()),
              "ssim": float(torch.cat(ssims).mean()),
              "codebook": [{"scale": si, "patch_num": pn, **s}
                           for si, (pn, s) in enumerate(zip(vae.patch_nums, codebook_stats(counts)))],
              "codebook_usage_all_scales": float((counts.sum(0) > 0).mean())}
    if len(finite) >= 2:  # exact reconstructions (PSNR = inf) are counted apart, as in psnr_db
        report["intervals"] = {"psnr_db": mean_ci(finite.numpy()), "ssim": mean_ci(torch.cat(ssims).numpy())}
    for name, (orig, recon) in feats.items():
        a, b = feature_stats(np.concatenate(orig), f"{name} originals"), feature_stats(np.concatenate(recon), f"{name} recon")
        report["rfid" if name == "inception" else f"{name}_rfd"] = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
        if getattr(feature_nets[name], "fid_mode", None):  # both sides through our network, in this input path
            net = feature_nets[name]
            report["rfid_protocol"] = {"fid_mode": net.fid_mode, "weights_sha256": net.weights_sha256,
                                       "resize": net.resize, "num_samples": len(source)}
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def main(argv: list[str] | None = None) -> int:
    from eval.fid import software_versions
    from eval.harness import pick_device
    from eval.proxy import write_json_atomic
    from training.checkpoint import load_any
    from training.errors import make_parser

    ap = make_parser(description=__doc__)
    ap.add_argument("--tokenizer", required=True, help="our .safetensors or the official vae_ch160v4096z32.pth")
    ap.add_argument("--data", required=True, help="Fashion-MNIST folder, image folder or ADM .npz")
    ap.add_argument("--split", default="test", choices=("train", "test"))
    ap.add_argument("--max-images", type=int, help="evaluate only the first N images")
    ap.add_argument("--pad-small", action=argparse.BooleanOptionalAction, default=True,
                    help="Fashion-MNIST layout the tokenizer was trained on: centre-padded (the 32 px models) or, "
                         "with --no-pad-small, upsampled with Lanczos (the 64 px v2 models, data.pad_small = false)")
    ap.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth: adds rFID")
    ap.add_argument("--proxy-classifier", help="adds the proxy rFD (Fréchet distance in the classifier's features)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", help="JSON report (default: <tokenizer>_recon_metrics.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    vae = load_any(args.tokenizer, kind="vqvae", device=device)
    size = vae.config.image_size
    data = Path(args.data)
    if data.is_dir() and any(data.glob("*-images-idx3-ubyte*")):
        images, labels, _ = fashion_mnist_uint8(data, args.split, size, args.pad_small)
        source = ArraySource(images, f"fashion-mnist {args.split}", labels)
    else:
        source = open_images(data)
    if args.max_images:
        source = ArraySource(np.concatenate(list(source.batches(1000)))[:args.max_images], source.name)
    nets = {}
    if args.inception:
        from eval.inception import InceptionFeatures

        nets["inception"] = InceptionFeatures.from_file(args.inception, device)
    if args.proxy_classifier:
        from eval.proxy import load_classifier

        nets["proxy"] = load_classifier(args.proxy_classifier, device)
    report = evaluate_tokenizer(vae, source, args.batch_size, device, nets)
    report.update(tokenizer=args.tokenizer, data=str(data), settings=vars(args), software=software_versions(),
                  networks={n: getattr(net, "weights_sha256", None) for n, net in nets.items()})
    out = Path(args.out) if args.out else Path(args.tokenizer).with_name(Path(args.tokenizer).stem + "_recon_metrics.json")
    write_json_atomic(out, report)
    print(f"PSNR {report['psnr_db']:.3f} dB  SSIM {report['ssim']:.4f}  codebook usage (all scales) "
          f"{report['codebook_usage_all_scales']:.3f}" + "".join(f"  {k} {report[k]:.4f}" for k in report if k.endswith(("rfid", "_rfd"))))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from training.errors import run_cli

    sys.exit(run_cli(main))

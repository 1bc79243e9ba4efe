"""Compute and save reference statistics (mu/sigma, spatial mu_s/sigma_s, raw pool features) for one network.

    # Inception statistics of real images (folder of PNG/JPEG, or an ADM .npz with arr_0)
    python -m eval.ref_stats --images data/real_256/ --inception pt_inception-2015-12-05-6726825d.pth \
        [--fid-mode adm|recompute|clean] --out ref.npz
    # proxy statistics of the Fashion-MNIST test set
    python -m eval.ref_stats --fashion-mnist /usr/share/datasets/fashion-mnist \
        --proxy-classifier eval/weights/fmnist_classifier.safetensors --out benchmarks/results/fmnist_test_proxy.npz

The file records the network, its weights' sha256, the source and a content hash (printed at the end),
which eval reports and cards quote to identify the reference exactly.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from eval.data import ArraySource, fashion_mnist_uint8, open_images, save_ref_stats
from eval.features import extract_features
from eval.harness import network_info, pick_device, stats_from_features
from eval.resize import FID_MODES


def main(argv: list[str] | None = None) -> int:
    from training.errors import make_parser

    ap = make_parser(description=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of PNG/JPEG or ADM .npz (arr_0 uint8 NHWC)")
    src.add_argument("--fashion-mnist", help="Fashion-MNIST folder (idx files)")
    ap.add_argument("--split", default="test", choices=("train", "test"), help="Fashion-MNIST split")
    ap.add_argument("--image-size", type=int,
                    help="Fashion-MNIST image size (default: the size the proxy classifier's real images are rendered "
                         "at, its data_size, else 32)")
    ap.add_argument("--pad-small", action=argparse.BooleanOptionalAction, default=None,
                    help="Fashion-MNIST layout: centre-padded, or with --no-pad-small upsampled with Lanczos "
                         "(default: the proxy classifier's own layout, else padded)")
    net_group = ap.add_mutually_exclusive_group(required=True)
    net_group.add_argument("--inception", help="local path of pt_inception-2015-12-05-6726825d.pth")
    net_group.add_argument("--proxy-classifier", help="proxy classifier .safetensors")
    ap.add_argument("--fid-mode", choices=FID_MODES, default="recompute",
                    help="Inception input path (see `python -m eval.fid --help`); recorded in the file, and "
                         "eval.fid refuses to compare it with samples evaluated in another mode")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--no-features", action="store_true",
                    help="store only mu/sigma (smaller; KID and precision/recall then need the images)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--device")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.inception:
        from eval.inception import InceptionFeatures

        net = InceptionFeatures.from_file(args.inception, device, mode=args.fid_mode)
    else:
        from eval.proxy import load_classifier

        net = load_classifier(args.proxy_classifier, device)
    if args.fashion_mnist:
        # the layout the proxy's reference uses everywhere else (eval.harness / eval.real_reference)
        proxy_cfg = getattr(net, "config", None)
        size = args.image_size or getattr(proxy_cfg, "real_image_size", None) or 32
        pad_small = args.pad_small if args.pad_small is not None else getattr(proxy_cfg, "pad_small", True)
        images, labels, _ = fashion_mnist_uint8(args.fashion_mnist, args.split, size, pad_small)
        source, origin = ArraySource(images, labels=labels), {"fashion_mnist": args.fashion_mnist, "split": args.split,
                                                              "image_size": size, "pad_small": pad_small}
    else:
        source, origin = open_images(args.images), {"images": args.images}
    start = time.perf_counter()
    feats = extract_features(net, source, args.batch_size, device, desc=f"reference features ({net.name})")
    arrays = stats_from_features(feats, "reference")
    if not args.no_features:
        arrays["pool"] = feats["pool"].astype(np.float32)
    meta = {"network": network_info(net), "source": origin, "num_images": len(source),
            **({"fid_mode": net.fid_mode} if getattr(net, "fid_mode", None) else {}),
            "image_size": list(source.image_size), "seconds": round(time.perf_counter() - start, 2)}
    content_hash = save_ref_stats(args.out, arrays, meta)
    mode = f", FID mode {net.fid_mode}" if getattr(net, "fid_mode", None) else ""
    print(f"wrote {args.out}: {len(source)} images, {net.name}{mode}, pool dim {arrays['mu'].shape[0]}, "
          f"content sha256 {content_hash}")
    return 0


if __name__ == "__main__":
    from training.errors import run_cli

    sys.exit(run_cli(main))

"""What real images score with a proxy classifier: the yardstick for the proxy numbers of generated samples.

    python -m eval.real_reference --proxy-classifier eval/weights/fmnist64_classifier.safetensors \
        --out checkpoints/fmnist64/proxy_reference.json

Scores, against the real test set (the reference every eval card uses), N class-balanced real training images
as they are, and the same images blurred by a factor f (downsampled f x with box averaging, upsampled back with
bilinear interpolation): the proxy FD of a perfect generator (N real images; not 0, because N is finite) and of
one that loses detail. Same metrics and 95 % intervals as `sample.py --eval-card`.

`--tokenizer PATH` also scores the tokenizer's reconstructions of those images (decoded from their tokens):
the best a VAR on that tokenizer can reach, whatever its size and training.

`--padded-samples NAME=samples.npz` also scores samples made in the 32 px layout (28 x 28 centred on a padded
canvas; `sample.py` writes samples.npz) after moving them to the classifier's layout: the 28 x 28 content cropped,
then upsampled as the real images are. This puts the 32 px models on the same yardstick as the 64 px ones.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from eval.data import ArraySource, fashion_mnist_uint8
from eval.harness import evaluate, fashion_mnist_reference
from eval.proxy import load_classifier
from training.transforms import VARTransform
from training.atomic import atomic_write_json
from training.checkpoint import load_model
from training.errors import make_parser, run_cli


def class_balanced(labels_N: np.ndarray, count: int) -> np.ndarray:
    """Indices of the first count / K images of every class, in class order (count must divide evenly)."""
    classes = np.unique(labels_N)
    if count % len(classes):
        raise ValueError(f"--count {count} is not a multiple of the {len(classes)} classes")
    return np.concatenate([np.flatnonzero(labels_N == c)[: count // len(classes)] for c in classes])


def blurred(images_NHWC: np.ndarray, factor: int) -> np.ndarray:
    """Detail removed at `factor`: box-average down, bilinear up, back to uint8."""
    if factor <= 1:
        return images_NHWC
    x_NCHW = torch.from_numpy(images_NHWC).permute(0, 3, 1, 2).float()
    small = F.avg_pool2d(x_NCHW, factor)
    up = F.interpolate(small, size=x_NCHW.shape[-2:], mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def from_padded_layout(images_NHWC: np.ndarray, content: int, size: int) -> np.ndarray:
    """Samples of the padded layout (content x content centred) in the upsampled layout of `size` px."""
    h, w = images_NHWC.shape[1:3]
    if content < 1:
        raise ValueError(f"the padded layout's content side must be >= 1, got {content}")
    if h < content or w < content:
        raise ValueError(f"samples of {h}x{w} px cannot hold the {content}x{content} content of the padded layout")
    top, left = (h - content) // 2, (w - content) // 2
    resize = VARTransform(size, pad_small=False).resize
    return np.stack([resize(img[top:top + content, left:left + content]) for img in images_NHWC])


@torch.no_grad()
def reconstructed(images_NHWC: np.ndarray, tokenizer_path: str, batch_size: int = 100) -> np.ndarray:
    """The images decoded from their own tokens (uint8 in, uint8 out; the tokenizer works in [-1, 1])."""
    vae = load_model(tokenizer_path, "vqvae").eval()
    size = vae.config.image_size
    if images_NHWC.shape[1:3] != (size, size):
        raise ValueError(f"the tokenizer {tokenizer_path} takes {size} px images, the classifier's layout is "
                         f"{images_NHWC.shape[1]} px; pass the tokenizer of the models this classifier scores")
    out = []
    for start in range(0, len(images_NHWC), batch_size):
        x_B3HW = torch.from_numpy(images_NHWC[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        recon_01 = vae.tokens_to_img(vae.img_to_tokens(x_B3HW)).add(1).div(2)
        # uint8 as the samplers write their images
        out.append(recon_01.mul(255).add(0.5).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def load_npz_samples(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        if "arr_0" not in npz or "arr_1" not in npz:
            raise ValueError(f"{path} needs arr_0 (uint8 NHWC images) and arr_1 (labels), as sample.py writes")
        return npz["arr_0"], npz["arr_1"]


def score(net, reference, images_NHWC: np.ndarray, labels_N: np.ndarray, name: str, bootstrap: int, seed: int) -> dict:
    source = ArraySource(images_NHWC, name, labels_N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank deficiency is expected and stated for small counts
        report = evaluate(net, source, reference, prefix="proxy_", labels=labels_N, compute_is=False,
                          kid_subset_size=min(1000, len(images_NHWC)), bootstrap=bootstrap, ci_seed=seed)
    metrics = {k: report["metrics"][k] for k in ("proxy_fd", "proxy_accuracy", "proxy_precision", "proxy_recall")}
    intervals = {k: [v["low"], v["high"]] for k, v in report.get("intervals", {}).items() if k in metrics}
    return {"images": len(images_NHWC), **metrics, "intervals": intervals}


def main(argv: list[str] | None = None) -> dict:
    p = make_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxy-classifier", required=True)
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--count", type=int, default=1000, help="real training images (class-balanced), as eval cards")
    p.add_argument("--blur", default="2,4", help="comma-separated blur factors")
    p.add_argument("--tokenizer", default="", help="also score this tokenizer's reconstructions of the real images")
    p.add_argument("--padded-samples", action="append", default=[], metavar="NAME=NPZ",
                   help="samples of the 32 px padded layout to score in the classifier's layout")
    p.add_argument("--padded-content", type=int, default=28,
                   help="side of the content centred in --padded-samples (the dataset's own images: 28 for Fashion-MNIST)")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.padded_content < 1:
        raise ValueError(f"--padded-content must be >= 1, got {args.padded_content}")
    factors = [int(f) for f in args.blur.split(",") if f.strip()]
    net = load_classifier(args.proxy_classifier)
    cfg = net.config
    size, pad_small = cfg.real_image_size, cfg.pad_small
    images, labels, _ = fashion_mnist_uint8(args.data_root, "train", size, pad_small=pad_small)
    keep = class_balanced(labels, args.count)
    images, labels = images[keep], labels[keep]
    if any(size % f for f in factors):
        raise ValueError(f"--blur factors {factors} must divide the image size {size}")
    reference = fashion_mnist_reference(args.data_root, net)
    rows = {"real": score(net, reference, images, labels, "real training images", args.bootstrap, args.seed)}
    for f in factors:
        rows[f"blur{f}"] = score(net, reference, blurred(images, f), labels, f"blurred {f}x", args.bootstrap, args.seed)
    if args.tokenizer:
        rows["reconstructed"] = {**score(net, reference, reconstructed(images, args.tokenizer), labels,
                                         "tokenizer reconstructions", args.bootstrap, args.seed),
                                 "tokenizer": args.tokenizer}
    for item in args.padded_samples:
        name, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--padded-samples expects NAME=PATH.npz, got {item!r}")
        samples, sample_labels = load_npz_samples(path)
        moved = from_padded_layout(samples, content=args.padded_content, size=size)
        rows[name] = {**score(net, reference, moved, sample_labels, name, args.bootstrap, args.seed), "samples": path}
    result = {"proxy_classifier": args.proxy_classifier, "image_size": size, "pad_small": pad_small,
              "reference": "Fashion-MNIST test set", "count": args.count, "rows": rows}
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))

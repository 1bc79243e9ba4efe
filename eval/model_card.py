"""Reproducible numbers for shipped models: tokenizer reconstruction and codebook use, VAR per-scale token
accuracy, and a class-grid PNG from the default sampler, written to one model-card JSON.

  python -m eval.model_card --tokenizer checkpoints/fmnist/tokenizer.safetensors \
      --var drafter=checkpoints/fmnist/var_drafter.safetensors --var refiner=checkpoints/fmnist/var_refiner.safetensors \
      --data-root /usr/share/datasets/fashion-mnist --split test \
      --log tokenizer=checkpoints/fmnist/logs/tokenizer.jsonl --log drafter=... --log refiner=... \
      --samples checkpoints/fmnist/samples.png --out checkpoints/fmnist/model_card.json

Definitions (all on the whole split, images as the models see them: 32x32, [-1, 1] mapped to [0, 1]):
* PSNR: per image 10 log10(1 / MSE) of the clamped reconstruction decoded from the tokens, then averaged.
* codebook usage at a scale: fraction of the vocabulary used at least once at that scale; "any scale": used
  at least once anywhere. Perplexity: exp of the entropy of the scale's code histogram.
* VAR token accuracy at a scale: teacher-forced argmax == tokenizer token (true class label, no condition
  dropout, eval mode); also the cross-entropy per scale.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from eval.data import fashion_mnist_uint8
from samplers.default import DefaultSampler
from training.atomic import atomic_write_json, file_sha256
from training.checkpoint import load_model, read_metadata
from training.images import grid_image, psnr, save_png_atomic


class RealImages:
    """A Fashion-MNIST split laid out as the tokenizer saw it in training: (image in [-1, 1], label) pairs."""

    def __init__(self, root: str, split: str, image_size: int, pad_small: bool = True, limit: int = 0):
        images_NHWC, labels, _ = fashion_mnist_uint8(root, split, image_size, pad_small)
        if limit:
            images_NHWC, labels = images_NHWC[:limit], labels[:limit]
        self.images_NCHW = rearrange(torch.from_numpy(images_NHWC), "n h w c -> n c h w")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images_NCHW[i].float().div(127.5).sub(1), int(self.labels[i])


@torch.no_grad()
def tokenizer_metrics(vae, dataset, batch_size: int = 250):
    """Reconstruction and codebook statistics; also returns every image's tokens (B, L) and labels."""
    V, S = vae.vocab_size, len(vae.patch_nums)
    hits_SV = torch.zeros(S, V, dtype=torch.long)
    psnr_sum, mse_sum, n = 0.0, 0.0, 0
    tokens, labels = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="tokenizer eval"):
        imgs, labs = zip(*(dataset[i] for i in range(start, min(start + batch_size, len(dataset)))))
        img = torch.stack(imgs)
        idx = vae.img_to_tokens(img)
        recon = vae.tokens_to_img(idx)
        mse_B = (recon.add(1).div(2) - img.add(1).div(2)).square().flatten(1).mean(1)
        psnr_sum += float(psnr(recon.add(1).div(2), img.add(1).div(2)).sum())
        mse_sum += float(mse_B.sum())
        n += len(img)
        for si, idx_Bl in enumerate(idx):
            hits_SV[si] += idx_Bl.flatten().bincount(minlength=V).cpu()
        tokens.append(torch.cat(idx, dim=1).cpu())
        labels.append(torch.tensor(labs))
    p_SV = hits_SV.double() / hits_SV.sum(1, keepdim=True)
    perplexity = torch.exp(-(p_SV * p_SV.clamp_min(1e-30).log()).sum(1))
    stats = {"num_images": n, "psnr_db": psnr_sum / n, "mse_01": mse_sum / n,
             "codebook_usage_per_scale": [round(float(u), 4) for u in (hits_SV > 0).float().mean(1)],
             "codebook_usage_any_scale": float((hits_SV.sum(0) > 0).float().mean()),
             "perplexity_per_scale": [round(float(p), 2) for p in perplexity], "vocab_size": V,
             "patch_nums": list(vae.patch_nums)}
    return stats, torch.cat(tokens), torch.cat(labels)


@torch.no_grad()
def var_metrics(var, vae, tokens_BL: torch.Tensor, labels_B: torch.Tensor, batch_size: int = 250) -> dict:
    var.eval()
    sizes = [p * p for p in vae.patch_nums]
    correct, nll = torch.zeros(len(sizes)), torch.zeros(len(sizes))
    for start in tqdm(range(0, len(tokens_BL), batch_size), desc="var eval"):
        flat = tokens_BL[start: start + batch_size]
        x_tf = vae.teacher_forcing_input(list(flat.split(sizes, dim=1)))
        logits_BLV = var(labels_B[start: start + batch_size], x_tf)
        ce_BL = F.cross_entropy(logits_BLV.transpose(1, 2), flat, reduction="none")
        hit_BL = (logits_BLV.argmax(-1) == flat).float()
        for si, (h, c) in enumerate(zip(hit_BL.split(sizes, 1), ce_BL.split(sizes, 1))):
            correct[si] += h.sum()
            nll[si] += c.sum()
    counts = torch.tensor([s * len(tokens_BL) for s in sizes], dtype=torch.float)
    return {"token_accuracy_per_scale": [round(float(a), 4) for a in correct / counts],
            "token_accuracy_all": float(correct.sum() / counts.sum()),
            "cross_entropy_per_scale": [round(float(c), 4) for c in nll / counts],
            "cross_entropy_all": float(nll.sum() / counts.sum()),
            "num_params": sum(p.numel() for p in var.parameters()),
            "config": {k: getattr(var.config, k) for k in ("depth", "embed_dim", "num_heads", "num_classes")}}


def training_summary(log_path: str) -> dict:
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    last = records[-1]
    keep = {k: v for k, v in last.items() if k in ("step", "epoch", "loss", "wall_s", "psnr") or k.startswith("acc_s")}
    return {"log": str(log_path), "final": keep}


@torch.no_grad()
def sample_grid(var, vae, path: str, per_class: int, cfg: float, seed: int, top_k: int) -> dict:
    labels = torch.arange(min(var.num_classes, 10)).repeat_interleave(per_class)
    out = DefaultSampler(var.eval(), vae).sample(labels, cfg=cfg, top_k=top_k, seed=seed)
    save_png_atomic(grid_image(out.images, nrow=per_class), path)
    return {"png": str(path), "sampler": "default", "cfg": cfg, "top_k": top_k, "seed": seed, "rows": "one per class",
            "per_class": per_class, "wall_s": round(out.stats.wall_time_s, 3)}


def named_paths(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--{what} expects name=path, got {item!r}")
        name, path = item.split("=", 1)
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> dict:
    from training.errors import make_parser

    parser = make_parser(description=__doc__)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--var", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--log", action="append", default=[], metavar="NAME=PATH", help="training JSONL per model")
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-size", type=int, default=0, help="0: the tokenizer's image size")
    parser.add_argument("--pad-small", action=argparse.BooleanOptionalAction, default=True,
                        help="the tokenizer's data layout: 28x28 centre-padded (the 32 px models) or, with "
                             "--no-pad-small, upsampled with Lanczos (the 64 px v2 models, data.pad_small = false)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N images only (0: all)")
    parser.add_argument("--var-limit", type=int, default=0,
                        help="teacher-forced VAR metrics on the first N of those images only (0: all of them); a "
                             "forward pass over L tokens per image costs far more than the tokenizer's")
    parser.add_argument("--samples", default="", help="PNG class grid from the first --var model")
    parser.add_argument("--samples-extra", default="", help="folder for one grid per other --var model")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.var_limit < 0:
        raise ValueError(f"--var-limit must be >= 0, got {args.var_limit}")
    if args.threads:
        torch.set_num_threads(args.threads)
    vae = load_model(args.tokenizer, "vqvae").eval()
    dataset = RealImages(args.data_root, args.split, args.image_size or vae.config.image_size, args.pad_small, args.limit)
    tok_stats, tokens, labels = tokenizer_metrics(vae, dataset)
    logs = named_paths(args.log, "log")
    # "tokenizer" and "var" hold what benchmarks/readme_tables.py renders into the README; the rest is provenance
    card = {"dataset": {"name": "Fashion-MNIST", "split": args.split, "root": args.data_root, "images": len(dataset),
                        "classes": read_metadata(args.tokenizer)["extra"].get("classes", [])},
            "tokenizer": {"file": args.tokenizer, "bytes": Path(args.tokenizer).stat().st_size, **tok_stats},
            "var": {}, "training": {name: training_summary(path) for name, path in logs.items()},
            "sha256": {"tokenizer": file_sha256(args.tokenizer)},
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads()}}
    var_images = min(args.var_limit or len(tokens), len(tokens))
    card["dataset"]["var_images"] = var_images
    for i, (name, path) in enumerate(named_paths(args.var, "var").items()):
        var = load_model(path, "var").eval()
        entry = {"file": path, "bytes": Path(path).stat().st_size,
                 **var_metrics(var, vae, tokens[:var_images], labels[:var_images])}
        card["sha256"][name] = file_sha256(path)
        png = args.samples if i == 0 else (str(Path(args.samples_extra) / f"samples_{name}.png") if args.samples_extra else "")
        if png:
            entry["samples"] = sample_grid(var, vae, png, args.per_class, args.cfg, args.seed, args.top_k)
        # filled in by the evaluation issue's classifier-based score
        entry["sample_quality"] = {"classifier_accuracy": None, "fid": None, "note": "not measured yet"}
        card["var"][name] = entry
    atomic_write_json(args.out, card)
    print(json.dumps(card, indent=2))
    return card


if __name__ == "__main__":
    import sys

    from training.errors import run_cli

    sys.exit(run_cli(main))

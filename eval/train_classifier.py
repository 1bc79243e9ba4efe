"""Train the offline proxy classifier on real Fashion-MNIST.

    python -m eval.train_classifier --data /usr/share/datasets/fashion-mnist \
        --out eval/weights/fmnist_classifier.safetensors

CPU-friendly (a few minutes on one thread). Writes the safetensors file, its JSON twin (config, test
accuracy, settings) and a JSONL log next to it. Exits non-zero if the test accuracy misses --min-accuracy,
so a bad classifier is never shipped silently.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from eval.data import fashion_mnist_uint8
from eval.proxy import ClassifierConfig, ProxyClassifier, save_classifier


def fashion_mnist_01(root: str | Path, split: str, image_size: int, pad_small: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of a split as (N, 3, S, S) float in [0, 1] (the FeatureNetwork input convention)."""
    images_NHWC, labels, classes = fashion_mnist_uint8(root, split, image_size, pad_small)
    return rearrange(torch.from_numpy(images_NHWC), "n h w c -> n c h w").float().div_(255), torch.from_numpy(labels), classes


def random_shift(img_B3HW: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (background fill): cheap, label-preserving augmentation."""
    if max_shift == 0:
        return img_B3HW
    s = img_B3HW.shape[-1]
    padded = F.pad(img_B3HW, (max_shift,) * 4, value=0.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, img_B3HW.shape[0]), generator=gen).tolist()
    return torch.stack([padded[i, :, y:y + s, x:x + s] for i, (y, x) in enumerate(zip(dy, dx))])


@torch.no_grad()
def accuracy(model: ProxyClassifier, img_N3HW: torch.Tensor, labels_N: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels_N), batch_size):
        correct += (model(img_N3HW[i:i + batch_size])["logits"].argmax(1) == labels_N[i:i + batch_size]).sum().item()
    return correct / len(labels_N)


def main(argv: list[str] | None = None) -> int:
    from training.errors import make_parser

    ap = make_parser(description=__doc__)
    ap.add_argument("--data", required=True, help="folder with the Fashion-MNIST idx files")
    ap.add_argument("--out", default="eval/weights/fmnist_classifier.safetensors")
    ap.add_argument("--image-size", type=int, default=32, help="the tokenizer's resolution (32 for the shipped models)")
    ap.add_argument("--data-size", type=int, default=0,
                    help="resolution the real images are rendered at, the models' (0: --image-size; 64 for the v2 models)")
    ap.add_argument("--pad-small", action=argparse.BooleanOptionalAction, default=True,
                    help="centre-pad the 28x28 images (the 32 px models) or, with --no-pad-small, upsample them "
                         "with Lanczos (the v2 models' data.pad_small = false)")
    ap.add_argument("--widths", default="32,64,128")
    ap.add_argument("--convs-per-stage", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-shift", type=int, default=2, help="pixels at the rendered resolution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-accuracy", type=float, default=0.90)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = ClassifierConfig(num_classes=10, image_size=args.image_size, pad_small=args.pad_small, data_size=args.data_size)
    train_x, train_y, classes = fashion_mnist_01(args.data, "train", config.real_image_size, args.pad_small)
    test_x, test_y, _ = fashion_mnist_01(args.data, "test", config.real_image_size, args.pad_small)
    config = ClassifierConfig(num_classes=len(classes), image_size=args.image_size, pad_small=args.pad_small,
                              data_size=args.data_size,
                              widths=tuple(int(w) for w in args.widths.split(",")),
                              convs_per_stage=args.convs_per_stage, class_names=classes)
    model = ProxyClassifier(config)
    steps_per_epoch = math.ceil(len(train_y) / args.batch_size)
    total = args.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log.jsonl")
    start = time.time()
    with open(log_path, "w", buffering=1) as log, tqdm(total=total, desc="train proxy classifier") as bar:
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(len(train_y), generator=gen)
            for step in range(steps_per_epoch):
                idx = order[step * args.batch_size:(step + 1) * args.batch_size]
                logits = model(random_shift(train_x[idx], args.max_shift, gen))["logits"]
                loss = F.cross_entropy(logits, train_y[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                    log.write(json.dumps({"epoch": epoch, "step": step, "loss": loss.item(),
                                          "lr": sched.get_last_lr()[0], "time_s": time.time() - start}) + "\n")
            test_acc = accuracy(model, test_x, test_y)
            log.write(json.dumps({"epoch": epoch, "test_accuracy": test_acc, "time_s": time.time() - start}) + "\n")
            log.flush()
            tqdm.write(f"epoch {epoch}: test accuracy {test_acc:.4f}")
    record = {"test_accuracy": test_acc, "train_seconds": round(time.time() - start, 1),
              "command": "python -m eval.train_classifier " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "torch": torch.__version__, "dataset": "Fashion-MNIST (train 60k / test 10k)"}
    save_classifier(out, model, record)
    print(f"saved {out} (test accuracy {test_acc:.4f})")
    if test_acc < args.min_accuracy:
        print(f"test accuracy {test_acc:.4f} is below --min-accuracy {args.min_accuracy}; train longer "
              f"(--epochs) or with wider stages (--widths)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from training.errors import run_cli

    sys.exit(run_cli(main))

"""Generate class-conditional samples with any registered sampler; FID-ready, resumable, distributed.

  python sample.py                                   # shipped Fashion-MNIST models, 4 per class, grid + npz
  python sample.py --classes 0,3 --per-class 8 --cfg 2 --top-k 100 --out samples/demo
  python sample.py --vae vae_ch160v4096z32.pth --var var_d16.pth --all-classes --per-class 50 \
      --cfg 1.5 --top-k 900 --top-p 0.96 --out samples/d16_50k          # the official FID protocol
  python sample.py --sampler code --model refiner=checkpoints/fmnist/var_refiner.safetensors \
      --sampler-arg draft_scales=3
  accelerate launch --num_processes 8 sample.py ...  # any number of processes; the same images come out

Image i (global index; labels run class-major) is drawn with its own generator seeded from
(--seed, i), so it is identical whatever the batch size or the number of processes. Existing PNGs are
skipped, so an interrupted run resumes where it stopped; files are written atomically.
Output: DIR/images/{i:06d}.png, DIR/samples.npz (ADM format: arr_0 uint8 NHWC, plus labels), DIR/grid.png,
DIR/sample_config.json (every setting + software versions) and DIR/stats.jsonl (sampler counters per batch).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from samplers import available_samplers, build_sampler, sampler_class
from samplers.cli import SHIPPED, load_models, models_for, parse_sampler_args
from training.atomic import atomic_write, atomic_write_json
from training.checkpoint import read_metadata

REPO = Path(__file__).resolve().parent
SEED_STRIDE = 2**32  # seeds of different base seeds never collide for fewer than 2**32 images


def image_seed(base_seed: int, index: int) -> int:
    return base_seed * SEED_STRIDE + index


# ---- arguments ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("models")
    m.add_argument("--vae", default=str(SHIPPED / "tokenizer.safetensors"),
                   help="tokenizer: ours (.safetensors) or the official vae_ch160v4096z32.pth")
    m.add_argument("--var", default=str(SHIPPED / "var_drafter.safetensors"),
                   help="VAR transformer: ours (.safetensors) or an official var_d*.pth")
    m.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="extra model a sampler needs (e.g. refiner=...); see --list-samplers")
    s = p.add_argument_group("sampler")
    s.add_argument("--sampler", default="default", help="registered sampler name")
    s.add_argument("--sampler-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="sampler option, repeatable (typed by the sampler's `options`)")
    s.add_argument("--list-samplers", action="store_true", help="print samplers with their options and exit")
    s.add_argument("--cfg", type=float, default=1.5, help="guidance strength, ramped linearly over scales")
    s.add_argument("--top-k", type=int, default=0, help="0 disables")
    s.add_argument("--top-p", type=float, default=0.0, help="0 disables")
    s.add_argument("--temperature", type=str, default="1.0",
                   help="one value, or comma-separated values, one per scale")
    s.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax code mixing (visualisation only)")
    w = p.add_argument_group("what to generate")
    w.add_argument("--classes", type=str, default=None, help="comma-separated class ids (default: all classes)")
    w.add_argument("--all-classes", action="store_true", help="every class (the default when --classes is absent)")
    w.add_argument("--per-class", type=int, default=4, help="images per class")
    w.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed*2**32 + i")
    w.add_argument("--batch-size", type=int, default=16, help="images per forward (per process)")
    w.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    e = p.add_argument_group("zero-shot editing (uses the 'edit' sampler)")
    e.add_argument("--edit-image", default=None, help="image to edit (PNG/JPEG at the tokenizer's resolution)")
    e.add_argument("--edit-mask", default=None, help="mask image of the same size: white = regenerate, black = keep")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="samples/demo", help="output folder (reused to resume)")
    o.add_argument("--no-npz", action="store_true", help="skip the ADM-format samples.npz")
    v = p.add_argument_group("evaluation card (sample + evaluate in one command)")
    v.add_argument("--eval-card", action="store_true",
                   help="after sampling, evaluate samples.npz and write DIR/eval_card.{json,md}")
    v.add_argument("--proxy-classifier", default=None,
                   help="proxy classifier for the card (e.g. eval/weights/fmnist_classifier.safetensors)")
    v.add_argument("--inception", default=None, help="local pt_inception-2015-12-05 weights for FID/sFID/IS/P/R/KID")
    v.add_argument("--ref", default=None, help="reference statistics or ADM reference batch (.npz) for FID")
    o.add_argument("--grid-max", type=int, default=100, help="at most this many images in grid.png (0: none)")
    return p


def parse_temperature(text: str, num_scales: int):
    values = [float(v) for v in text.split(",")]
    if len(values) == 1:
        return values[0]
    if len(values) != num_scales:
        raise ValueError(f"--temperature needs 1 or {num_scales} (one per scale) values, got {len(values)}")
    return values


def load_edit_inputs(args, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, H, W) image in [0, 1] and (1, 1, H, W) mask in [0, 1] from --edit-image/--edit-mask."""
    if not (args.edit_image and args.edit_mask):
        raise ValueError("editing needs both --edit-image and --edit-mask")
    tensors = []
    for path, mode in ((args.edit_image, "RGB"), (args.edit_mask, "L")):
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {path} ({err}); give a PNG or JPEG file") from err
        if array.shape[:2] != (side, side):
            raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]}, the tokenizer needs {side}x{side}; resize it first")
        t = torch.from_numpy(array)
        tensors.append((t.permute(2, 0, 1) if t.ndim == 3 else t[None])[None].to(device))
    return tensors[0], tensors[1]


def class_names(path: str) -> list[str]:
    try:
        return read_metadata(path)["extra"].get("classes", [])
    except Exception:  # official .pth files carry no label map
        return []


# ---- output files ----------------------------------------------------------------------------------------
def to_uint8(images_B3HW: torch.Tensor) -> np.ndarray:
    """[0, 1] floats -> uint8 NHWC with round-to-nearest (as ADM's and torchvision's writers)."""
    return images_B3HW.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(path: Path, array_HWC: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array_HWC).save(tmp, format="PNG"))


def read_pngs(folder: Path, count: int) -> np.ndarray:
    arrays = []
    for i in range(count):
        path = folder / f"{i:06d}.png"
        try:
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        except (OSError, ValueError) as err:
            raise RuntimeError(f"sample {path} is unreadable ({err}); delete it and rerun to regenerate it") from err
    return np.stack(arrays)


def make_grid(arrays_NHWC: np.ndarray, nrow: int) -> np.ndarray:
    n, h, w, c = arrays_NHWC.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 2) + 2, nrow * (w + 2) + 2, c), 255, dtype=np.uint8)
    for i, a in enumerate(arrays_NHWC):
        r, col = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = a
    return grid


def software_versions() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import accelerate
    return {"git_commit": commit, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "numpy": np.__version__}


# ---- the run ---------------------------------------------------------------------------------------------
def plan(args, num_classes: int) -> list[int]:
    """Label of every global image index (class-major)."""
    if args.classes:
        classes = [int(c) for c in args.classes.split(",")]
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--classes {bad} outside [0, {num_classes - 1}] for this model")
    else:
        classes = list(range(num_classes))
    if args.per_class < 1 or args.batch_size < 1:
        raise ValueError("--per-class and --batch-size must be >= 1")
    return [c for c in classes for _ in range(args.per_class)]


def run(args) -> Path:
    from accelerate import Accelerator
    from tqdm import tqdm

    if args.edit_image or args.edit_mask:
        args.sampler = "edit"
    sampler_cls = sampler_class(args.sampler)
    sampler_args = parse_sampler_args(sampler_cls, args.sampler_arg)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    var, vae, extras = load_models(args.var, args.vae, args.model, acc.device)
    sampler = build_sampler(args.sampler, var=var, vae=vae, **models_for(sampler_cls, extras), **sampler_args)
    temperature = parse_temperature(args.temperature, var.num_scales)
    edit_inputs = load_edit_inputs(args, vae.config.image_size, acc.device) if args.sampler == "edit" else None
    labels = plan(args, var.num_classes)
    out = Path(args.out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(acc.process_index, len(labels), acc.num_processes)
            if not (img_dir / f"{i:06d}.png").is_file()]
    bf16 = acc.device.type == "cuda" and args.precision in ("auto", "bf16")
    settings = {k: v for k, v in vars(args).items() if k != "list_samplers"}
    record = {"settings": settings, "sampler_args": sampler_args, "num_images": len(labels),
              "num_processes": acc.num_processes, "device": str(acc.device), "autocast_bf16": bf16,
              "class_names": class_names(args.var), "software": software_versions()}
    bar = tqdm(total=len(todo), desc=f"sampling [{acc.process_index}]", disable=not acc.is_local_main_process)
    stats_path = out / (f"stats.rank{acc.process_index}.jsonl" if acc.num_processes > 1 else "stats.jsonl")
    for start in range(0, len(todo), args.batch_size):
        idx = todo[start:start + args.batch_size]
        kwargs = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=temperature,
                      more_smooth=args.more_smooth, seed=[image_seed(args.seed, i) for i in idx])
        batch_labels = torch.tensor([labels[i] for i in idx])
        with torch.autocast(device_type=acc.device.type, dtype=torch.bfloat16, enabled=bf16):
            if edit_inputs is not None:
                result = sampler.edit(*edit_inputs, batch_labels.to(acc.device), **kwargs)
            else:
                result = sampler.sample(batch_labels, **kwargs)
        for i, array in zip(idx, to_uint8(result.images)):
            save_png(img_dir / f"{i:06d}.png", array)
        with stats_path.open("a") as fh:
            fh.write(json.dumps({"indices": [idx[0], idx[-1]], "batch": len(idx), **result.stats.as_dict()}) + "\n")
        bar.update(len(idx))
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        finish(out, labels, record, args)
    acc.wait_for_everyone()
    return out


def finish(out: Path, labels: list[int], record: dict, args) -> None:
    arrays = read_pngs(out / "images", len(labels))
    if not args.no_npz:
        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
                np.savez(fh, arr_0=arrays, arr_1=np.asarray(labels, dtype=np.int64))  # ADM: arr_1 = labels
        atomic_write(out / "samples.npz", write_npz)
    if args.grid_max > 0:
        shown = arrays[: args.grid_max]
        per_row = args.per_class if args.per_class <= 16 and len(shown) > args.per_class else min(len(shown), 10)
        atomic_write(out / "grid.png", lambda tmp: Image.fromarray(make_grid(shown, per_row)).save(tmp, format="PNG"))
    stats = [json.loads(line) for f in sorted(out.glob("stats*.jsonl")) for line in f.read_text().splitlines()]
    record["sampling_wall_time_s"] = sum(s["wall_time_s"] for s in stats)  # of this and earlier (resumed) runs
    atomic_write_json(out / "sample_config.json", record)
    print(f"wrote {len(labels)} images to {out}")
    if args.eval_card:
        write_eval_card(out, record, args)


def write_eval_card(out: Path, record: dict, args) -> None:
    from eval.card import write_card
    from eval.fid import build_parser as eval_parser, run as evaluate

    if args.no_npz or not (args.proxy_classifier or args.inception):
        raise ValueError("--eval-card needs samples.npz (drop --no-npz) and --proxy-classifier and/or --inception")
    eval_args = ["--samples", str(out / "samples.npz"), "--out", str(out / "metrics.json")]
    for flag, value in (("--proxy-classifier", args.proxy_classifier), ("--inception", args.inception),
                        ("--ref", args.ref)):
        if value:
            eval_args += [flag, value]
    json_path, md_path = write_card(record, evaluate(eval_parser().parse_args(eval_args)), out / "eval_card")
    print(f"wrote {json_path} and {md_path}")


def list_samplers() -> str:
    lines = []
    for name in available_samplers():
        cls = sampler_class(name)
        opts = ", ".join(f"{k}: {t.__name__}" for k, t in cls.options.items()) or "no options"
        extra = f"; needs --model {', '.join(n + '=PATH' for n in cls.extra_models)}" if cls.extra_models else ""
        if cls.optional_models:
            extra += f"; can use --model {', '.join(n + '=PATH' for n in cls.optional_models)}"
        lines.append(f"{name:12s} {opts}{extra}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.list_samplers:
        print(list_samplers())
        return
    with torch.no_grad():  # a context, not a global switch: main() is also called from tests and notebooks
        run(args)


if __name__ == "__main__":
    main()

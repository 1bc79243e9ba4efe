"""Generate class-conditional samples with any registered sampler; FID-ready, resumable, distributed.

  python sample.py                                   # shipped Fashion-MNIST models, 4 per class, grid + npz
  python sample.py --classes 0,3 --per-class 8 --cfg 2 --top-k 100 --out samples/demo
  python sample.py --vae vae_ch160v4096z32.pth --var var_d16.pth --all-classes --per-class 50 \
      --cfg 1.5 --top-k 900 --top-p 0.96 --out samples/d16_50k          # the official FID protocol
  python sample.py --sampler code --model refiner=checkpoints/fmnist/var_refiner.safetensors \
      --sampler-arg draft_scales=3
  accelerate launch --num_processes 8 sample.py ...  # any number of processes; the same images come out

Image i (global index; labels run class-major) is drawn with its own generator seeded from
(--seed, i) (samplers/seeding.py) and decoded in fixed-size chunks, so neither its random stream nor its
decoding depends on the batch size or the number of processes. (The transformer's batched matmuls still give
logits ~1e-5 apart across batch sizes, which moves a draw across a boundary now and then: 3 of 210 images.)
A folder is resumed (existing PNGs are skipped) only when its fingerprint.json matches every setting that
changes pixels; otherwise sample.py stops with an error naming the differing settings (--overwrite deletes
the earlier outputs). Files are written atomically.
Output: DIR/images/{i:06d}.png, DIR/samples.npz (ADM format: arr_0 uint8 NHWC, plus labels), DIR/grid.png,
DIR/fingerprint.json, DIR/sample_config.json (every setting + software versions) and DIR/stats.jsonl
(sampler counters per batch). User errors print one `error:` line and exit with status 2 (--debug: traceback).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from samplers import available_samplers, build_sampler, sampler_class
from samplers.base import split_names
from samplers.cli import (SHIPPED, cfg_float, check_file, check_resume, class_list, clear_outputs,
                          drop_partial_last_line, load_models, models_for, nonneg_int, parse_model_specs,
                          parse_sampler_args, parse_var_overrides, positive_int, read_stats, temperature_list,
                          unit_float, write_fingerprint)
from samplers.logits_processing import check_sampling_args
from samplers.seeding import image_seed
from training.atomic import atomic_write, atomic_write_json, check_writable, file_sha256
from training.checkpoint import read_metadata
from training.errors import make_parser, run_cli
from training.images import to_rgb_uint8
from var.compile import MODES as COMPILE_MODES

REPO = Path(__file__).resolve().parent
# f_hat is decoded this many images at a time, padded with zeros: convolution kernels pick their algorithm
# by batch size, and a PNG must not depend on the batch its image was drawn in (measured: +-1 in ~7% of images
# when decoding whole batches of 1 vs 7 vs 16; none with fixed padded chunks)
DECODE_CHUNK = 8
SEEDING = "samplers.seeding.image_seed v1"


# ---- arguments ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = make_parser(description=__doc__)
    m = p.add_argument_group("models")
    m.add_argument("--vae", default=str(SHIPPED / "tokenizer.safetensors"),
                   help="tokenizer: ours (.safetensors) or the official vae_ch160v4096z32.pth")
    m.add_argument("--var", default=str(SHIPPED / "var_drafter.safetensors"),
                   help="VAR transformer: ours (.safetensors) or an official var_d*.pth")
    m.add_argument("--var-override", action="append", default=[], metavar="KEY=VALUE",
                   help="VAR config field for an official .pth whose tensors do not determine it, e.g. num_heads=16 "
                        "(repeatable)")
    m.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="extra model a sampler needs (e.g. refiner=...); see --list-samplers")
    s = p.add_argument_group("sampler")
    s.add_argument("--sampler", default="default", help="registered sampler name")
    s.add_argument("--sampler-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="sampler option, repeatable (typed by the sampler's `options`)")
    s.add_argument("--list-samplers", action="store_true", help="print samplers with their options and exit")
    s.add_argument("--cfg", type=cfg_float, default=1.5, help="guidance strength, ramped linearly over scales")
    s.add_argument("--top-k", type=nonneg_int, default=0, help="0 disables")
    s.add_argument("--top-p", type=unit_float, default=0.0, help="0 disables")
    s.add_argument("--temperature", type=temperature_list, default=[1.0],
                   help="one value, or comma-separated values, one per scale")
    s.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax code mixing (visualisation only)")
    s.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help=f"torch.compile the sampler's models (mode: {' | '.join(COMPILE_MODES)})")
    s.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="handed to the sampler (bf16 needs CUDA); default: bf16 autocast on CUDA, fp32 on CPU")
    w = p.add_argument_group("what to generate")
    w.add_argument("--classes", type=class_list, default=None, help="comma-separated class ids (default: all classes)")
    w.add_argument("--all-classes", action="store_true", help="every class (the default when --classes is absent)")
    w.add_argument("--per-class", type=positive_int, default=4, help="images per class")
    w.add_argument("--seed", type=int, default=0, help="base seed; image i uses image_seed(seed, i)")
    w.add_argument("--batch-size", type=positive_int, default=16,
                   help="images per forward (per process); never changes the images")
    w.add_argument("--num-threads", type=nonneg_int, default=0, help="torch CPU threads (0: torch's default)")
    e = p.add_argument_group("zero-shot editing (uses the 'edit' sampler)")
    e.add_argument("--edit-image", default=None, help="image to edit (PNG/JPEG at the tokenizer's resolution)")
    e.add_argument("--edit-mask", default=None, help="mask image of the same size: white = regenerate, black = keep")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="samples/demo", help="output folder (reused to resume with the same settings)")
    o.add_argument("--overwrite", action="store_true",
                   help="delete the outputs of an earlier run in --out first (other files there are kept)")
    o.add_argument("--no-npz", action="store_true", help="skip the ADM-format samples.npz")
    o.add_argument("--grid-max", type=nonneg_int, default=100, help="at most this many images in grid.png (0: none)")
    v = p.add_argument_group("evaluation card (sample + evaluate in one command)")
    v.add_argument("--eval-card", action="store_true",
                   help="after sampling, evaluate samples.npz and write DIR/eval_card.{json,md}")
    v.add_argument("--proxy-classifier", default=None,
                   help="proxy classifier for the card (e.g. eval/weights/fmnist_classifier.safetensors)")
    v.add_argument("--inception", default=None, help="local pt_inception-2015-12-05 weights for FID/sFID/IS/P/R/KID")
    v.add_argument("--ref", default=None, help="reference statistics or ADM reference batch (.npz) for FID")
    return p


def resolve_temperature(values: list[float], num_scales: int):
    if len(values) == 1:
        return values[0]
    if len(values) != num_scales:
        raise ValueError(f"--temperature needs 1 or {num_scales} (one per scale) values, got {len(values)}")
    return values


def check_input_file(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path} does not exist; check the path")


def validate(args) -> tuple[type, dict, dict[str, str], dict[str, str], dict]:
    """Every check that needs no model, so a bad command fails before anything is loaded or written.
    Returns the sampler class, its options, the local --var/--vae and --model paths, the --var-override values."""
    if (args.edit_image or args.edit_mask) and "edit" not in split_names(args.sampler):
        args.sampler = "+".join(split_names(args.sampler) + ["edit"])  # e.g. code -> code+edit
    if args.classes is not None and args.all_classes:
        raise ValueError("give --classes or --all-classes, not both")
    sampler_cls = sampler_class(args.sampler)
    sampler_args = parse_sampler_args(sampler_cls, args.sampler_arg)
    extra_paths = parse_model_specs(args.model)
    models_for(sampler_cls, extra_paths)  # names only: which extra models are missing or unused
    var_overrides = parse_var_overrides(args.var_override)
    local = {"var": check_file(args.var, "VAR"), "vae": check_file(args.vae, "tokenizer")}
    check_input_file(args.edit_image, "--edit-image")
    check_input_file(args.edit_mask, "--edit-mask")
    if "edit" in split_names(args.sampler) and not (args.edit_image and args.edit_mask):
        raise ValueError("editing needs both --edit-image and --edit-mask")
    if args.eval_card:
        if args.no_npz or not (args.proxy_classifier or args.inception):
            raise ValueError("--eval-card needs samples.npz (drop --no-npz) and --proxy-classifier and/or --inception")
        if args.inception and not args.ref:
            raise ValueError("--inception needs --ref (reference statistics or an ADM reference batch)")
        for flag in ("proxy_classifier", "inception", "ref"):
            check_input_file(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.precision == "bf16" and not torch.cuda.is_available():
        raise ValueError("--precision bf16 needs a CUDA GPU; on CPU use --precision fp32 or leave it out")
    check_writable(Path(args.out), "--out", folder=True)
    return sampler_cls, sampler_args, local, extra_paths, var_overrides


def load_edit_inputs(args, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, H, W) image in [0, 1] and (1, 1, H, W) mask in [0, 1] from --edit-image/--edit-mask."""
    if not (args.edit_image and args.edit_mask):
        raise ValueError("editing needs both --edit-image and --edit-mask")
    tensors = []
    for path, is_mask in ((args.edit_image, False), (args.edit_mask, True)):
        try:
            with Image.open(path) as im:
                rgb = to_rgb_uint8(im, str(path))  # 16-bit, alpha, palette... decoded as everywhere else
            array = (rgb[..., 0] if is_mask else rgb).astype(np.float32) / 255.0
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


def fingerprint(args, sampler_args: dict, local: dict, extra_paths: dict, var_overrides: dict, classes: list[int],
                temperature, device: torch.device) -> dict:
    """Every setting that changes pixels (never the batch size or process count, which do not)."""
    def sha(path):
        return file_sha256(path) if path else None
    precision = args.precision or ("bf16-autocast" if device.type == "cuda" else "fp32")
    return {"format": 1, "seeding": SEEDING, "decode_chunk": DECODE_CHUNK,
            "models": {"var": sha(local["var"]), "vae": sha(local["vae"]),
                       **{n: sha(p) for n, p in sorted(extra_paths.items())}},
            "var_overrides": var_overrides, "sampler": args.sampler, "sampler_args": sampler_args,
            # an option naming a file (e.g. a ScaleKV calibration) is fingerprinted by content
            "sampler_arg_files": {k: sha(v) for k, v in sorted(sampler_args.items())
                                  if isinstance(v, str) and Path(v).is_file()},
            "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "temperature": temperature,
            "more_smooth": args.more_smooth, "seed": args.seed, "classes": classes, "per_class": args.per_class,
            "edit_image": sha(args.edit_image), "edit_mask": sha(args.edit_mask),
            "compile": args.compile, "precision": precision, "device": device.type}


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
                arrays.append(to_rgb_uint8(im, str(path)))
        except (OSError, ValueError) as err:
            raise ValueError(f"sample {path} is unreadable ({err}); delete it and rerun to regenerate it") from err
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
def plan(args, num_classes: int) -> tuple[list[int], list[int]]:
    """(classes, label of every global image index (class-major))."""
    classes = args.classes if args.classes is not None else list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes {bad} outside [0, {num_classes - 1}] for this model")
    return classes, [c for c in classes for _ in range(args.per_class)]


def decode_fixed(sampler, f_hat_BChw: torch.Tensor) -> torch.Tensor:
    """Images of f_hat decoded DECODE_CHUNK at a time, the last chunk padded with zeros (see DECODE_CHUNK)."""
    n = f_hat_BChw.shape[0]
    pad = -n % DECODE_CHUNK
    padded = torch.cat((f_hat_BChw, f_hat_BChw.new_zeros(pad, *f_hat_BChw.shape[1:]))) if pad else f_hat_BChw
    chunks = rearrange(padded, "(n b) c h w -> n b c h w", b=DECODE_CHUNK)
    return torch.cat([sampler.decode(chunk) for chunk in chunks])[:n]


def run(args) -> Path:
    from accelerate import Accelerator
    from tqdm import tqdm

    sampler_cls, sampler_args, local, extra_paths, var_overrides = validate(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    var, vae, extras = load_models(local["var"], local["vae"], extra_paths, acc.device, var_overrides=var_overrides)
    # compile/precision travel only when asked for: samplers without these keywords keep working
    build_kwargs = {k: v for k, v in (("compile", args.compile), ("precision", args.precision)) if v is not None}
    sampler = build_sampler(args.sampler, var=var, vae=vae, **models_for(sampler_cls, extras), **sampler_args,
                            **build_kwargs)
    temperature = resolve_temperature(args.temperature, var.num_scales)
    classes, labels = plan(args, var.num_classes)
    try:
        check_sampling_args(args.cfg, args.top_k, args.top_p, temperature, var.config.vocab_size, var.num_scales)
    except ValueError as err:
        raise ValueError(f"{err} (flags --cfg, --top-k, --top-p, --temperature)") from err
    edit_inputs = (load_edit_inputs(args, vae.config.image_size, acc.device)
                   if "edit" in split_names(args.sampler) else None)
    out = Path(args.out)
    fp = fingerprint(args, sampler_args, local, extra_paths, var_overrides, classes, temperature, acc.device)
    check_resume(out, fp, args.overwrite)
    acc.wait_for_everyone()  # every process has compared before the main one may delete or write
    img_dir = out / "images"
    if acc.is_main_process:
        if args.overwrite:
            print(f"--overwrite: deleted {clear_outputs(out)} files of the earlier run in {out}")
        img_dir.mkdir(parents=True, exist_ok=True)
        write_fingerprint(out, fp)
    acc.wait_for_everyone()
    todo = [i for i in range(acc.process_index, len(labels), acc.num_processes)
            if not (img_dir / f"{i:06d}.png").is_file()]
    bf16 = acc.device.type == "cuda" and args.precision is None  # a given --precision is the sampler's job
    settings = {k: v for k, v in vars(args).items() if k not in ("list_samplers", "debug")}
    record = {"settings": settings, "sampler_args": sampler_args, "num_images": len(labels), "fingerprint": fp,
              "num_processes": acc.num_processes, "device": str(acc.device), "autocast_bf16": bf16,
              "class_names": class_names(local["var"]), "software": software_versions()}
    bar = tqdm(total=len(todo), desc=f"sampling [{acc.process_index}]", disable=not acc.is_local_main_process)
    stats_path = out / (f"stats.rank{acc.process_index}.jsonl" if acc.num_processes > 1 else "stats.jsonl")
    drop_partial_last_line(stats_path)  # a run killed while appending to it
    for start in range(0, len(todo), args.batch_size):
        idx = todo[start:start + args.batch_size]
        kwargs = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=temperature, decode=False,
                      more_smooth=args.more_smooth, seed=[image_seed(args.seed, i) for i in idx])
        batch_labels = torch.tensor([labels[i] for i in idx])
        with torch.autocast(device_type=acc.device.type, dtype=torch.bfloat16, enabled=bf16):
            if edit_inputs is not None:
                result = sampler.edit(*edit_inputs, batch_labels.to(acc.device), **kwargs)
            else:
                result = sampler.sample(batch_labels, **kwargs)
            began = time.perf_counter()
            images = decode_fixed(sampler, result.f_hat)
        arrays = to_uint8(images)  # on CUDA this waits for the decoder, so the timing below is complete
        result.stats.wall_time_s += time.perf_counter() - began
        for i, array in zip(idx, arrays):
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
    stats = read_stats(out)
    record["sampling_wall_time_s"] = sum(s["wall_time_s"] for s in stats)  # of this and earlier (resumed) runs
    atomic_write_json(out / "sample_config.json", record)
    print(f"wrote {len(labels)} images to {out}")
    if args.eval_card:
        write_eval_card(out, record, args)


def write_eval_card(out: Path, record: dict, args) -> None:
    from eval.card import write_card
    from eval.fid import build_parser as eval_parser, run as evaluate

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
        opts = ", ".join(f"{k}: {t.__name__}" for k, t in cls.options.items() if "." not in k) or "no options"
        extra = f"; needs --model {', '.join(n + '=PATH' for n in cls.extra_models)}" if cls.extra_models else ""
        if cls.optional_models:
            extra += f"; can use --model {', '.join(n + '=PATH' for n in cls.optional_models)}"
        lines.append(f"{name:12s} {opts}{extra}")
    lines.append("stack accelerators with '+' (e.g. --sampler code+scalekv); an option two of them share is given "
                 "as --sampler-arg NAME.OPTION=VALUE (e.g. scalekv.calibration=...)")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Raises user errors (ValueError, FileNotFoundError, ...); run as a script they become one `error:` line."""
    args = build_parser().parse_args(argv)
    if args.list_samplers:
        print(list_samplers())
        return
    with torch.no_grad():  # a context, not a global switch: main() is also called from tests and notebooks
        run(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))

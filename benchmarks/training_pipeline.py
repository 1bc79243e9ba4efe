"""Training-pipeline benchmark: data loading with workers, training-step MFU, 2-process vs 1-process CPU training.

  OMP_NUM_THREADS=1 python -m benchmarks.training_pipeline --quick      # a provisional smoke run (about a minute)
  python -m benchmarks.training_pipeline                                # the full run, on a quiet machine
  python -m benchmarks.training_pipeline --markdown benchmarks/results/training_pipeline.json   # the table

Sections (--sections data,mfu,scaling; all by default):
  data     images/s through the real training input path (training.loader.ImageSamples with the public VAR
           transform VARTransform(256, mid_reso=1.125, random_crop=True), StepBatchSampler, make_loader) on a
           synthetic ImageFolder of JPEGs 300-500 px a side, num_workers 0 vs --workers. One untimed pass per
           setting first (page cache, and the check that both give bitwise the same batches), then --repeats
           rounds alternating the order; "steady" images/s leaves out the first batch (worker start-up).
  mfu      forward + backward + clip + AdamW step of the VAR transformer at the d16 shape (width 1024, 16 heads,
           the 10-scale 680-token sequence; --d16-depth blocks, MFU being per-block-shaped work) and at the tiny
           shipped shape (checkpoints/fmnist drafter: depth 6, width 128). FLOPs: torch's FlopCounterMode over one
           step (matmuls and attention; model FLOPs, no recomputation counted, the block-causal mask computed
           dense as SDPA does), divided by the median step time and by the fp32 matmul peak measured in the same
           process (same threads) before and after the section (the larger of the two).
  scaling  `python train.py var` vs 2 gloo processes (`accelerate launch --config_file
           configs/accelerate/ddp_cpu_2proc.yaml`, GPUs hidden, a free port) at the same global batch, on
           procedural 32 px data with a random tokenizer of the shipped shape and the tiny shipped VAR shape;
           images/s from the wall_s of metrics.jsonl after --warmup-steps steps (start-up, token caching and
           export excluded; the trainer's own images_per_s is kept as a cross-check). Optionally
           also one process with twice the threads: the same cores as the 2-process run.
Every ratio pairs measurements of the same round. Targets (issue 14): MFU >= 35 % at the d16 shape, 2-process
scaling >= 1.6x. Writes the JSON (--out) and a PNG next to it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.measure import count_flops, load_average, matmul_peak_flops, median_iqr, usable_cpus
from benchmarks.training_report import MFU_TARGET, markdown_table, save_plot
from benchmarks.training_scaling import TINY_SHAPE, bench_scaling
from training.atomic import atomic_write_json
from training.config import OptimConfig
from training.data import ImageFolder
from training.errors import make_parser, run_cli
from training.loader import ImageSamples, StepBatchSampler, collate_images, make_loader
from training.optim import build_adamw
from training.transforms import VARTransform
from var.config import PATCH_NUMS_256, VARConfig, var_config
from var.model import VAR

SECTIONS = ("data", "mfu", "scaling")


# ---- data pipeline -------------------------------------------------------------------------------------------
def make_image_folder(root: Path, count: int, classes: int, seed: int) -> Path:
    """`count` JPEGs with sides drawn from [300, 500] px in `classes` class folders: smooth random colour fields
    plus noise, so they compress and decode like photographs rather than flat fills or pure noise."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(300, 501, size=2))
        coarse = rng.integers(0, 256, size=(max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
        pixels = (smooth + rng.integers(-12, 13, size=(h, w, 3))).clip(0, 255).astype(np.uint8)
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def data_pass(dataset, workers: int, batch: int, seed: int, image_size: int, digest: bool = False) -> dict:
    """One epoch through the training input path; seconds to the first batch and in all."""
    samples = ImageSamples(dataset, VARTransform(image_size, mid_reso=1.125, random_crop=True), seed, train=True)
    steps = len(dataset) // batch
    sampler = StepBatchSampler(len(dataset), batch, 1, 1, 0, seed, 0, steps)
    loader = make_loader(samples, sampler, collate_images, num_workers=workers, persistent_workers=False,
                         prefetch_factor=2, pin_memory=False, seed=seed)
    sha = hashlib.sha256()
    start = time.perf_counter()
    first_s, first_n, images = None, 0, 0
    for b in loader:
        n = b["images"].shape[0]
        if first_s is None:
            first_s, first_n = time.perf_counter() - start, n
        images += n
        if digest:
            sha.update(b["images"].numpy().tobytes())
            sha.update(b["labels"].numpy().tobytes())
    total_s = time.perf_counter() - start
    out = {"images": images, "first_batch_s": first_s, "total_s": total_s, "images_per_s": images / total_s,
           "steady_images_per_s": (images - first_n) / max(total_s - first_s, 1e-9)}
    if digest:
        out["sha256"] = sha.hexdigest()
    return out


def bench_data(args, tmp: Path) -> dict:
    root = make_image_folder(tmp / "images", args.images, args.classes, args.seed)
    dataset = ImageFolder(root, args.image_size)
    settings = [0, args.workers]
    checks = {w: data_pass(dataset, w, args.batch, args.seed, args.image_size, digest=True) for w in settings}
    rounds = {w: [] for w in settings}
    for r in range(args.repeats):
        for w in settings if r % 2 == 0 else settings[::-1]:
            rounds[w].append(data_pass(dataset, w, args.batch, args.seed, args.image_size))
            print(f"data: {w} workers, round {r}: {rounds[w][-1]['steady_images_per_s']:.1f} images/s", flush=True)
    rows = []
    for w in settings:
        rows.append({"num_workers": w, "steady_images_per_s": median_iqr([p["steady_images_per_s"] for p in rounds[w]]),
                     "images_per_s": median_iqr([p["images_per_s"] for p in rounds[w]]),
                     "first_batch_s": median_iqr([p["first_batch_s"] for p in rounds[w]])})
    ratio = [b["steady_images_per_s"] / a["steady_images_per_s"] for a, b in zip(rounds[0], rounds[args.workers])]
    return {"images": args.images, "classes": args.classes, "image_size": args.image_size, "batch": args.batch,
            "source_sides_px": [300, 500], "transform": {"mid_reso": 1.125, "random_crop": True, "hflip": False},
            "rows": rows, "speedup_vs_0_workers": median_iqr(ratio),
            "same_batches": checks[0]["sha256"] == checks[args.workers]["sha256"]}


# ---- training-step MFU -----------------------------------------------------------------------------------------
def make_train_step(cfg: VARConfig, batch: int, seed: int):
    """(model, step): one VAR training step on fixed random teacher-forcing input, as the VAR job's loss."""
    torch.manual_seed(seed)
    model = VAR(cfg).train()
    optimizer = build_adamw(model, OptimConfig())
    g = torch.Generator().manual_seed(seed)
    L = cfg.seq_len
    x_BlCv = torch.randn(batch, L - cfg.patch_nums[0] ** 2, cfg.z_channels, generator=g)
    labels_B = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    target_BL = torch.randint(0, cfg.vocab_size, (batch, L), generator=g)

    def step() -> float:
        logits_BLV = model(labels_B, x_BlCv)
        loss = F.cross_entropy(logits_BLV.flatten(0, 1), target_BL.flatten(), label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def bench_mfu_shape(name: str, cfg: VARConfig, batch: int, repeats: int, seed: int) -> dict:
    model, step = make_train_step(cfg, batch, seed)
    flops = count_flops(step)  # also the first (warm-up) step
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    s = median_iqr(times)
    print(f"mfu: {name}: {s['median']:.3f} s/step, {flops / s['median'] / 1e9:.1f} GFLOP/s", flush=True)
    return {"shape": name, "depth": cfg.depth, "width": cfg.embed_dim, "heads": cfg.num_heads, "batch": batch,
            "seq_len": cfg.seq_len, "tokens_per_step": batch * cfg.seq_len, "params": params,
            "flops_per_step": flops, "step_s": s, "achieved_flops_per_s": flops / s["median"],
            "images_per_s": batch / s["median"]}


def bench_mfu(args) -> dict:
    cpu = torch.device("cpu")
    peak_before = matmul_peak_flops(cpu, torch.float32, args.peak_size)
    d16 = var_config("var_d16", depth=args.d16_depth, patch_nums=PATCH_NUMS_256)
    rows = [bench_mfu_shape(f"d16 (depth {args.d16_depth} of 16)", d16, args.d16_batch, args.repeats, args.seed),
            bench_mfu_shape("tiny (fmnist drafter)", VARConfig(**TINY_SHAPE), args.tiny_batch, args.repeats, args.seed)]
    peak_after = matmul_peak_flops(cpu, torch.float32, args.peak_size)
    peak = max(peak_before, peak_after)
    for r in rows:
        r["mfu"] = r["achieved_flops_per_s"] / peak
    return {"matmul_peak_flops": peak, "matmul_peak_flops_start": peak_before, "matmul_peak_flops_end": peak_after,
            "matmul_peak_size": args.peak_size, "dtype": "float32", "rows": rows, "target_mfu_d16": MFU_TARGET,
            "flop_counting": "torch.utils.flop_counter.FlopCounterMode over one step; CPU attention mapped to "
                             "torch's SDPA formula, backward = 2x forward (model FLOPs)"}


def run(args) -> dict:
    torch.set_num_threads(args.threads_per_process)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "provisional": args.provisional,
            "quick": args.quick, "command": "python -m benchmarks.training_pipeline " + " ".join(args.argv),
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "usable_cpus": usable_cpus(),
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__, "python": sys.version.split()[0], "load_average_start": load_average(),
            "repeats": args.repeats, "seed": args.seed}
    result: dict = {"meta": meta}
    busy = meta["load_average_start"] and meta["load_average_start"][0] > 0.5 * meta["usable_cpus"]
    if busy and not args.provisional:  # every section here is a rate: other work on the cores lowers all of them
        print(f"warning: load average {meta['load_average_start'][0]} on {meta['usable_cpus']} CPUs; the numbers "
              f"will be low and noisy (run on a quiet machine, or pass --provisional)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="training_pipeline_") as tmp:
        for section in args.sections:
            start = time.perf_counter()
            if section == "data":
                result["data"] = bench_data(args, Path(tmp))
            elif section == "mfu":
                result["mfu"] = bench_mfu(args)
            else:
                result["scaling"] = bench_scaling(args, Path(tmp))
            meta.setdefault("section_wall_s", {})[section] = round(time.perf_counter() - start, 1)
    meta["load_average_end"] = load_average()
    return result


QUICK = dict(images=16, batch=4, repeats=2, d16_depth=1, d16_batch=1, tiny_batch=8, peak_size=1024, num_samples=64,
             global_batch=8, steps=4, warmup_steps=1, scaling_repeats=1, same_cores=False)


def build_parser():
    p = make_parser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run; the result is marked provisional)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of the data and MFU sections")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads-per-process", type=int, default=1, help="torch threads (MFU, and each training process)")
    p.add_argument("--images", type=int, default=512, help="synthetic JPEGs in the image folder")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="data-pipeline batch")
    p.add_argument("--workers", type=int, default=2, help="the worker count compared with 0")
    p.add_argument("--d16-depth", type=int, default=16, help="blocks of the d16-shaped model (MFU is per block)")
    p.add_argument("--d16-batch", type=int, default=2)
    p.add_argument("--tiny-batch", type=int, default=32)
    p.add_argument("--peak-size", type=int, default=2048, help="side of the square fp32 matmuls timing the peak")
    p.add_argument("--num-samples", type=int, default=512, help="procedural images of the scaling runs")
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the scaling throughput")
    p.add_argument("--scaling-repeats", type=int, default=3)
    p.add_argument("--same-cores", action=argparse.BooleanOptionalAction, default=True,
                   help="also one process with 2x threads (the cores the 2-process run uses)")
    p.add_argument("--run-timeout", type=int, default=1800, help="seconds one training run may take")
    p.add_argument("--provisional", action="store_true", help="mark the result provisional (implied by --quick)")
    p.add_argument("--out", default="benchmarks/results/training_pipeline.json", help="JSON path; the PNG goes beside it")
    p.add_argument("--markdown", default=None, metavar="JSON", help="only print the Markdown tables of a result file")
    return p


def parse_args(argv: list[str]):
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:  # --quick sets the small values; flags given explicitly still win
        given = {a.split("=")[0].lstrip("-").replace("-", "_").removeprefix("no_") for a in argv if a.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
        args.provisional = True
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        raise ValueError(f"--sections takes a comma list of {', '.join(SECTIONS)}, got {unknown or 'nothing'}")
    if not args.out.endswith(".json"):
        raise ValueError(f"--out must end in .json (the PNG goes beside it), got {args.out}")
    for name in ("repeats", "images", "classes", "batch", "workers", "d16_depth", "d16_batch", "tiny_batch",
                 "threads_per_process", "num_samples", "global_batch", "scaling_repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.images < args.batch:
        raise ValueError(f"--images ({args.images}) must be >= --batch ({args.batch}): one batch at least")
    if args.global_batch % 2 or args.num_samples < args.global_batch:
        raise ValueError(f"--global-batch must be even (2 processes) and <= --num-samples, got {args.global_batch}")
    if args.steps < args.warmup_steps + 2:
        raise ValueError(f"--steps ({args.steps}) must exceed --warmup-steps ({args.warmup_steps}) by 2 or more")
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return 0
    result = run(args)
    out = Path(args.out)
    atomic_write_json(out, result)
    png = save_plot(result, out.with_suffix(".png"))
    print(markdown_table(result))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

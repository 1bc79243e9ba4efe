"""Benchmark: Inception feature-extraction throughput, ours vs pytorch-fid, same machine, same weights.

    python -m benchmarks.features --num-images 64 --batch-size 16 --image-size 32 --threads 1
    python -m benchmarks.features --inception pt_inception-2015-12-05-6726825d.pth --device cuda

Without --inception both networks get the same random state dict (throughput does not depend on the
values). Variants are timed interleaved (A B A B ...) and the median per variant is kept, so that load
from other processes hits all of them alike; ratios are against pytorch-fid measured in the same run.
pytorch-fid returns only the 2048-d pool features; ours returns pool + sFID spatial + IS logits from the
same pass, timed with the plain NCHW layout and with channels_last (our default). Writes JSON and a PNG bar chart (PIL) to --out-dir.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from eval.inception import FIDInceptionV3, InceptionFeatures, load_fid_inception, random_fid_inception
from eval.proxy import write_json_atomic
from training.atomic import atomic_write


def pytorch_fid_network(state_dict: dict, device: torch.device):
    """pytorch-fid's InceptionV3 around its own FID blocks, with our state dict instead of its download."""
    import torchvision

    try:
        from pytorch_fid import inception as pfi
    except ImportError as err:
        raise SystemExit("the baseline needs pytorch-fid (a test/benchmark-only dependency): "
                         ".venv/bin/pip install --no-deps -r requirements-test.txt") from err

    def local_fid_inception_v3():
        net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        for name, block in (("Mixed_5b", pfi.FIDInceptionA(192, 32)), ("Mixed_5c", pfi.FIDInceptionA(256, 64)),
                            ("Mixed_5d", pfi.FIDInceptionA(288, 64)), ("Mixed_6b", pfi.FIDInceptionC(768, 128)),
                            ("Mixed_6c", pfi.FIDInceptionC(768, 160)), ("Mixed_6d", pfi.FIDInceptionC(768, 160)),
                            ("Mixed_6e", pfi.FIDInceptionC(768, 192)), ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                            ("Mixed_7c", pfi.FIDInceptionE_2(2048))):
            setattr(net, name, block)
        net.load_state_dict(state_dict, strict=True)
        return net

    original = pfi.fid_inception_v3
    pfi.fid_inception_v3 = local_fid_inception_v3
    try:
        net = pfi.InceptionV3([3], resize_input=True, normalize_input=True)
    finally:
        pfi.fid_inception_v3 = original
    return net.to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_once(fn, batches: list[torch.Tensor], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for x in batches:
        fn(x)
    sync(device)
    return time.perf_counter() - t0


def bar_chart(path: Path, title: str, labels: list[str], values: list[float], unit: str) -> None:
    w, h, margin, bar_h = 760, 70 + 46 * len(labels), 230, 30
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    vmax = max(values) or 1.0
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 45 + 46 * i
        draw.text((10, y + 8), label, fill="black")
        length = int((w - margin - 110) * value / vmax)
        draw.rectangle([margin, y, margin + length, y + bar_h], fill=(70, 110, 200) if i else (150, 150, 150))
        draw.text((margin + length + 6, y + 8), f"{value:.1f} {unit}", fill="black")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), suffix=".png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inception", help="real weights (optional; default: random weights, same for both)")
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=32, help="input side before the 299x299 resize")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net, sha = load_fid_inception(args.inception) if args.inception else (random_fid_inception(0), None)
    theirs = pytorch_fid_network(net.state_dict(), device)
    ours_nchw = InceptionFeatures(net, sha, channels_last=False).to(device)
    net_copy = FIDInceptionV3()
    net_copy.load_state_dict(net.state_dict())
    ours = InceptionFeatures(net_copy, sha, channels_last=True).to(device)  # the default
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(min(args.batch_size, args.num_images - i), 3, args.image_size, args.image_size,
                          generator=gen).to(device) for i in range(0, args.num_images, args.batch_size)]
    variants = {
        "pytorch-fid (pool only)": lambda x: theirs(x)[0],
        "ours, NCHW (pool+spatial+logits)": ours_nchw,
        "ours, channels_last (default)": ours,
    }
    with torch.inference_mode():  # correctness first: the benchmark compares equal computations
        ref = theirs(batches[0])[0].flatten(1)
        diffs = {name: float((fn(batches[0])["pool"] - ref).abs().max()) for name, fn in variants.items() if "ours" in name}
        for fn in variants.values():
            fn(batches[0])  # warm-up (allocator, oneDNN / cuDNN algorithm choice)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(time_once(fn, batches, device))
    base = statistics.median(times["pytorch-fid (pool only)"])
    results = {name: {"median_s": statistics.median(t), "runs_s": t, "images_per_s": args.num_images / statistics.median(t),
                      "speed_ratio_vs_pytorch_fid": base / statistics.median(t)} for name, t in times.items()}
    report = {"benchmark": "inception feature extraction", "settings": vars(args),
              "weights": "file sha256 " + sha if sha else "random (seed 0), identical for all variants",
              "max_abs_pool_diff_vs_pytorch_fid": diffs, "results": results,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "torch": torch.__version__}}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_features_{device.type}_{args.image_size}px"
    write_json_atomic(out_dir / f"{stem}.json", report)
    bar_chart(out_dir / f"{stem}.png", f"Inception features, {args.num_images} images {args.image_size}px -> 299, "
              f"batch {args.batch_size}, {device.type}, {args.threads} thread(s)",
              list(results), [r["images_per_s"] for r in results.values()], "img/s")
    print(json.dumps({k: round(v["images_per_s"], 2) for k, v in results.items()}, indent=1))
    print(f"max |pool diff| vs pytorch-fid: {diffs}")
    print(f"wrote {out_dir / stem}.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

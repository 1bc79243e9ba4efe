"""One benchmark protocol for every sampler: the same model(s), seeds, batch sizes and measurements.

  python -m benchmarks.benchmark --samplers default,code:draft_scales=3 --batch-sizes 1,16 \
      --model refiner=checkpoints/fmnist/var_refiner.safetensors --out benchmarks/results/benchmark_fmnist
  python -m benchmarks.benchmark --official-shape var_d16 --batch-sizes 1 --repeats 2 --out benchmarks/results/benchmark_d16
  python -m benchmarks.benchmark --markdown benchmarks/results/benchmark_fmnist.json   # print the README table

Per sampler and batch size: wall time per image (after warm-up; median and inter-quartile range over
repeats), throughput, model forwards and tokens processed (the sampler's own counters), peak KV bytes,
peak memory (CUDA max_memory_allocated; on CPU the process RSS after the run), and quality against the
default sampler on the same seeds (PSNR of the images, token agreement). Every speed figure is a ratio
against the default sampler measured in this run. The default sampler's achieved FLOP/s (counted by
torch's FlopCounterMode) is reported as a fraction of a matmul peak measured on the same machine now.
Writes NAME.json, NAME.md and NAME.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.plotting import bar_chart
from samplers import build_sampler, sampler_class
from samplers.cli import SHIPPED, load_models, models_for, parse_sampler_args, parse_sampler_spec
from samplers.seeding import image_seed
from training.atomic import atomic_write_json, atomic_write_text


# ---- measurements ------------------------------------------------------------------------------------------
def process_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS from getrusage (kB on Linux/BSD, bytes on macOS)
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm-up
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            c = a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
        del c
    return 2 * size**3 * repeats / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).square().mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def count_flops(sampler, labels, kwargs) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        sampler.sample(labels, decode=False, **kwargs)
    return counter.get_total_flops()


def time_sampler(sampler, labels, kwargs, warmup: int, repeats: int, device: torch.device):
    for _ in range(warmup):
        sampler.sample(labels, **kwargs)
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = sampler.sample(labels, **kwargs)
        sync(device)
        times.append(time.perf_counter() - start)
    return times, out


class ProxyQuality:
    """Offline proxy quality of a sampler (eval/: classifier-feature Fréchet distance vs the real Fashion-MNIST
    test set, and classifier accuracy on the intended labels) from `count` class-balanced images."""

    def __init__(self, classifier: str, data: str, count: int, batch: int, seed: int, device: torch.device):
        from eval.harness import fashion_mnist_reference
        from eval.proxy import load_classifier
        self.net = load_classifier(classifier, device)
        self.reference = fashion_mnist_reference(data, self.net, self.net.config.image_size, device=device)
        self.count, self.batch, self.seed, self.device = count, batch, seed, device

    def __call__(self, sampler, num_classes: int, sample_kwargs: dict) -> dict:
        from eval.data import ArraySource
        from eval.harness import evaluate
        labels = torch.arange(self.count, device=self.device) % num_classes
        arrays = []
        for start in range(0, self.count, self.batch):
            idx = list(range(start, min(start + self.batch, self.count)))
            out = sampler.sample(labels[idx], seed=[image_seed(self.seed, 10**6 + i) for i in idx], **sample_kwargs)
            arrays.append(out.images.mul(255).add_(0.5).clamp_(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy())
        source = ArraySource(np.concatenate(arrays), "benchmark samples", labels.cpu().numpy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank-deficiency is expected and stated for small counts
            report = evaluate(self.net, source, self.reference, prefix="proxy_", labels=source.labels,
                              compute_is=False, device=self.device, kid_subset_size=min(1000, self.count))
        m = report["metrics"]
        return {"proxy_fd": m["proxy_fd"], "proxy_accuracy": m["proxy_accuracy"], "proxy_images": self.count}


def summarise(times: list[float], batch: int) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    median = statistics.median(times)
    return {"median_s": median, "iqr_s": q[2] - q[0], "per_image_s": median / batch, "images_per_s": batch / median,
            "repeats": len(times)}


def split_specs(text: str) -> list[str]:
    """Samplers are separated by ';' (commas then separate each one's options) or, without options, by ','."""
    return [s.strip() for s in text.split(";" if ":" in text else ",") if s.strip()]


# ---- the protocol -------------------------------------------------------------------------------------------
def build_models(args, device):
    if args.official_shape:
        from tokenizers import VQVAE
        from tokenizers.config import official_vqvae_config
        from var import VAR, var_config
        torch.manual_seed(0)
        var = VAR(var_config(args.official_shape)).to(device).eval()
        vae = VQVAE(official_vqvae_config(var.patch_nums)).to(device).eval()
        extras = {}
        for item in args.model:  # e.g. refiner=var_d16: another randomly initialised official shape
            name, size = item.split("=", 1)
            extras[name] = VAR(var_config(size)).to(device).eval()
        return var, vae, extras
    return load_models(args.var, args.vae, args.model, device)


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    var, vae, extras = build_models(args, device)
    specs = ["default"] + [s for s in split_specs(args.samplers) if s != "default"]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    sample_kwargs = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    autocast = device.type == "cuda"
    results = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
                        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                        "models": {"var": args.official_shape or _shown(args.var),
                                   "vae": None if args.official_shape else _shown(args.vae),
                                   **{k: v for k, v in (m.split("=", 1) for m in args.model)}},
                        "sampling": sample_kwargs, "warmup": args.warmup, "repeats": args.repeats,
                        "seed": args.seed, "autocast_bf16": autocast},
               "rows": []}
    quality = (ProxyQuality(args.proxy_classifier, args.proxy_data, args.quality_images, max(batch_sizes), args.seed,
                            device) if args.proxy_classifier else None)
    peak_dtype = torch.bfloat16 if autocast else torch.float32
    results["meta"]["matmul_peak_flops"] = matmul_peak_flops(device, peak_dtype, args.peak_matmul_size)
    for batch in batch_sizes:
        labels = torch.arange(batch, device=device) % var.num_classes
        seeds = [image_seed(args.seed, i) for i in range(batch)]
        baseline = None
        for spec in tqdm(specs, desc=f"batch {batch}"):
            name, items = parse_sampler_spec(spec)
            cls = sampler_class(name)
            options = parse_sampler_args(cls, items)
            models = {k: v for k, v in extras.items() if k in cls.extra_models + cls.optional_models}
            sampler = build_sampler(name, var=var, vae=vae, **models_for(cls, models), **options)
            kwargs = dict(sample_kwargs, seed=seeds, decode=not args.no_decode)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                times, out = time_sampler(sampler, labels, kwargs, args.warmup, args.repeats, device)
            row = {"sampler": spec, "batch": batch, **summarise(times, batch),
                   "forwards": out.stats.forwards, "tokens_processed": out.stats.tokens_processed,
                   "kv_bytes_peak": out.stats.kv_bytes_peak, "extra": _jsonable(out.stats.extra),
                   "peak_memory_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                         else process_rss_bytes()),
                   "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "process_rss"}
            if baseline is None:
                baseline = (row, out)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    flops = count_flops(sampler, labels, dict(sample_kwargs, seed=seeds))
                row["flops"] = flops
                row["achieved_flops_per_s"] = flops / row["median_s"]
                row["fraction_of_matmul_peak"] = row["achieved_flops_per_s"] / results["meta"]["matmul_peak_flops"]
            base_row, base_out = baseline
            row["speedup_vs_default"] = base_row["median_s"] / row["median_s"]
            row["kv_bytes_ratio_vs_default"] = row["kv_bytes_peak"] / max(1, base_row["kv_bytes_peak"])
            row["token_agreement_vs_default"] = float(torch.cat([(a == b).float().flatten() for a, b in
                                                                 zip(out.tokens, base_out.tokens)]).mean())
            if out.images is not None:
                row["psnr_vs_default_db"] = psnr(out.images, base_out.images)
            if quality is not None and batch == max(batch_sizes):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    row.update(quality(sampler, var.num_classes, sample_kwargs))
            results["rows"].append(row)
    if args.reference_checkout:
        from benchmarks.reference_loop import time_reference_loop
        results["reference"] = time_reference_loop(args.reference_checkout, var, vae, batch_sizes, sample_kwargs,
                                                   args.warmup, args.repeats, device, results["rows"])
    return results


def _shown(path: str) -> str:
    """Paths inside the repository are recorded relative to it, so committed results do not name a machine."""
    p = Path(path).resolve()
    return str(p.relative_to(SHIPPED.parents[1])) if p.is_relative_to(SHIPPED.parents[1]) else path


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else str(obj)


# ---- reports ----------------------------------------------------------------------------------------------------
def markdown_table(results: dict) -> str:
    m = results["meta"]
    lines = [f"Measured {m['date']} on {m['device']} ({m['gpu'] or m['machine']}, {m['cpu_count']} cores, "
             f"{m['torch_threads']} torch threads), model {m['models']['var']}, cfg {m['sampling']['cfg']}, "
             f"top-k {m['sampling']['top_k']}, top-p {m['sampling']['top_p']}, median of {m['repeats']} runs.",
             "", "| sampler | batch | ms / image | speed-up | forwards | KV bytes (ratio) | PSNR vs default | "
                 "token agreement | proxy FD | proxy acc. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        forwards = ", ".join(f"{k} {v}" for k, v in r["forwards"].items())
        psnr_text = "—" if "psnr_vs_default_db" not in r else (
            "identical" if r["psnr_vs_default_db"] == float("inf") else f"{r['psnr_vs_default_db']:.1f} dB")
        lines.append(f"| `{r['sampler']}` | {r['batch']} | {1000 * r['per_image_s']:.1f} ± {1000 * r['iqr_s'] / r['batch']:.1f} | "
                     f"{r['speedup_vs_default']:.2f}x | {forwards} | {r['kv_bytes_peak'] / 2**20:.2f} MiB "
                     f"({r['kv_bytes_ratio_vs_default']:.2f}) | {psnr_text} | {r['token_agreement_vs_default']:.3f} | "
                     + (f"{r['proxy_fd']:.2f} | {100 * r['proxy_accuracy']:.1f}% |" if "proxy_fd" in r else "— | — |"))
    if any("proxy_fd" in r for r in results["rows"]):
        n = next(r["proxy_images"] for r in results["rows"] if "proxy_fd" in r)
        lines += ["", f"Proxy columns: {n} class-balanced images per sampler at the largest batch size, scored by the "
                      "offline Fashion-MNIST classifier (Fréchet distance in its features vs the real test set; "
                      "accuracy on the intended labels). Not FID. PSNR and token agreement compare with the default "
                      "sampler's images for the same seeds: meaningful for samplers that follow the same sample path "
                      "(ScaleKV, CoDe's early scales); exact samplers with their own randomness (sjd, flow) are judged "
                      "by the proxy columns."]
    default_rows = [r for r in results["rows"] if "fraction_of_matmul_peak" in r]
    if default_rows:
        lines += ["", "Default sampler efficiency: " + "; ".join(
            f"batch {r['batch']}: {r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
            f"{100 * r['fraction_of_matmul_peak']:.1f}% of the measured matmul peak "
            f"({m['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)" for r in default_rows)]
    if "reference" in results:
        lines += ["", "Public reference loop: " + "; ".join(
            f"batch {r['batch']}: ours {r['speedup_vs_reference']:.2f}x its speed" for r in results["reference"])]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out: Path) -> None:
    atomic_write_json(out.with_suffix(".json"), results)
    atomic_write_text(out.with_suffix(".md"), markdown_table(results))
    groups = {f"batch {b}": {r["sampler"]: r["speedup_vs_default"] for r in results["rows"] if r["batch"] == b}
              for b in sorted({r["batch"] for r in results["rows"]})}
    bar_chart(out.with_suffix(".png"), groups, "speed-up vs default sampler (same run)", "x", reference_line=1.0)


def build_parser() -> argparse.ArgumentParser:
    from training.errors import make_parser

    p = make_parser(description=__doc__)
    p.add_argument("--vae", default=str(SHIPPED / "tokenizer.safetensors"))
    p.add_argument("--var", default=str(SHIPPED / "var_drafter.safetensors"))
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="extra model for samplers that need one (with --official-shape: NAME=var_d16 etc.)")
    p.add_argument("--official-shape", default=None, help="benchmark a randomly initialised registry size instead")
    p.add_argument("--samplers", default="default",
                   help="comma-separated sampler names; with options use ';' between samplers: "
                        "'default;code:draft_scales=3,refiner_top_k=0'")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-matmul-size", type=int, default=2048, help="side of the square matmuls timing the peak")
    p.add_argument("--no-decode", action="store_true",
                   help="time token generation only (no PSNR column; not comparable with the reference loop)")
    p.add_argument("--proxy-classifier", default=None,
                   help="add offline proxy quality (e.g. eval/weights/fmnist_classifier.safetensors)")
    p.add_argument("--proxy-data", default="/usr/share/datasets/fashion-mnist", help="real Fashion-MNIST folder")
    p.add_argument("--quality-images", type=int, default=500, help="images per sampler for the proxy column")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--reference-checkout", default=None,
                   help="path to a checkout of the public VAR repository: also time its sampling loop")
    p.add_argument("--out", default="benchmarks/results/benchmark", help="output path without extension")
    p.add_argument("--markdown", default=None, metavar="JSON", help="only print the Markdown table of a result file")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    with torch.no_grad():
        results = run(args)
    write_outputs(results, Path(args.out))
    print(markdown_table(results))


if __name__ == "__main__":
    import sys

    from training.errors import run_cli

    sys.exit(run_cli(main))

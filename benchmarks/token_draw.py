"""Micro-benchmark: token drawing, rng="reference" vs rng="fast", and the tokenizer decoder's memory format.

    OMP_NUM_THREADS=1 python -m benchmarks.token_draw                      # both sections, < 90 s on one core
    OMP_NUM_THREADS=1 python -m benchmarks.token_draw --official-batches 1 2 4 8   # the slow 256 px decoder

Draw section: guided logits (rows, l, V) for every VAR scale (l = pn*pn for the 256 px patch numbers) and
rows in --rows, with the two settings that matter (V=4096 top_k=900 top_p=0.96: the official models; V=512
top_k=0 top_p=0: the shipped fmnist models). Decoder section: the shipped tokenizer and an official-shape
decoder (random weights, 256 px) in the default NCHW layout and in channels_last, with the largest image
difference between the two. Variants are timed interleaved (A B A B ...) and the median of each is kept,
so load from other processes hits both alike. Writes JSON and a PNG (matplotlib; skipped without it).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from samplers.logits_processing import draw_tokens
from tokenizers import VQVAE
from tokenizers.config import official_vqvae_config
from training.atomic import atomic_write_json
from training.checkpoint import load_any

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DRAW_SETTINGS = ({"vocab": 4096, "top_k": 900, "top_p": 0.96}, {"vocab": 512, "top_k": 0, "top_p": 0.0})
SHIPPED_TOKENIZER = "checkpoints/fmnist/tokenizer.safetensors"


def interleaved_medians(variants: dict, repeats: int, budget_s: float = 0.25, max_repeats: int = 25) -> dict:
    """Median seconds of each callable, run A B A B ... Fast shapes (under `budget_s` a call) get an untimed
    warm-up round and more rounds, up to `max_repeats`, since timer noise and one-off set-up hit them most;
    slow ones count their first round (set-up is negligible there) and get `repeats` rounds in all."""
    first = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    slow = max(first.values()) >= budget_s
    times = {name: [first[name]] if slow else [] for name in variants}
    rounds = repeats - 1 if slow else max(repeats, min(max_repeats, int(budget_s / max(max(first.values()), 1e-6))))
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_draw(rows_list, repeats: int, seed: int) -> list[dict]:
    results = []
    for setting in DRAW_SETTINGS:
        V, k, p = setting["vocab"], setting["top_k"], setting["top_p"]
        for rows in rows_list:
            for pn in VAR_PATCH_NUMS:
                l = pn * pn
                x = torch.randn(rows, l, V, generator=torch.Generator().manual_seed(seed + l)) * 2.5
                # Both get a fresh copy: the reference filters its input in place.
                variants = {mode: (lambda mode=mode: draw_tokens(x.clone(), k, p, 1.0,
                                                                 torch.Generator().manual_seed(seed), rng=mode))
                            for mode in ("reference", "fast")}
                t = interleaved_medians(variants, repeats)
                results.append({**setting, "rows": rows, "tokens": l, "reference_s": t["reference"],
                                "fast_s": t["fast"], "ratio": t["reference"] / t["fast"]})
                print(f"V={V} k={k} p={p} rows={rows:2d} l={l:3d}: reference {t['reference'] * 1e3:8.3f} ms  "
                      f"fast {t['fast'] * 1e3:8.3f} ms  x{t['reference'] / t['fast']:.2f}", flush=True)
    return results


def pass_totals(results: list[dict]) -> list[dict]:
    """Per (setting, rows): the sum over the ten scales, i.e. the drawing time of one sampling pass."""
    totals = {}
    for r in results:
        key = (r["vocab"], r["top_k"], r["top_p"], r["rows"])
        ref, fast = totals.get(key, (0.0, 0.0))
        totals[key] = (ref + r["reference_s"], fast + r["fast_s"])
    return [{"vocab": V, "top_k": k, "top_p": p, "rows": rows, "reference_s": ref, "fast_s": fast,
             "ratio": ref / fast} for (V, k, p, rows), (ref, fast) in totals.items()]


def bench_decoder(vae: VQVAE, name: str, batches, repeats: int, seed: int, warmup: bool = True,
                  float64_truth: bool = False) -> list[dict]:
    """NCHW vs channels_last (the weights and the input converted; the conversion itself is not timed).
    float64_truth: also each layout's largest error against a float64 NCHW decode (slow: one more pass)."""
    vae = vae.eval()
    side = vae.patch_nums[-1]
    layouts = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    out = []
    for batch in batches:
        f_hat = torch.randn(batch, vae.z_channels, side, side, generator=torch.Generator().manual_seed(seed))
        times = {label: [] for label in layouts}
        images = {}
        with torch.no_grad():
            for round_ in range(repeats + int(warmup)):
                for label, fmt in layouts.items():
                    vae.to(memory_format=fmt)
                    x = f_hat.to(memory_format=fmt)
                    start = time.perf_counter()
                    images[label] = vae.fhat_to_img(x)
                    if round_ >= int(warmup):  # the untimed first round pays one-off kernel set-up
                        times[label].append(time.perf_counter() - start)
        vae.to(memory_format=torch.contiguous_format)
        max_diff = (images["nchw"] - images["channels_last"]).abs().max().item()
        t = {k: statistics.median(v) for k, v in times.items()}
        row = {"decoder": name, "batch": batch, "image_size": images["nchw"].shape[-1], "nchw_s": t["nchw"],
               "channels_last_s": t["channels_last"], "speedup": t["nchw"] / t["channels_last"],
               "max_abs_diff": max_diff, "repeats": repeats}
        if float64_truth:
            with torch.no_grad():
                truth = vae.double().fhat_to_img(f_hat.double())
            vae.float()
            for label, img in images.items():
                row[f"{label}_max_err_vs_float64"] = (img.double() - truth).abs().max().item()
        out.append(row)
        print(f"decoder {name} batch {batch}: NCHW {t['nchw']:.3f} s  channels_last {t['channels_last']:.3f} s  "
              f"x{t['nchw'] / t['channels_last']:.2f}  max |diff| {max_diff:.2e}", flush=True)
    return out


def save_plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib to get one)")
        return None
    draws = result["draw"]
    settings = [s for s in DRAW_SETTINGS if any(r["vocab"] == s["vocab"] for r in draws)]
    decoders = result["decoder"]
    fig, axes = plt.subplots(1, len(settings) + (1 if decoders else 0), figsize=(6 * (len(settings) + 1), 4.2),
                             squeeze=False)
    for ax, s in zip(axes[0], settings):
        for rows in sorted({r["rows"] for r in draws}):
            rs = [r for r in draws if r["vocab"] == s["vocab"] and r["rows"] == rows]
            ax.plot([r["tokens"] for r in rs], [r["ratio"] for r in rs], marker="o", label=f"{rows} rows")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("tokens per scale (l)")
        ax.set_ylabel("reference time / fast time")
        ax.set_title(f"V={s['vocab']} top_k={s['top_k']} top_p={s['top_p']}")
        ax.legend()
    if decoders:
        ax = axes[0][-1]
        labels = [f"{d['decoder']}\nbatch {d['batch']}\nmax |diff| {d['max_abs_diff']:.1e}" for d in decoders]
        bars = ax.bar(labels, [d["speedup"] for d in decoders], color="#2ca02c")
        ax.bar_label(bars, fmt="%.2f")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("NCHW time / channels_last time")
        ax.set_title("tokenizer decoder, channels_last")
    fig.suptitle(f"token drawing and decoding on CPU, {result['threads']} thread(s), "
                 f"median of >= {result['repeats']} interleaved rounds")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 16],
                    help="guided rows (images) per scale; 2 and 16 keep the default run under 90 s on one core")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer-batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--official-batches", type=int, nargs="*", default=[1],
                    help="official-shape 256 px decoder batches (about 15 s per image per layout on one core)")
    ap.add_argument("--official-repeats", type=int, default=1)
    ap.add_argument("--float64-truth", action="store_true",
                    help="also measure each decoder layout's error against a float64 decode (one slow pass more)")
    ap.add_argument("--skip-draw", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/token_draw_cpu.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".json":
        raise SystemExit(f"--out must end in .json (the PNG goes next to it), got {out}")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    draw = [] if args.skip_draw else bench_draw(args.rows, args.repeats, args.seed)
    decoder = []
    if args.tokenizer_batches:
        if not Path(SHIPPED_TOKENIZER).is_file():
            raise SystemExit(f"{SHIPPED_TOKENIZER} is missing; pass --tokenizer-batches with no value to skip it")
        decoder += bench_decoder(load_any(SHIPPED_TOKENIZER, "vqvae"), "fmnist tokenizer", args.tokenizer_batches,
                                 args.repeats, args.seed, float64_truth=args.float64_truth)
    if args.official_batches:
        torch.manual_seed(args.seed)
        decoder += bench_decoder(VQVAE(official_vqvae_config()), "official shape (random)", args.official_batches,
                                 args.official_repeats, args.seed, warmup=False, float64_truth=args.float64_truth)
    result = {"threads": torch.get_num_threads(), "repeats": args.repeats, "official_repeats": args.official_repeats,
              "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
              "processor": platform.processor(), "command": "python -m benchmarks.token_draw " + " ".join(argv or sys.argv[1:]),
              "wall_s": time.perf_counter() - start, "draw": draw, "draw_pass_totals": pass_totals(draw),
              "decoder": decoder}
    atomic_write_json(out, result)
    png = save_plot(result, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {png}" if png else "") + f" in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

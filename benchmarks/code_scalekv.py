"""Benchmark CoDe and ScaleKV: speed, KV bytes and image consistency, as ratios measured in the same run.

  # shipped Fashion-MNIST pair (or any tokenizer/drafter/refiner checkpoints)
  python benchmarks/code_scalekv.py --tokenizer checkpoints/fmnist/tokenizer.safetensors \
      --drafter checkpoints/fmnist/var_drafter.safetensors --refiner checkpoints/fmnist/var_refiner.safetensors \
      --out benchmarks/results/code_scalekv_fmnist.json
  # randomly initialised official shapes (d16 refiner + d20/d24 drafters), speed only, CPU-friendly
  python benchmarks/code_scalekv.py --official-only --out benchmarks/results/code_official_shapes_cpu.json

Quality section: (a) CoDe for several N vs drafter-only sampling: speed ratio, KV bytes, and
consistency (PSNR/SSIM vs the drafter's own images, same per-image seeds); (b) ScaleKV / SnapKV-uniform /
sliding window at budgets of the peak cache, on the drafter: KV bytes, PSNR/SSIM vs the uncompressed
model with the same seeds, speed; (c) CoDe x ScaleKV. Optional proxy scores (eval/proxy.py classifier).
Times: generation loop only (decoder excluded, CoDe convention), best of --repeats. Without checkpoint
paths, random tiny models are used (numbers then only exercise the code).
Writes the JSON (atomic) and a PNG plot (PIL) next to it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere inside the repo

from samplers import DefaultSampler  # noqa: E402
from samplers.scalekv.calibration import calibrate, save_calibration  # noqa: E402
from samplers.code.sampler import CoDeSampler  # noqa: E402
from samplers.scalekv.policies import peak_cache_len  # noqa: E402
from samplers.scalekv.sampler import ScaleKVSampler, build_policy  # noqa: E402
from tokenizers import VQVAE, VQVAEConfig  # noqa: E402
from var import VAR  # noqa: E402
from var.config import VARConfig, var_config  # noqa: E402
from benchmarks.plot import save_plot  # noqa: E402
from eval.tokenizer_metrics import psnr as tm_psnr, ssim as tm_ssim  # noqa: E402


# ---- image consistency (per-image metrics of eval/tokenizer_metrics.py, averaged) ------------------------
def psnr(a_N3HW: torch.Tensor, b_N3HW: torch.Tensor) -> float:
    """Mean PSNR (data range 1); identical images count as 100 dB so that the mean stays finite."""
    return float(tm_psnr(a_N3HW, b_N3HW).clamp_max(100.0).mean())


def ssim(a_N3HW: torch.Tensor, b_N3HW: torch.Tensor) -> float:
    return float(tm_ssim(a_N3HW, b_N3HW, win_size=min(11, *a_N3HW.shape[-2:]) | 1).mean())


# ---- running one configuration -----------------------------------------------------------------------
def run_config(sampler, labels_N: torch.Tensor, seeds: list[int], batch: int, repeats: int, sampling: dict) -> dict:
    """Generate all images in batches (per-image seeds); time = best total over repeats, decoder excluded."""
    best, out_fhat, stats = float("inf"), [], None
    for rep in range(repeats):
        total, fhats, per_batch = 0.0, [], []
        for i in range(0, len(labels_N), batch):
            out = sampler.sample(labels_N[i:i + batch], seed=seeds[i:i + batch], decode=False, **sampling)
            total += out.stats.wall_time_s
            fhats.append(out.f_hat)
            per_batch.append(out.stats)
        if total < best:
            best, out_fhat, stats = total, fhats, per_batch
    s = stats[0]
    after = s.extra.get("kv_bytes_after_compression")
    rec = {"time_s": best, "images": len(labels_N), "forwards": s.forwards, "tokens_processed": s.tokens_processed,
           "kv_bytes_peak": s.kv_bytes_peak, "kv_bytes_per_scale": s.kv_bytes_per_scale,
           "kv_bytes_kept_peak": max(after[:-1]) if after else None,  # history held between scales
           "cuda_max_memory_allocated": s.cuda_max_memory_allocated, "first_batch_rows": int(min(batch, len(labels_N)))}
    with torch.no_grad():
        rec["_images"] = torch.cat([sampler.decode(f) for f in out_fhat]).cpu()
    return rec


def compare(rec: dict, ref: dict, proxy=None, labels_N=None) -> None:
    rec["speed_ratio"] = ref["time_s"] / rec["time_s"]
    rec["kv_peak_ratio"] = rec["kv_bytes_peak"] / ref["kv_bytes_peak"]
    if rec.get("kv_bytes_kept_peak") is not None:
        full_kept = ref["kv_bytes_per_scale"][-2]  # the uncompressed cache before the last map
        rec["kv_kept_ratio"] = rec["kv_bytes_kept_peak"] / full_kept
    rec["psnr_db"] = psnr(rec["_images"], ref["_images"])
    rec["ssim"] = ssim(rec["_images"], ref["_images"])
    if proxy is not None:
        rec.update(proxy(rec["_images"], labels_N, ref["_images"]))
        if "proxy_fd_vs_reference" in rec and ref.get("proxy_fd_vs_reference"):
            rec["proxy_fd_cost_vs_baseline"] = rec["proxy_fd_vs_reference"] / ref["proxy_fd_vs_reference"] - 1


def make_proxy(classifier_path: str | None, ref_stats_path: str | None):
    """Proxy scores (eval/ harness): classifier accuracy, proxy-FD vs reference stats (or vs the baseline)."""
    if not classifier_path:
        return None
    import numpy as np
    from eval.data import load_ref_stats
    from eval.features import extract_from_tensors
    from eval.frechet import GaussianStats, feature_stats, frechet_distance_stats
    from eval.metrics import classifier_accuracy
    from eval.proxy import load_classifier

    net = load_classifier(classifier_path)
    ref = load_ref_stats(ref_stats_path) if ref_stats_path else None

    def score(images, labels_N, baseline_images):
        feats = extract_from_tensors(net, images)
        out = {"proxy_accuracy": classifier_accuracy(feats["logits"], labels_N.numpy())}
        mine = feature_stats(feats["pool"])
        if ref is not None:
            theirs = GaussianStats(ref.get("mu").astype(np.float64), ref.get("sigma").astype(np.float64), 0)
            out["proxy_fd_vs_reference"] = frechet_distance_stats(mine, theirs)
        base = feature_stats(extract_from_tensors(net, baseline_images)["pool"])
        out["proxy_fd_vs_baseline"] = frechet_distance_stats(mine, base)
        return out
    return score


def quality_section(vae, drafter, refiner, args, out_path: Path) -> dict:
    K = drafter.num_scales
    n = args.images
    labels_N = torch.arange(n) % drafter.num_classes
    seeds = list(range(n))
    sampling = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    proxy = make_proxy(args.proxy_classifier, args.proxy_ref)

    def run(sampler):
        return run_config(sampler, labels_N, seeds, args.batch, args.repeats, sampling)

    base = run(DefaultSampler(drafter, vae))
    compare(base, base, proxy, labels_N)
    refiner_only = run(DefaultSampler(refiner, vae))
    compare(refiner_only, base, proxy, labels_N)
    code = {}
    for N in args.draft_scales or range(1, K):
        rec = run(CoDeSampler(drafter, vae, refiner=refiner, draft_scales=N))
        compare(rec, base, proxy, labels_N)
        code[str(N)] = rec
        print(f"CoDe N={N}: {rec['speed_ratio']:.2f}x, KV {rec['kv_peak_ratio']:.2f}, PSNR {rec['psnr_db']:.1f}", flush=True)

    cal = {}
    for name, model in (("drafter", drafter), ("refiner", refiner)):
        path = out_path.with_name(f"{out_path.stem}_calibration_{name}.json")
        labels = torch.linspace(0, model.num_classes - 1, min(10, model.num_classes)).round().long()
        save_calibration(calibrate(model, vae, labels, seeds=[0], drafter_frac=args.drafter_frac, cfg=args.cfg), path)
        cal[name] = str(path)
    # stability of the identification (spec 2.8-4): 1 calibration seed vs 4 seeds, Jaccard of the drafter sets
    labels = torch.linspace(0, drafter.num_classes - 1, min(10, drafter.num_classes)).round().long()
    one = {tuple(x) for x in json.loads(Path(cal["drafter"]).read_text())["drafters"]}
    four = {tuple(x) for x in calibrate(drafter, vae, labels, seeds=[0, 1, 2, 3], drafter_frac=args.drafter_frac,
                                        cfg=args.cfg)["drafters"]}
    stability = {"drafters_1_seed": sorted(one), "drafters_4_seeds": sorted(four),
                 "jaccard": len(one & four) / max(1, len(one | four))}
    kv = {}
    for frac in args.budgets:
        for policy in args.policies:
            pol = build_policy(policy, drafter, frac, cal["drafter"])
            rec = run(ScaleKVSampler(drafter, vae, policy=pol))
            compare(rec, base, proxy, labels_N)
            rec["budget_tokens"] = round(frac * peak_cache_len(drafter.patch_nums))
            kv[f"{policy}@{frac:g}"] = rec
            print(f"{policy}@{frac:g}: KV kept {rec.get('kv_kept_ratio', 1):.2f}, PSNR {rec['psnr_db']:.1f}, "
                  f"speed {rec['speed_ratio']:.2f}x", flush=True)
    N_mid = args.compose_n if args.compose_n is not None else max(1, K - 3)
    plain = code.get(str(N_mid)) or run(CoDeSampler(drafter, vae, refiner=refiner, draft_scales=N_mid))
    composed = run(CoDeSampler(drafter, vae, refiner=refiner, draft_scales=N_mid, kv_policy="scalekv",
                               kv_budget_frac=args.compose_budget, drafter_calibration=cal["drafter"],
                               refiner_calibration=cal["refiner"]))
    compare(composed, base, proxy, labels_N)
    composed["psnr_db_vs_code_uncompressed"] = psnr(composed["_images"], plain["_images"])
    composed["ssim_vs_code_uncompressed"] = ssim(composed["_images"], plain["_images"])
    composed.update(draft_scales=N_mid, budget_frac=args.compose_budget)
    return {"baseline_drafter_only": base, "refiner_only": refiner_only, "code": code, "kv_compression": kv,
            "code_x_scalekv": composed, "calibration_files": cal, "calibration_stability": stability, "images": n, "batch": args.batch,
            "sampling": sampling, "patch_nums": list(drafter.patch_nums),
            "peak_cache_len": peak_cache_len(drafter.patch_nums)}


# ---- randomly initialised official shapes (speed only) -----------------------------------------------
def official_section(args) -> dict:
    vae = VQVAE(VQVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).eval()  # only the quantizer is used
    torch.manual_seed(0)
    refiner = VAR(var_config("var_d16")).eval()
    sampling = dict(cfg=1.5, top_k=900, top_p=0.96)
    out = {"refiner": "var_d16", "note": "random init; speed/KV only (decoder excluded); CPU, 1 thread"}

    def timed(sampler, B):
        best, stats = float("inf"), None
        for _ in range(args.official_repeats):
            s = sampler.sample(torch.arange(B) % 1000, seed=0, decode=False, **sampling).stats
            if s.wall_time_s < best:
                best, stats = s.wall_time_s, s
        return {"time_s": best, "kv_bytes_peak": stats.kv_bytes_peak, "forwards": stats.forwards,
                "tokens_processed": stats.tokens_processed, "cuda_max_memory_allocated": stats.cuda_max_memory_allocated}

    for B in args.official_batches:
        res = {"refiner_only": timed(DefaultSampler(refiner, vae), B)} if B == 1 else {}
        for name in (args.official_drafters if B == 1 else args.official_large_batch_drafters):
            torch.manual_seed(1)
            drafter = VAR(var_config(name)).eval()
            base = timed(DefaultSampler(drafter, vae), B)
            row = {"drafter_only": base}
            for N in args.official_draft_scales:
                if B > 1 and N != args.official_draft_scales[0] and args.official_fast:
                    continue
                rec = timed(CoDeSampler(drafter, vae, refiner=refiner, draft_scales=N), B)
                rec["speed_ratio"] = base["time_s"] / rec["time_s"]
                rec["kv_peak_ratio"] = rec["kv_bytes_peak"] / base["kv_bytes_peak"]
                row[f"code_N{N}"] = rec
                print(f"official B={B} {name} N={N}: {rec['speed_ratio']:.2f}x", flush=True)
            res[name] = row
            del drafter
            gc.collect()
        out[f"batch_{B}"] = res
    if args.official_scalekv:  # selection overhead at the real shapes: d16 at 35 % vs uncompressed, batch 1
        path = Path(args.out).with_name("scalekv_calibration_official_d16_random.json")
        save_calibration(calibrate(refiner, vae, [0, 500], seeds=[0], cfg=1.5, top_k=900, top_p=0.96), path)
        base = timed(DefaultSampler(refiner, vae), 1)
        rec = timed(ScaleKVSampler(refiner, vae, policy="scalekv", budget_frac=0.35, calibration=str(path)), 1)
        rec["speed_ratio"] = base["time_s"] / rec["time_s"]
        rec["kv_peak_ratio"] = rec["kv_bytes_peak"] / base["kv_bytes_peak"]
        out["scalekv_d16_batch_1"] = {"uncompressed": base, "scalekv@0.35": rec}
    return out


def random_tiny_models():
    pn = (1, 2, 3, 4, 5, 6, 8)
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=pn)).eval()
    cfg = dict(num_classes=10, patch_nums=pn, vocab_size=64, z_channels=8, cond_drop_rate=0.0)
    models = [VAR(VARConfig(depth=6, embed_dim=192, num_heads=6, **cfg)), VAR(VARConfig(depth=3, embed_dim=96, num_heads=3, **cfg))]
    with torch.no_grad():  # the init's 1e-5 AdaLN gammas make attention irrelevant; perturb like the tests
        for m in models:
            for prm in m.parameters():
                prm.add_(torch.randn_like(prm) * 0.1)
    return vae, models[0].eval(), models[1].eval()


def strip_images(obj):
    if isinstance(obj, dict):
        return {k: strip_images(v) for k, v in obj.items() if not k.startswith("_")}
    return obj


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer"), p.add_argument("--drafter"), p.add_argument("--refiner")
    p.add_argument("--out", default="benchmarks/results/code_scalekv.json")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cfg", type=float, default=1.5), p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--draft-scales", type=int, nargs="*", help="CoDe N values (default: 1..K-1)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    p.add_argument("--policies", nargs="+", default=["scalekv", "snapkv", "window"])
    p.add_argument("--drafter-frac", type=float, default=0.08)
    p.add_argument("--compose-n", type=int), p.add_argument("--compose-budget", type=float, default=0.35)
    p.add_argument("--proxy-classifier", help="eval/proxy.py classifier for proxy scores (optional)")
    p.add_argument("--proxy-ref", help="reference statistics .npz for proxy-FD (optional)")
    p.add_argument("--official", action="store_true", help="also time random official shapes")
    p.add_argument("--official-only", action="store_true")
    p.add_argument("--official-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--official-drafters", nargs="+", default=["var_d20", "var_d24"])
    p.add_argument("--official-draft-scales", type=int, nargs="+", default=[6, 8])
    p.add_argument("--official-repeats", type=int, default=1)
    p.add_argument("--official-fast", action="store_true", help="batch > 1: only the first N value")
    p.add_argument("--official-large-batch-drafters", nargs="+", default=["var_d20", "var_d24"],
                   help="drafters timed at batch > 1 (slow on CPU)")
    p.add_argument("--official-scalekv", action="store_true", help="also time ScaleKV on the d16 shape")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": "cuda" if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
              "torch": torch.__version__, "threads": args.threads, "argv": sys.argv[1:] if argv is None else argv}
    with torch.no_grad():
        if not args.official_only:
            from training.checkpoint import load_any
            if args.tokenizer and args.drafter and args.refiner:
                vae = load_any(args.tokenizer, "vqvae").eval()
                drafter = load_any(args.drafter, "var", patch_nums=vae.patch_nums).eval()
                refiner = load_any(args.refiner, "var", patch_nums=vae.patch_nums).eval()
                result["models"] = {"tokenizer": args.tokenizer, "drafter": args.drafter, "refiner": args.refiner}
            elif args.tokenizer or args.drafter or args.refiner:
                raise SystemExit("give all of --tokenizer, --drafter and --refiner, or none (random tiny models)")
            else:
                vae, drafter, refiner = random_tiny_models()
                result["models"] = "random tiny models (exercise only; numbers carry no quality meaning)"
            result["quality"] = quality_section(vae, drafter, refiner, args, out_path)
        if args.official or args.official_only:
            result["official_shapes"] = official_section(args)
    result = strip_images(result)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_path)
    png = save_plot(result, out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {png}")
    return out_path


if __name__ == "__main__":
    main()

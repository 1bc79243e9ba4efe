"""ScaleKV against its equal-budget baselines (SnapKV-style uniform selection, sliding window): output quality
with 95 % intervals, as the ScaleKV paper measures it (consistency with the uncompressed model's own images on
the same seeds) plus proxy FD against real data where an offline proxy exists.

Per budget fraction and policy, on the same labels and per-image seeds as the uncompressed default sampler:
  PSNR (dB, per image, vs the uncompressed image), token agreement (fraction of the 680 / 130 tokens equal),
  both with t intervals and a paired bootstrap interval of ScaleKV minus each baseline (significant when it
  excludes 0); KV bytes kept; and on the shipped Fashion-MNIST drafter the proxy FD (basic bootstrap) and
  proxy accuracy (Wilson). `--official-shape` runs a random-weight model on the official 10-scale schedule
  (caches of up to 424 entries) with a small random tokenizer, so only PSNR / agreement are meaningful there.

  python -m benchmarks.scalekv_quality --out benchmarks/results/scalekv_quality_fmnist
  python -m benchmarks.scalekv_quality --official-shape --images 200 --out benchmarks/results/scalekv_quality_10scale
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.data import fashion_mnist_uint8
from eval.features import extract_from_tensors
from eval.frechet import feature_stats, frechet_distance_stats
from eval.intervals import fd_bootstrap_ci, mean_ci, paired_difference_ci, significantly_different, wilson_ci
from eval.proxy import load_classifier
from samplers import build_sampler
from samplers.scalekv.calibration import calibrate, save_calibration
from samplers.seeding import image_seed
from tokenizers import VQVAE, VQVAEConfig
from training.checkpoint import load_any
from benchmarks.results_io import replace_block, write_result
from training.errors import make_parser, run_cli
from training.images import psnr
from var import VAR, VARConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "fmnist"
POLICIES = ("scalekv", "snapkv", "window")
OFFICIAL_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def official_shape_pair(seed: int = 0) -> tuple[VAR, VQVAE]:
    """Random weights on the official 10-scale schedule: depth 8, width 256; a 64 px tokenizer (4x down)."""
    torch.manual_seed(seed)
    vae = VQVAE(VQVAEConfig(vocab_size=4096, z_channels=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                            patch_nums=OFFICIAL_PN)).eval()
    var = VAR(VARConfig(num_classes=10, depth=8, embed_dim=256, num_heads=4, patch_nums=OFFICIAL_PN,
                        vocab_size=4096, z_channels=32, cond_drop_rate=0.0, drop_path_rate=0.0)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from the reference init, whose ~1e-5 block gates would hide attention structure
        for p in var.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return var, vae


def generate(sampler, labels_N: torch.Tensor, seeds: list[int], batch: int, settings: dict, desc: str):
    images, tokens, kv = [], [], []
    for i in tqdm(range(0, len(labels_N), batch), desc=desc, leave=False):
        out = sampler.sample(labels_N[i:i + batch], seed=seeds[i:i + batch], **settings)
        images.append(out.images.clamp(0, 1))
        tokens.append(torch.cat(out.tokens, dim=1))
        kv.append(out.stats.extra.get("kv_bytes_after_compression", [out.stats.kv_bytes_peak]))
    return torch.cat(images), torch.cat(tokens), kv


def proxy_scores(net, ref_feats: np.ndarray, images_N3HW: torch.Tensor, labels_N: torch.Tensor) -> dict:
    feats = extract_from_tensors(net, images_N3HW, keys=("pool", "logits"))
    fd = fd_bootstrap_ci(feats["pool"], ref_feats)
    estimate = frechet_distance_stats(feature_stats(feats["pool"]), feature_stats(ref_feats))
    correct = int((feats["logits"].argmax(-1) == labels_N.numpy()).sum())
    return {"proxy_fd": estimate, "proxy_fd_ci": [fd["low"], fd["high"]],
            "proxy_accuracy": correct / len(labels_N),
            "proxy_accuracy_ci": [(w := wilson_ci(correct, len(labels_N)))["low"], w["high"]]}


def run(args) -> dict:
    torch.set_num_threads(args.num_threads)
    if args.official_shape:
        var, vae = official_shape_pair(args.seed)
        cal_path = Path(args.out).with_name(Path(args.out).name + "_calibration.json")
        save_calibration(calibrate(var, vae, torch.arange(10), seeds=[0]), cal_path)
        net = None
    else:
        vae = load_any(SHIPPED / "tokenizer.safetensors", "vqvae")
        var = load_any(SHIPPED / "var_drafter.safetensors", "var")
        cal_path = SHIPPED / "scalekv_drafter.json"
        net = load_classifier(ROOT / "eval" / "weights" / "fmnist_classifier.safetensors")
    n = args.images
    labels_N = torch.arange(n) % var.num_classes  # class-balanced
    seeds = [image_seed(args.seed, i) for i in range(n)]
    settings = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    base_img, base_tok, base_kv = generate(build_sampler("default", var=var, vae=vae), labels_N, seeds, args.batch,
                                           settings, "uncompressed")
    result = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "model": "random official-shape (depth 8, width 256, 10 scales)" if args.official_shape
                       else str((SHIPPED / "var_drafter.safetensors").relative_to(ROOT)),
                       "calibration": str(cal_path), "images": n, "settings": settings, "seed": args.seed,
                       "peak_kv_bytes_uncompressed": max(max(k) for k in base_kv)},
              "rows": []}
    ref_feats = None
    if net is not None:
        real, _, _ = fashion_mnist_uint8("/usr/share/datasets/fashion-mnist", "test", net.config.real_image_size,
                                         net.config.pad_small)  # the classifier's own real-image layout
        real_N3HW = torch.from_numpy(real).permute(0, 3, 1, 2).float().div(255)
        ref_feats = extract_from_tensors(net, real_N3HW, keys=("pool",))["pool"]
        result["meta"]["uncompressed"] = proxy_scores(net, ref_feats, base_img, labels_N)
    for frac in args.budgets:
        per_policy = {}
        for policy in POLICIES:
            kw = dict(policy=policy, budget_frac=frac)
            if policy == "scalekv":
                kw["calibration"] = str(cal_path)
            img, tok, kv = generate(build_sampler("scalekv", var=var, vae=vae, **kw), labels_N, seeds, args.batch,
                                    settings, f"{policy}@{frac}")
            psnr_N = psnr(img, base_img).numpy()
            agree_N = (tok == base_tok).float().mean(1).numpy()
            row = {"policy": policy, "budget_frac": frac, "psnr_db": float(np.mean(psnr_N[np.isfinite(psnr_N)])),
                   "psnr_ci": [(c := mean_ci(psnr_N))["low"], c["high"]], "token_agreement": float(agree_N.mean()),
                   "token_agreement_ci": [(c := mean_ci(agree_N))["low"], c["high"]],
                   # the cache carried to a later scale: the one after the last scale is never reused or compressed
                   "kv_bytes_after_compression_max": max(max(k[:-1] or k) for k in kv)}
            if net is not None:
                row.update(proxy_scores(net, ref_feats, img, labels_N))
            per_policy[policy] = (row, np.where(np.isfinite(psnr_N), psnr_N, 100.0), agree_N)
            result["rows"].append(row)
        sk = per_policy["scalekv"]
        for other in ("snapkv", "window"):
            ob = per_policy[other]
            sk[0][f"psnr_minus_{other}_ci"] = paired_difference_ci(sk[1], ob[1])
            sk[0][f"agreement_minus_{other}_ci"] = paired_difference_ci(sk[2], ob[2])
            if net is not None:
                sk[0][f"proxy_fd_differs_from_{other}"] = significantly_different(
                    dict(zip(("low", "high"), sk[0]["proxy_fd_ci"])), dict(zip(("low", "high"), ob[0]["proxy_fd_ci"])))
    return result


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"ScaleKV vs equal-budget baselines, {m['images']} class-balanced images, model {m['model']}, "
             f"cfg {m['settings']['cfg']}, top-k {m['settings']['top_k']}, top-p {m['settings']['top_p']} "
             f"(95 % intervals; Δ = ScaleKV minus the baseline, paired over images, * = excludes 0).", ""]
    proxy = "proxy_fd" in result["rows"][0]
    head = "| budget | policy | PSNR vs full (dB) | token agreement | Δ PSNR | Δ agreement |" + (" proxy FD | proxy acc. |" if proxy else "")
    lines += [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in result["rows"]:
        def ci(key):
            lo, hi = r[key]
            return f"[{lo:.3f}, {hi:.3f}]" if key.startswith("token") else f"[{lo:.2f}, {hi:.2f}]"
        deltas = ["", ""]
        if r["policy"] == "scalekv":
            deltas = [" / ".join(f"{o[:4]} {d['low']:+.2f}..{d['high']:+.2f}{'*' if d['significant'] else ''}"
                                 for o in ("snapkv", "window") for d in [r[f"{k}_minus_{o}_ci"]])
                      for k in ("psnr", "agreement")]
        cells = [f"{r['budget_frac']:.0%}", f"`{r['policy']}`", f"{r['psnr_db']:.2f} {ci('psnr_ci')}",
                 f"{r['token_agreement']:.3f} {ci('token_agreement_ci')}", deltas[0], deltas[1]]
        if proxy:
            cells += [f"{r['proxy_fd']:.1f} {ci('proxy_fd_ci')}", f"{r['proxy_accuracy']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    if "uncompressed" in m:
        u = m["uncompressed"]
        lines += ["", f"Uncompressed: proxy FD {u['proxy_fd']:.1f} [{u['proxy_fd_ci'][0]:.1f}, {u['proxy_fd_ci'][1]:.1f}], "
                      f"proxy accuracy {u['proxy_accuracy']:.1%}."]
    return "\n".join(lines) + "\n"


README_RESULTS = ("scalekv_quality_fmnist.json", "scalekv_quality_10scale.json")
MARKERS = ("<!-- scalekv-quality:start -->", "<!-- scalekv-quality:end -->")


def readme_block(results_dir: Path = ROOT / "benchmarks" / "results") -> str:
    """The README's ScaleKV quality tables, generated from the committed result JSON."""
    parts = [MARKERS[0], "<!-- generated by `python -m benchmarks.scalekv_quality --readme` from "
             + ", ".join(f"benchmarks/results/{n}" for n in README_RESULTS) + " -->"]
    for name in README_RESULTS:
        path = results_dir / name
        if path.is_file():
            parts.append(markdown(json.loads(path.read_text())).rstrip())
    return "\n\n".join(parts[:2]) + "\n" + "\n\n".join(parts[2:]) + "\n" + MARKERS[1]


def update_readme(readme: Path = ROOT / "README.md") -> None:
    replace_block(readme, MARKERS, readme_block())


def main(argv=None) -> None:
    p = make_parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", action="store_true", help="only regenerate the README block from the committed JSON")
    p.add_argument("--out", help="output stem (writes .json and .md)")
    p.add_argument("--official-shape", action="store_true", help="random official-shape model instead of the shipped one")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.10, 0.25, 0.35, 0.50])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.readme:
        update_readme()
        return
    if not args.out:
        raise ValueError("--out is required (or --readme to regenerate the README block)")
    print(write_result(args.out, run(args), markdown))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""Benchmark Block-SJD: forwards, acceptance per scale and speed ratio vs the default sampler (same run).

  # shipped Fashion-MNIST models (target = the large VAR, drafter = the small refiner)
  python benchmarks/sjd_dd.py --tokenizer checkpoints/fmnist/tokenizer.safetensors \
      --var checkpoints/fmnist/var_drafter.safetensors --draft-model checkpoints/fmnist/var_refiner.safetensors \
      --out benchmarks/results/sjd_fmnist.json
  # random models (no paths): exercises the code; acceptance of random drafters is meaningless
  python benchmarks/sjd_dd.py --out benchmarks/results/sjd_random.json

Part 1, for every batch size and draft source (jacobi, random one-hot, the small VAR drafter, and the
target itself as "ideal coupled drafter", an upper bound on acceptance): exact Block-SJD vs the default
sampler on the same labels/seeds: target forwards, tokens processed, token/block acceptance per scale,
scales committed per pass, wall time (generation loop, decoder excluded, best of --repeats, default and
SJD interleaved) and the speed ratio default / SJD.
Part 2, relaxed (lossy) acceptance modes vs exact Block-SJD on the same seeds: speed ratio, forwards,
token agreement and PSNR of decoded images vs exact, and proxy-classifier accuracy when --classifier is
given. Writes the JSON (atomic) and a PNG plot (PIL) next to it.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere inside the repo

from benchmarks.plotting import bar_panel, save_panels  # noqa: E402
from training.atomic import atomic_write_json  # noqa: E402
from samplers import build_sampler  # noqa: E402
from tokenizers import VQVAE, VQVAEConfig  # noqa: E402
from var import VAR  # noqa: E402
from training.checkpoint import load_any  # noqa: E402
from var.config import VARConfig  # noqa: E402

RELAXED = {"lenient_x2": dict(accept_mode="lenient", lenient_ratio=2.0),
           "lenient_x10": dict(accept_mode="lenient", lenient_ratio=10.0),
           "topk_5": dict(accept_mode="topk", accept_top_k=5),
           "topk_50": dict(accept_mode="topk", accept_top_k=50),
           "stale_5pct": dict(stale_tolerance=0.05),
           "stale_25pct": dict(stale_tolerance=0.25)}


def random_models(seed: int = 0):
    """Small random models with a realistic scale list (uniform-ish logits: acceptance is not informative)."""
    torch.manual_seed(seed)
    pn = (1, 2, 3, 4, 5, 6, 8)
    vae = VQVAE(VQVAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, patch_nums=pn))
    common = dict(num_classes=10, patch_nums=pn, vocab_size=512, z_channels=16, cond_drop_rate=0.0, drop_path_rate=0.0)
    target = VAR(VARConfig(depth=8, embed_dim=256, num_heads=4, **common))
    drafter = VAR(VARConfig(depth=2, embed_dim=128, num_heads=4, **common))
    for m in (target, drafter):  # move off the near-identity init so the logits depend on the input
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return target.eval(), vae.eval(), drafter.eval()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def run(sampler, labels, seeds, batch, sampling, decode=False):
    """All images in batches; returns total loop time, tokens, images and summed counters."""
    total, toks, imgs, agg = 0.0, [], [], {}
    for i in range(0, len(labels), batch):
        out = sampler.sample(labels[i:i + batch], seed=seeds[i:i + batch], decode=False, **sampling)
        total += out.stats.wall_time_s  # generation loop only
        toks.append(torch.cat(out.tokens, 1))
        if decode:
            imgs.append(sampler.decode(out.f_hat))
        st = out.stats
        for k, v in st.forwards.items():
            agg[f"forwards/{k}"] = agg.get(f"forwards/{k}", 0) + v
        for k, v in st.tokens_processed.items():
            agg[f"tokens/{k}"] = agg.get(f"tokens/{k}", 0) + v
        agg["kv_bytes_peak"] = max(agg.get("kv_bytes_peak", 0), st.kv_bytes_peak)
        for k in ("tokens_tested_per_scale", "tokens_accepted_per_scale", "rows_tested_per_scale",
                  "rows_block_accepted_per_scale"):
            if k in st.extra:
                agg[k] = [a + b for a, b in zip(agg.get(k, [0] * len(st.extra[k])), st.extra[k])]
        if "blocks_per_pass" in st.extra:
            agg.setdefault("blocks_per_pass", []).extend(st.extra["blocks_per_pass"])
        if "exact" in st.extra:
            agg["exact"], agg["accept_rule"] = st.extra["exact"], st.extra["accept_rule"]
    return total, torch.cat(toks), (torch.cat(imgs) if decode else None), agg


def rates(agg: dict) -> dict:
    def ratio(num, den):
        return [round(n / d, 4) if d else None for n, d in zip(agg.get(num, []), agg.get(den, []))]
    return {"token_acceptance_per_scale": ratio("tokens_accepted_per_scale", "tokens_tested_per_scale"),
            "block_acceptance_per_scale": ratio("rows_block_accepted_per_scale", "rows_tested_per_scale")}


def timed(samplers_by_name: dict, labels, seeds, batch, sampling, repeats, decode=False) -> dict:
    """Interleave the samplers in every repeat; keep the best loop time of each and the last outputs."""
    best = {k: float("inf") for k in samplers_by_name}
    last = {}
    for _ in range(repeats):
        for name, s in samplers_by_name.items():
            t, toks, imgs, agg = run(s, labels, seeds, batch, sampling, decode)
            best[name] = min(best[name], t)
            last[name] = (toks, imgs, agg)
    return {k: (best[k],) + last[k] for k in samplers_by_name}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer"), ap.add_argument("--var"), ap.add_argument("--draft-model")
    ap.add_argument("--classifier", help="optional proxy classifier (eval/proxy.py) for relaxed-mode quality")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--images", type=int, default=32, help="images per configuration")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=int, default=2), ap.add_argument("--max-spec-tokens", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=1.5), ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/sjd_bench.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.var:
        if not args.tokenizer:
            raise SystemExit("--var needs --tokenizer")
        var = load_any(args.var, "var", device=device).eval()
        vae = load_any(args.tokenizer, "vqvae", device=device, patch_nums=var.patch_nums).eval()
        drafter = load_any(args.draft_model, "var", device=device).eval() if args.draft_model else None
        models = {"var": args.var, "tokenizer": args.tokenizer, "draft_model": args.draft_model}
    else:
        var, vae, drafter = (m.to(device) for m in random_models())
        models = "random (benchmarks/sjd_dd.py random_models)"
    sampling = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    opts = dict(window_scales=args.window, max_spec_tokens=args.max_spec_tokens)
    sources = {"jacobi": dict(draft="jacobi"), "random": dict(draft="random"),
               "ideal_coupled_self": dict(draft="var", draft_model=var)}
    if drafter is not None:
        sources["small_var"] = dict(draft="var", draft_model=drafter)
    default = build_sampler("default", var=var, vae=vae)
    result = {"models": models, "device": str(device), "torch": torch.__version__, "platform": platform.platform(),
              "threads": args.threads, "sampling": sampling, "sjd_options": opts, "patch_nums": list(var.patch_nums),
              "images_per_config": args.images, "repeats": args.repeats, "time": "generation loop, decoder excluded, "
              "best of repeats (default and SJD interleaved); speed.batch_*.default.noise_floor_ratio is the default sampler timed against itself", "speed": {}, "relaxed": {}}
    n = args.images
    labels = torch.arange(n) % var.num_classes
    seeds = list(range(1000, 1000 + n))
    for batch in args.batches:
        runs = {"default": default, "default_control": build_sampler("default", var=var, vae=vae)}
        runs |= {k: build_sampler("sjd", var=var, vae=vae, **v, **opts) for k, v in sources.items()}
        res = timed(runs, labels, seeds, batch, sampling, args.repeats)
        t_def, _, _, agg_def = res["default"]
        # the same default sampler timed as a second entry: its "speed ratio" is the timing noise floor
        row = {"default": {"time_s": t_def, "forwards": agg_def["forwards/var"],
                           "noise_floor_ratio": t_def / res["default_control"][0]}}
        for k in sources:
            t, _, _, agg = res[k]
            row[k] = {"time_s": t, "speed_ratio": t_def / t, "forwards_target": agg["forwards/var"],
                      "forwards_ratio": agg["forwards/var"] / agg_def["forwards/var"],
                      "forwards_draft": agg.get("forwards/draft_var", 0), "tokens_target": agg["tokens/var"],
                      "tokens_draft": agg.get("tokens/draft_var", 0), "kv_bytes_peak": agg["kv_bytes_peak"],
                      "mean_scales_per_pass": sum(agg["blocks_per_pass"]) / len(agg["blocks_per_pass"]), **rates(agg)}
        result["speed"][f"batch_{batch}"] = row
        print(f"batch {batch}: noise floor x{row['default']['noise_floor_ratio']:.2f}; " + ", ".join(f"{k} x{v['speed_ratio']:.2f} fw {v['forwards_ratio']:.2f}"
                                             for k, v in row.items() if k != "default"), flush=True)
    # ---- relaxed modes vs exact, same seeds ----
    batch = max(args.batches)
    base_src = sources.get("small_var", sources["jacobi"])
    modes = {"exact": {}, "exact_control": {}} | RELAXED  # exact twice: the timing noise floor
    runs = {"default": default} | {k: build_sampler("sjd", var=var, vae=vae, **base_src, **opts, **v)
                                   for k, v in modes.items()}
    res = timed(runs, labels, seeds, batch, sampling, args.repeats, decode=True)
    t_def = res["default"][0]
    t_ex, tok_ex, img_ex, _ = res["exact"]
    classifier = None
    if args.classifier:
        from eval.proxy import load_classifier
        classifier = load_classifier(args.classifier, device)
    for k in modes:
        t, toks, imgs, agg = res[k]
        entry = {"exact": agg["exact"], "accept_rule": agg["accept_rule"], "time_s": t, "speed_ratio_vs_default": t_def / t,
                 "speed_ratio_vs_exact_sjd": t_ex / t, "forwards_target": agg["forwards/var"],
                 "token_agreement_vs_exact": float((toks == tok_ex).float().mean()),
                 "psnr_db_vs_exact": psnr(imgs, img_ex) if k != "exact" else None, **rates(agg)}
        if classifier is not None:
            entry["proxy_accuracy"] = float((classifier(imgs.to(device))["logits"].argmax(1).cpu() == labels).float().mean())
        result["relaxed"][k] = entry
        print(f"relaxed {k}: x{entry['speed_ratio_vs_exact_sjd']:.2f} vs exact, agreement "
              f"{entry['token_agreement_vs_exact']:.3f}, psnr {entry['psnr_db_vs_exact']}", flush=True)
    result["relaxed_setting"] = {"draft": "small_var" if "small_var" in sources else "jacobi", "batch": batch}
    write(result, Path(args.out))
    return result


def plot(result: dict, path: Path) -> None:
    panels = []
    speed = result["speed"]
    panels.append(bar_panel([(k.replace("batch_", "B="), [("noise floor", row["default"]["noise_floor_ratio"])]
                              + [(s, v["speed_ratio"]) for s, v in row.items() if s != "default"])
                             for k, row in speed.items()], "Block-SJD exact: speed x vs default (same run)", ref_line=1.0))
    panels.append(bar_panel([(k.replace("batch_", "B="), [(s, v["forwards_ratio"]) for s, v in row.items() if s != "default"])
                             for k, row in speed.items()], "target forwards / default forwards", ref_line=1.0))
    last = list(speed.values())[-1]
    K = len(result["patch_nums"])
    panels.append(bar_panel([(f"s{si}", [(s, v["token_acceptance_per_scale"][si] or 0.0) for s, v in last.items()
                                         if s != "default"]) for si in range(K - 1)],
                            f"token acceptance per scale ({list(speed)[-1]})"))
    rel = result["relaxed"]
    panels.append(bar_panel([(k, [("x vs exact", v["speed_ratio_vs_exact_sjd"]), ("token agree", v["token_agreement_vs_exact"])])
                             for k, v in rel.items()], "relaxed modes vs exact Block-SJD (same seeds)", ref_line=1.0))
    save_panels(panels, path)


def write(result: dict, out: Path) -> None:
    result["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    with torch.no_grad():
        main()

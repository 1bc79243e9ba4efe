"""One benchmark protocol for every sampler, engine setting and baseline: same models, seeds, batch sizes.

  # accelerators on the shipped pair (stacks with '+'; engine settings compile= / rng= / precision= in a spec)
  python -m benchmarks.benchmark --sampler default --sampler 'code:draft_scales=3' --sampler 'sjd:draft=var' \
      --model refiner=checkpoints/fmnist/var_refiner.safetensors --model draft_model=checkpoints/fmnist/var_refiner.safetensors \
      --batch-sizes 1,16 --out benchmarks/results/engine_fmnist
  # the public VAR loop on identical weights, eager vs compiled, reference vs fast RNG (generation only)
  python -m benchmarks.benchmark --official-shape var_d16 --var-override depth=4 --var-override embed_dim=128 \
      --var-override num_heads=4 --sampler default --sampler default:rng=reference --sampler default:compile=default \
      --sampler reference --reference-checkout /tmp/VAR_ref --no-decode --top-k 900 --top-p 0.96 --out ...
  python -m benchmarks.benchmark --markdown benchmarks/results/engine_fmnist.json   # print the table

Protocol. Per batch size every contender (a sampler spec, the public loop, or our decoder alone) gets its
warm-up calls (the first one timed apart: for compiled specs it holds the compilation), then --repeats rounds
in which every contender runs once, the order alternating ABC, CBA, ... so drift hits all alike. Rows carry
the median and inter-quartile range of their wall times; a row whose IQR exceeds --noise-threshold of its
median is re-measured once, with twice the repeats, together with the baseline (ratios always pair a row with
the baseline of the same round), and stays flagged `noisy` if still noisy. Every speed figure is a ratio
against the baseline spec (--baseline, default `default`) measured in the same rounds. Counters (forwards,
tokens processed), peak KV bytes, memory, agreement with the baseline's tokens/images on the same seed, and
optional proxy quality come from the sampler's own stats. The baseline's transformer (blocks + head) is
timed call by call and its FLOPs counted (torch FlopCounterMode, on the first call of the smallest batch;
the forward is row-wise, so FLOPs scale exactly with the batch) against a matmul peak measured in the same
run. With `--sampler reference` the public loop is a contender: see benchmarks/reference_loop.py for how
its built-in decoding is separated out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from samplers import Sampler, sampler_class
from samplers.cli import SHIPPED, batch_size_list, cfg_float, load_models, parse_var_overrides
from tokenizers import VQVAE
from tokenizers.config import official_vqvae_config
from var import VAR, var_config
from training.errors import make_parser, run_cli
from benchmarks.contenders import (DecoderContender, Spec, TransformerMeter, build_contender, measure, parse_spec,
                                   split_specs)
from benchmarks.measure import load_average, matmul_peak_flops
from benchmarks.quality import ProxyQuality, paired_fd
from benchmarks.readme_tables import markdown_table, write_outputs
from benchmarks.reference_loop import build_reference
from benchmarks.rows import compare, count_model_flops, profile_table, reference_ratios, row_of


def build_models(args, device):
    if args.official_shape:
        torch.manual_seed(0)
        var = VAR(var_config(args.official_shape, **parse_var_overrides(args.var_override))).to(device).eval()
        vae = VQVAE(official_vqvae_config(var.patch_nums)).to(device).eval()
        extras = {}
        for item in args.model:  # e.g. refiner=var_d12: another randomly initialised official shape
            name, size = item.split("=", 1)
            extras[name] = VAR(var_config(size)).to(device).eval()
        return var, vae, extras
    return load_models(args.var, args.vae, args.model, device,
                       parse_var_overrides(args.var_override) if args.var_override else None)


def check_against_reference(var, vae, labels_B, seed, sampling, ref_c) -> dict:
    """Our default loop with rng='reference' vs the public loop's last output, same weights and seed: its
    latent when its decoder was shadowed (then a differing token would move f_hat by a whole code), else
    its images."""
    ours = Sampler(var, vae, rng="reference").sample(labels_B, seed=seed, decode=ref_c.full, **sampling)
    mine = ours.images if ref_c.full else (ours.f_hat + 1) * 0.5
    diff = (mine.float() - ref_c.images.float()).abs().max().item()
    what = "images" if ref_c.full else "(f_hat + 1) / 2"
    return {"what": f"default:rng=reference vs the public loop, same seed: max |{what} difference|",
            "compared": what, "max_abs_diff": diff, "bitwise_equal": diff == 0.0}


def run_batch(specs: list[Spec], baseline: str, var, vae, extras, batch: int, args, sampling, ref_var,
              flops_per_row: list) -> tuple[list[dict], dict]:
    device = var.class_emb.weight.device
    labels_B = torch.arange(batch, device=device) % var.num_classes
    contenders = {s.label: build_contender(s, var, vae, extras, labels_B, args, sampling, ref_var) for s in specs
                  if s.batches is None or batch in s.batches}
    base_c = contenders[baseline]
    meter = TransformerMeter(var) if base_c.kind == "ours" and base_c.sampler.compile is None else None
    if meter is not None and not flops_per_row:  # count FLOPs on one (untimed) warm-up call of the baseline
        meter.counting = True
        with meter:
            base_c()
        meter.counting = False
        flops_per_row.append(meter.flops / batch)
        meter.calls_s.clear()
        meter.rounds_s.clear()
    if args.no_decode and any(c.kind == "reference" and c.full for c in contenders.values()) and base_c.kind == "ours":
        base_c()
        contenders["decoder (ours)"] = DecoderContender(base_c.sampler, base_c.out.f_hat)
    repeats = dict(args.batch_repeats).get(batch, args.repeats)
    times, first = measure(contenders, repeats, args.warmup, meter, baseline)
    rows = {k: row_of(k, c, batch, times[k], first, args) for k, c in contenders.items()}
    for k in rows:
        compare(rows[k], rows[baseline], contenders[k], base_c)
    reference_ratios(list(rows.values()), rows.get("decoder (ours)"))  # every contender in the same rounds
    noisy = [k for k, r in rows.items() if r["noisy"] and k != baseline]
    if (noisy or rows[baseline]["noisy"]) and args.remeasure:
        again = {k: contenders[k] for k in [baseline] + noisy}
        meter_again = TransformerMeter(var) if meter is not None else None
        times2, _ = measure(again, 2 * repeats, 0, meter_again, baseline)
        base2 = row_of(baseline, base_c, batch, times2[baseline], {}, args)
        for k in again:
            new = row_of(k, contenders[k], batch, times2[k], first, args) if k != baseline else base2
            compare(new, base2, contenders[k], base_c)
            new["first_round"] = {x: rows[k][x] for x in ("median_s", "iqr_s", "iqr_frac", "times_s")}
            # the public loop is not re-measured: ratios against it stay those of the rounds it shared
            new.update({x: v for x, v in rows[k].items() if x.startswith("speedup_vs_reference_")})
            new["remeasured"] = True
            rows[k] = new
        if meter_again is not None:
            meter = meter_again
    if args.count_flops and batch == min(args.batch_sizes):
        count_model_flops(contenders, rows, batch, baseline)
    out = list(rows.values())
    checks = {}
    if meter is not None and flops_per_row:
        b = rows[baseline]
        transformer_s = statistics.median(meter.rounds_s)
        b["transformer"] = {"flops": flops_per_row[0] * batch, "time_s": transformer_s,
                            "times_s": meter.rounds_s, "share_of_wall": statistics.median(
                                t / w for t, w in zip(meter.rounds_s, b["times_s"])),
                            "achieved_flops_per_s": flops_per_row[0] * batch / transformer_s,
                            "how": "blocks + head of the baseline's VAR, timed per call, summed per round, median over rounds; "
                                   "FLOPs from FlopCounterMode at the smallest batch, times rows"}
    if args.profile:
        checks["profiles"] = {k: profile_table(c, args.profile) for k, c in contenders.items() if c.kind != "decoder"}
    ref_c = next((c for c in contenders.values() if c.kind == "reference" and not c.full), None) or next(
        (c for c in contenders.values() if c.kind == "reference"), None)
    if ref_c is not None and args.check_reference:
        checks["reference_equality"] = check_against_reference(var, vae, labels_B, args.seed, sampling, ref_c)
    return out, checks


def run(args) -> dict:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    var, vae, extras = build_models(args, device)
    specs = [parse_spec(s) for s in (args.sampler or ["default"])]
    if args.samplers:
        specs += [parse_spec(s) for s in split_specs(args.samplers)]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError("a --sampler spec is given twice; give each once")
    if args.baseline not in labels:
        specs.insert(0, parse_spec(args.baseline))
    for s in specs:  # refuse a missing model before anything is timed
        if s.name != "reference":
            missing = [m for m in sampler_class(s.name).extra_models if m not in extras]
            if missing:
                raise ValueError(f"--sampler {s.label!r} needs --model {missing[0]}=PATH")
    ref_var = None
    if any(s.name == "reference" for s in specs):
        if not args.reference_checkout:
            raise ValueError("--sampler reference needs --reference-checkout PATH (a checkout of FoundationVision/VAR)")
        ref_var = build_reference(args.reference_checkout, var, vae)
    batch_sizes = args.batch_sizes
    # the proxy classifier and its real reference are checked and loaded before anything is timed
    quality = (ProxyQuality(args.proxy_classifier, args.proxy_data, args.quality_images, max(batch_sizes), args.seed,
                            device) if args.proxy_classifier else None)
    sampling = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    dtype = torch.bfloat16 if any(s.engine.get("precision") == "bf16" for s in specs) else torch.float32
    meta = {"protocol": 2, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__, "load_average_start": load_average(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "models": {"var": (args.official_shape + "".join(f" {o}" for o in args.var_override))
                       if args.official_shape else _shown(args.var),
                       "vae": "official shape, random init" if args.official_shape else _shown(args.vae),
                       **{k: _shown(v) for k, v in (m.split("=", 1) for m in args.model)}},
            "patch_nums": list(var.patch_nums), "vocab_size": var.config.vocab_size, "depth": var.depth,
            "width": var.embed_dim, "sampling": sampling, "seed": args.seed, "seeding": "one generator per batch",
            "warmup": args.warmup, "repeats": args.repeats,
            "batch_repeats": dict(args.batch_repeats), "remeasure": args.remeasure, "decode": not args.no_decode, "baseline": args.baseline,
            "interleaving": "rounds alternate ABC, CBA", "noise_threshold": args.noise_threshold,
            "argv": sys.argv[1:] if args.argv is None else args.argv}
    peak_before = matmul_peak_flops(device, dtype, args.peak_matmul_size)
    rows, checks, flops_per_row = [], {}, []
    for batch in batch_sizes:
        print(f"batch {batch}: {', '.join(s.label for s in specs)}", file=sys.stderr, flush=True)
        batch_rows, batch_checks = run_batch(specs, args.baseline, var, vae, extras, batch, args, sampling,
                                             ref_var, flops_per_row)
        rows += batch_rows
        if batch_checks:
            checks[str(batch)] = batch_checks
    peak_after = matmul_peak_flops(device, dtype, args.peak_matmul_size)
    meta.update(matmul_peak_flops=max(peak_before, peak_after), matmul_peak_flops_start=peak_before,
                matmul_peak_flops_end=peak_after, matmul_peak_size=args.peak_matmul_size,
                load_average_end=load_average())
    for r in rows:
        if "transformer" in r:
            r["transformer"]["fraction_of_matmul_peak"] = r["transformer"]["achieved_flops_per_s"] / meta["matmul_peak_flops"]
    result = {"meta": meta, "rows": rows, "checks": checks}
    if quality is not None:
        paired = add_proxy_quality(args, quality, specs, var, vae, extras, sampling, rows, max(batch_sizes))
        if paired:
            result["paired_fd"] = paired
    return result


def add_proxy_quality(args, quality: ProxyQuality, specs, var, vae, extras, sampling, rows, batch) -> list[dict]:
    """Proxy scores into the rows of the largest batch; returns the --paired-fd comparisons."""
    device = var.class_emb.weight.device
    baseline, features = None, {}
    for s in sorted(specs, key=lambda s: s.label != args.baseline):  # the baseline first: the others compare with it
        if s.name == "reference":
            continue
        c = build_contender(s, var, vae, extras, torch.zeros(1, dtype=torch.long, device=device), args, sampling, None)
        scores, outputs = quality(c.sampler, var.num_classes, sampling, baseline)
        features[s.label] = outputs["features"]
        if s.label == args.baseline:
            baseline = outputs
        for r in rows:
            if r["sampler"] == s.label and r["batch"] == batch:
                r.update(scores)
    return paired_fd(quality, features, args.paired_fd)


def _shown(path: str) -> str:
    """Paths inside the repository are recorded relative to it, so committed results do not name a machine."""
    p = Path(path).resolve()
    return str(p.relative_to(SHIPPED.parents[1])) if p.is_relative_to(SHIPPED.parents[1]) else path


def _spec_pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition("..")
    if not sep or not a or not b:
        raise argparse.ArgumentTypeError(f"expected two sampler specs as A..B (e.g. dd:schedule=1step..dd:schedule=2step), "
                                         f"got {text!r}")
    return a, b


def _batch_repeats(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in item.split("=")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B=N[,B=N...] (e.g. 8=1), got {text!r}") from None
    if any(len(p) != 2 or p[1] < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected B=N[,B=N...] with N >= 1, got {text!r}")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(SHIPPED / "tokenizer.safetensors"))
    p.add_argument("--var", default=str(SHIPPED / "var_drafter.safetensors"))
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="extra model for samplers that need one (with --official-shape: NAME=var_d12 etc.)")
    p.add_argument("--official-shape", default=None, help="benchmark a randomly initialised registry size instead")
    p.add_argument("--var-override", action="append", default=[], metavar="KEY=VALUE",
                   help="VARConfig field of the benchmarked VAR (e.g. depth=4 with --official-shape)")
    p.add_argument("--sampler", action="append", default=[], metavar="SPEC",
                   help="repeatable: NAME[+NAME][:opt=value,...]; engine keys compile=, rng=, precision=; "
                        "'reference' = the public loop (needs --reference-checkout)")
    p.add_argument("--samplers", default=None, help="legacy: several specs in one argument ('a;b:opt=1')")
    p.add_argument("--baseline", default="default", help="the spec every ratio is taken against")
    p.add_argument("--batch-sizes", type=batch_size_list, default=[1, 16], help="comma-separated, e.g. 1,16")
    p.add_argument("--cfg", type=cfg_float, default=1.5)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-repeats", type=_batch_repeats, default=[], metavar="B=N,...",
                   help="other --repeats for some batch sizes (slow shapes), e.g. 8=1")
    p.add_argument("--noise-threshold", type=float, default=0.10, help="IQR / median above which a row is noisy")
    p.add_argument("--no-remeasure", dest="remeasure", action="store_false", help="do not re-measure noisy rows")
    p.add_argument("--num-threads", type=int, default=None, help="torch.set_num_threads (also set OMP_NUM_THREADS)")
    p.add_argument("--peak-matmul-size", type=int, default=2048, help="side of the square matmuls timing the peak")
    p.add_argument("--no-decode", action="store_true", help="time token generation only (decoder excluded)")
    p.add_argument("--count-flops", action="store_true",
                   help="also count every contender's model FLOPs per image (one more call, smallest batch)")
    p.add_argument("--proxy-classifier", default=None,
                   help="add offline proxy quality (e.g. eval/weights/fmnist_classifier.safetensors)")
    p.add_argument("--proxy-data", default="/usr/share/datasets/fashion-mnist", help="real Fashion-MNIST folder")
    p.add_argument("--quality-images", type=int, default=500, help="images per sampler for the proxy column")
    p.add_argument("--paired-fd", type=_spec_pair, action="append", default=[], metavar="A..B",
                   help="repeatable, with --proxy-classifier: FD(A) - FD(B) with a paired 95 %% interval (two "
                        "--sampler specs; the same labels and seeds make the images pairs)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--reference-checkout", default=None,
                   help="path to a checkout of the public VAR repository, for --sampler reference")
    p.add_argument("--no-reference-check", dest="check_reference", action="store_false",
                   help="skip the check that our rng='reference' loop reproduces the public loop's images")
    p.add_argument("--profile", type=int, default=0, metavar="CALLS",
                   help="after timing, profile CALLS more calls of every contender (torch.profiler, top operators)")
    p.add_argument("--out", default="benchmarks/results/benchmark", help="output path without extension")
    p.add_argument("--markdown", default=None, metavar="JSON", help="only print the Markdown table of a result file")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = argv
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
    sys.exit(run_cli(main))

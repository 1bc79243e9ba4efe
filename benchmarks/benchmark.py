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
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from samplers import build_sampler, sampler_class
from samplers.cli import SHIPPED, load_models, parse_sampler_args, parse_sampler_spec, parse_var_overrides
from benchmarks.measure import count_flops, flop_counter, matmul_peak_flops, process_rss_bytes, sync
from benchmarks.quality import ProxyQuality, mean_psnr, paired_fd

ENGINE_KEYS = ("compile", "rng", "precision")  # Sampler keywords, as opposed to accelerator options


# ---- measurements (process memory, device sync and the matmul peak: benchmarks/measure.py) ---------------


def summarise(times: list[float], batch: int, threshold: float) -> dict:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    median = statistics.median(times)
    iqr = q[2] - q[0]
    return {"median_s": median, "iqr_s": iqr, "iqr_frac": iqr / median, "noisy": iqr > threshold * median,
            "per_image_s": median / batch, "images_per_s": batch / median, "repeats": len(times), "times_s": times}


class TransformerMeter:
    """Times (and, when `counting`, counts the FLOPs of) every call of a VAR's blocks and head, by shadowing
    the two methods on the instance; the engine looks them up per sample, so nothing in samplers/ changes."""

    def __init__(self, var):
        self.var, self.calls_s, self.flops, self.counting = var, [], 0, False
        self.rounds_s: list[float] = []  # transformer seconds of each metered call of the sampler

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            device = args[0].device
            sync(device)
            start = time.perf_counter()
            if self.counting:
                with flop_counter() as counter:
                    out = fn(*args, **kwargs)
                self.flops += counter.get_total_flops()
            else:
                out = fn(*args, **kwargs)
            sync(device)
            self.calls_s.append(time.perf_counter() - start)
            self.rounds_s[-1] += self.calls_s[-1]
            return out
        return timed

    def __enter__(self):
        self.rounds_s.append(0.0)
        self.var.run_blocks = self._wrap(type(self.var).run_blocks.__get__(self.var))
        self.var.logits = self._wrap(type(self.var).logits.__get__(self.var))
        return self

    def __exit__(self, *exc):
        del self.var.run_blocks, self.var.logits


# ---- contenders ------------------------------------------------------------------------------------------------
@dataclass
class Spec:
    label: str  # as given on the command line
    name: str  # accelerator stack, "default", or "reference" (the public loop)
    options: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)
    batches: list[int] | None = None  # None: every --batch-sizes entry


def parse_spec(text: str) -> Spec:
    name, items = parse_sampler_spec(text.strip())
    engine = {}
    rest = []
    for item in items:
        key, sep, value = item.partition("=")
        if key in ENGINE_KEYS and sep:
            engine[key] = None if value.lower() in ("none", "eager") else value
        else:
            rest.append(item)
    batches = None
    for item in list(rest):
        if item.startswith("batches="):  # this contender runs only at these batch sizes
            batches = [int(b) for b in item.split("=", 1)[1].split("/")]
            rest.remove(item)
    if name == "reference":
        if engine or set(rest) - {"full"}:
            raise ValueError(f"--sampler reference takes only 'full' and 'batches=' (got {text!r}): it is the "
                             f"public loop as released")
        return Spec(text, name, {"full": "full" in rest}, batches=batches)
    return Spec(text, name, parse_sampler_args(sampler_class(name), rest), engine, batches)


class OursContender:
    kind = "ours"

    def __init__(self, spec: Spec, sampler, labels_B, seed: int, sampling: dict, decode: bool):
        self.spec, self.sampler, self.labels_B, self.seed = spec, sampler, labels_B, seed
        self.kwargs = dict(sampling, decode=decode)
        self.out = None

    def __call__(self) -> float:
        device = self.labels_B.device
        sync(device)
        start = time.perf_counter()
        self.out = self.sampler.sample(self.labels_B, seed=self.seed, **self.kwargs)
        sync(device)
        return time.perf_counter() - start


class DecoderContender:
    """Our tokenizer's decoder alone, on the baseline's latent: what --no-decode leaves out of every row."""
    kind = "decoder"

    def __init__(self, sampler, f_hat):
        self.sampler, self.f_hat = sampler, f_hat

    @torch.no_grad()
    def __call__(self) -> float:
        sync(self.f_hat.device)
        start = time.perf_counter()
        self.sampler.decode(self.f_hat)
        sync(self.f_hat.device)
        return time.perf_counter() - start


def measure(contenders: dict, repeats: int, warmup: int, meter: TransformerMeter | None = None,
            meter_key: str | None = None) -> tuple[dict, dict]:
    """Warm-up, then `repeats` interleaved rounds (ABC, CBA, ...). Returns {label: times}, {label: first call}."""
    first = {}
    for label, c in contenders.items():
        for i in range(max(warmup, 0)):
            t = c()
            first.setdefault(label, t)
        if isinstance(getattr(c, "decoder_times", None), list):
            c.decoder_times.clear()
    times = {k: [] for k in contenders}
    order = list(contenders)
    for r in range(repeats):
        for label in (order if r % 2 == 0 else order[::-1]):
            if meter is not None and label == meter_key:
                with meter:
                    times[label].append(contenders[label]())
            else:
                times[label].append(contenders[label]())
    return times, first


# ---- the protocol -------------------------------------------------------------------------------------------
def build_models(args, device):
    if args.official_shape:
        from tokenizers import VQVAE
        from tokenizers.config import official_vqvae_config
        from var import VAR, var_config
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


def build_contender(spec: Spec, var, vae, extras, labels_B, args, sampling, ref_var):
    from benchmarks.reference_loop import ReferenceContender
    if spec.name == "reference":
        full = spec.options["full"] or not args.no_decode
        return ReferenceContender(ref_var, labels_B.shape[0], labels_B, args.seed, sampling, full)
    cls = sampler_class(spec.name)
    models = {k: v for k, v in extras.items() if k in cls.extra_models + cls.optional_models}
    missing = [m for m in cls.extra_models if m not in models]
    if missing:
        raise ValueError(f"--sampler {spec.label!r} needs --model {missing[0]}=PATH")
    sampler = build_sampler(spec.name, var=var, vae=vae, **models, **spec.engine, **spec.options)
    return OursContender(spec, sampler, labels_B, args.seed, sampling, decode=not args.no_decode)


def row_of(spec_label: str, c, batch: int, times: list[float], first: dict, args) -> dict:
    row = {"sampler": spec_label, "kind": c.kind, "batch": batch, **summarise(times, batch, args.noise_threshold)}
    if spec_label in first:
        row["first_call_s"] = first[spec_label]
    if c.kind == "ours":
        st = c.out.stats
        row.update(engine={k: getattr(c.sampler, k) for k in ENGINE_KEYS}, forwards=st.forwards,
                   tokens_processed=st.tokens_processed, kv_bytes_peak=st.kv_bytes_peak,
                   kv_bytes_per_scale=st.kv_bytes_per_scale,
                   decoded=c.out.images is not None, extra=_jsonable(st.extra),
                   peak_memory_bytes=(torch.cuda.max_memory_allocated() if labels_device(c).type == "cuda"
                                      else process_rss_bytes()))
        if c.sampler.compile is not None and "first_call_s" in row:
            row["compile_s"] = row["first_call_s"] - row["median_s"]  # first call minus a warm call
    if c.kind == "reference" and c.full:
        dec = summarise(c.decoder_times, batch, args.noise_threshold)
        gen = [full - d for full, d in zip(times, c.decoder_times)]  # paired: same round
        row["decoder"] = {k: dec[k] for k in ("median_s", "iqr_s", "noisy", "times_s")}
        row["generation_only"] = {k: v for k, v in summarise(gen, batch, args.noise_threshold).items()
                                  if k in ("median_s", "iqr_s", "iqr_frac", "noisy", "times_s")}
        row["generation_only"]["how"] = "full call minus its decoder on a latent of the same shape, paired per round"
    if c.kind == "reference":
        row["decoded"] = c.full
    return row


def labels_device(c) -> torch.device:
    return c.labels_B.device


def compare(row: dict, base: dict, c, base_c) -> None:
    """Ratios of a row against the baseline row of the same rounds (and agreement on the same seed)."""
    row["speedup_vs_baseline"] = base["median_s"] / row["median_s"]
    n = min(len(row["times_s"]), len(base["times_s"]))
    row["speedup_vs_baseline_paired"] = statistics.median(b / t for b, t in zip(base["times_s"][:n], row["times_s"][:n]))
    if c.kind == "ours" and base_c.kind == "ours":
        row["kv_bytes_ratio_vs_baseline"] = row["kv_bytes_peak"] / max(1, base["kv_bytes_peak"])
        extra = row.get("extra", {})
        records = list(zip(extra.get("kv_len_per_layer", []), extra.get("kv_bytes_after_compression", [])))
        last = max((r["scale"] for r, _ in records), default=0)
        kept = [nbytes for r, nbytes in records if r["scale"] < last]  # the cache after the last scale goes nowhere
        carried = base.get("kv_bytes_per_scale", [])[:-1]  # what each baseline forward hands to the next
        if kept and carried and "kv_bytes_after_compression" not in base.get("extra", {}):
            # the cache a compressing policy carries between scales (its budget), against the uncompressed one:
            # the peak above also holds the current scale's own entries, which no budget removes
            row["kv_kept_ratio_vs_baseline"] = max(kept) / max(carried)
        row["token_agreement_vs_baseline"] = float(torch.cat([(a == b).float().flatten() for a, b in
                                                             zip(c.out.tokens, base_c.out.tokens)]).mean())
        if c.out.images is not None and base_c.out.images is not None:
            row["psnr_vs_baseline_db"] = mean_psnr(c.out.images, base_c.out.images)


def reference_ratios(rows: list[dict], decoder_row: dict | None) -> None:
    """Every row of ours against the public loop of the same batch: generation only (its decoder never
    called), decoder-subtracted (its full call minus its decoder alone) and the full pipeline (both decode)."""
    plain = next((r for r in rows if r["kind"] == "reference" and not r["decoded"]), None)
    full = next((r for r in rows if r["kind"] == "reference" and r["decoded"]), None)
    for r in rows:
        if r["kind"] != "ours":
            continue
        if r["decoded"]:
            if full is not None:
                r["speedup_vs_reference_full_pipeline"] = full["median_s"] / r["median_s"]
            continue
        if plain is not None:
            r["speedup_vs_reference_generation_only"] = plain["median_s"] / r["median_s"]
        if full is not None:
            r["speedup_vs_reference_decoder_subtracted"] = full["generation_only"]["median_s"] / r["median_s"]
            if decoder_row is not None:
                r["speedup_vs_reference_full_pipeline"] = full["median_s"] / (r["median_s"] + decoder_row["median_s"])


def check_against_reference(var, vae, labels_B, seed, sampling, ref_c) -> dict:
    """Our default loop with rng='reference' vs the public loop's last output, same weights and seed: its
    latent when its decoder was shadowed (then a differing token would move f_hat by a whole code), else
    its images."""
    from samplers import Sampler
    ours = Sampler(var, vae, rng="reference").sample(labels_B, seed=seed, decode=ref_c.full, **sampling)
    mine = ours.images if ref_c.full else (ours.f_hat + 1) * 0.5
    diff = (mine.float() - ref_c.images.float()).abs().max().item()
    what = "images" if ref_c.full else "(f_hat + 1) / 2"
    return {"what": f"default:rng=reference vs the public loop, same seed: max |{what} difference|",
            "compared": what, "max_abs_diff": diff, "bitwise_equal": diff == 0.0}


def count_model_flops(contenders: dict, rows: dict, batch: int, baseline: str) -> None:
    """Model FLOPs per image of one more (untimed) call of every contender of ours (benchmarks.measure.flop_counter:
    matmuls, convolutions and attention, the decoder when it decodes; not the elementwise work such as the token
    draw), and the baseline's over each: the speed-up a purely compute-bound device would give."""
    for k, c in contenders.items():
        if c.kind == "ours":
            rows[k]["model_flops_per_image"] = count_flops(c) / batch
    base = rows[baseline].get("model_flops_per_image")
    for r in rows.values():
        if base and r.get("model_flops_per_image"):
            r["model_flop_ratio_vs_baseline"] = base / r["model_flops_per_image"]


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
            new["remeasured"] = True
            rows[k] = new
        if meter_again is not None:
            meter = meter_again
    if args.count_flops and batch == min(int(b) for b in args.batch_sizes.split(",")):
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
    decoder_row = rows.get("decoder (ours)")
    reference_ratios(out, decoder_row)
    ref_c = next((c for c in contenders.values() if c.kind == "reference" and not c.full), None) or next(
        (c for c in contenders.values() if c.kind == "reference"), None)
    if ref_c is not None and args.check_reference:
        checks["reference_equality"] = check_against_reference(var, vae, labels_B, args.seed, sampling, ref_c)
    return out, checks


def profile_table(contender, calls: int, rows: int = 15) -> dict:
    """Where a contender's time goes: torch.profiler over `calls` more calls, operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            contender()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return {"calls": calls, "self_cpu_total_s": total / 1e6, "top_ops": [
        {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
         "count": e.count} for e in events[:rows]]}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
        from benchmarks.reference_loop import build_reference
        ref_var = build_reference(args.reference_checkout, var, vae)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
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
    if args.proxy_classifier:
        paired = add_proxy_quality(args, specs, var, vae, extras, sampling, rows, max(batch_sizes))
        if paired:
            result["paired_fd"] = paired
    return result


def add_proxy_quality(args, specs, var, vae, extras, sampling, rows, batch) -> list[dict]:
    """Proxy scores into the rows of the largest batch; returns the --paired-fd comparisons."""
    device = var.class_emb.weight.device
    quality = ProxyQuality(args.proxy_classifier, args.proxy_data, args.quality_images, batch, args.seed, device)
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


def split_specs(text: str) -> list[str]:
    """Legacy --samplers: separated by ';' (commas then separate each one's options) or, without options, by ','."""
    return [s.strip() for s in text.split(";" if ":" in text else ",") if s.strip()]


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
    from training.errors import make_parser

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
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--cfg", type=float, default=1.5)
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
    from benchmarks.readme_tables import markdown_table, write_outputs
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
    from training.errors import run_cli

    sys.exit(run_cli(main))

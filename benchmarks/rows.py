"""The result rows of a benchmark: one contender's timings, counters and memory, its ratios against the
baseline of the same rounds (speed, KV, agreement on the same seed) and against the public loop, its model
FLOPs, and where its time goes (torch.profiler)."""
from __future__ import annotations

import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.contenders import ENGINE_KEYS, summarise
from benchmarks.measure import count_flops, median_iqr, process_rss_bytes
from benchmarks.quality import mean_psnr


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
                   # this call's own CUDA peak (the sampler resets the counter); on CPU no per-call peak
                   # exists, only the process's resident memory after every contender ran
                   peak_memory_bytes=st.cuda_max_memory_allocated, process_rss_bytes=process_rss_bytes())
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


def compare(row: dict, base: dict, c, base_c) -> None:
    """Ratios of a row against the baseline row of the same rounds (and agreement on the same seed)."""
    row["speedup_vs_baseline"] = base["median_s"] / row["median_s"]
    n = min(len(row["times_s"]), len(base["times_s"]))
    paired = [b / t for b, t in zip(base["times_s"][:n], row["times_s"][:n])]  # round by round
    row["speedup_vs_baseline_paired"] = statistics.median(paired)
    row["speedup_iqr"] = median_iqr(paired)["iqr"]  # the spread of the ratio itself, both rows' noise included
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


def profile_table(contender, calls: int, rows: int = 15) -> dict:
    """Where a contender's time goes: torch.profiler over `calls` more calls, operators by self CPU time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            contender()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return {"calls": calls, "self_cpu_total_s": total / 1e6, "top_ops": [
        {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
         "count": e.count} for e in events[:rows]]}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else str(obj)

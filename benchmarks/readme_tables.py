"""Regenerate the README's measured tables from the committed result files, so no number is typed by hand.

  python -m benchmarks.readme_tables            # rewrite README.md between its <!-- NAME:start/end --> markers
  python -m benchmarks.readme_tables --check    # exit 1 if README.md is out of date (the test suite runs this)
  python -m benchmarks.readme_tables --print engine-small   # one block's Markdown, for pasting

Each block is produced from one JSON file: the sampler tables from benchmarks/results/*.json
(benchmarks/benchmark.py; `markdown_table` reads both the protocol-2 layout and the older one), the model
card from checkpoints/fmnist/model_card.json. This module also writes a benchmark's JSON, Markdown and PNG.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks.plotting import bar_panel, save_panels
from benchmarks.results_io import paired_fd_lines, with_interval
from benchmarks.training_report import markdown_table as training_pipeline_table
from training.atomic import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


SHIPPED_V1 = REPO / "checkpoints" / "fmnist"
SHIPPED_V2 = REPO / "checkpoints" / "fmnist64"


def model_card_markdown(card: dict, folder: Path = SHIPPED_V1) -> str:
    """A shipped set's model_card.json (written by `python -m eval.model_card`) as README tables; the proxy
    columns come from the eval cards beside it (`sample.py --eval-card`)."""
    tok, ds = card["tokenizer"], card["dataset"]
    per_scale = lambda values: " / ".join(f"{v:.3g}" for v in values)  # noqa: E731
    var_images = ds.get("var_images", ds["images"])
    subset = f" (token accuracy on the first {var_images})" if var_images != ds["images"] else ""
    lines = [f"{ds['name']} {ds['split']} set, {ds['images']} images{subset}, scales {tok['patch_nums']}.", "",
             "| tokenizer | value |", "|---|---|",
             f"| reconstruction PSNR | {tok['psnr_db']:.2f} dB |",
             f"| codebook usage per scale (of {tok['vocab_size']}) | {per_scale(tok['codebook_usage_per_scale'])} |",
             f"| codebook usage, any scale | {tok['codebook_usage_any_scale']:.3f} |",
             f"| code perplexity per scale | {per_scale(tok['perplexity_per_scale'])} |",
             f"| file | {tok['bytes'] / 2**20:.1f} MiB |", "",
             "| VAR | params | depth / width | token accuracy per scale (teacher-forced) | all scales | "
             "proxy accuracy | proxy FD |", "|---|---|---|---|---|---|---|"]
    for name, info in card["var"].items():
        q = proxy_quality(name, folder) or info.get("sample_quality") or {}
        acc = with_interval(q.get("classifier_accuracy"), q.get("classifier_accuracy_ci"), lambda v: f"{100 * v:.1f}%")
        fd = with_interval(q.get("proxy_fd"), q.get("proxy_fd_ci"), lambda v: f"{v:.2f}")
        lines.append(f"| {name} | {info['num_params'] / 1e6:.2f} M | {info['config']['depth']} / "
                     f"{info['config']['embed_dim']} | {per_scale(info['token_accuracy_per_scale'])} | "
                     f"{info['token_accuracy_all']:.3f} | {acc} | {fd} |")
    cards = {name: proxy_quality(name, folder) for name in card["var"]}
    where = folder.relative_to(REPO)
    real = real_reference_note(folder / "proxy_reference.json") or REAL_PROXY_FD
    if any(cards.values()):
        c = next(c for c in cards.values() if c)
        lines += ["", f"Proxy columns: {c['num_samples']} samples ({c['per_class']} per class, default sampler, cfg "
                      f"{c['cfg']}, top-k {c['top_k']}, seed {c['seed']}) scored by the offline Fashion-MNIST classifier "
                      f"(`eval/`): its accuracy on the intended labels and the Fréchet distance in its features to the "
                      f"real test set (real training images score {real}). From "
                      + ", ".join(f"`{where}/eval_card_{n}.json`" for n, v in cards.items() if v) + "."]
    return "\n".join(lines) + "\n"


def real_reference_note(path: Path) -> str:
    """The yardstick rows of `python -m eval.real_reference` in words ('' without the file)."""
    if not path.is_file():
        return ""
    ref = json.loads(path.read_text())
    rows = ref["rows"]
    parts = [f"{rows['real']['proxy_fd']:.2f} at {100 * rows['real']['proxy_accuracy']:.1f}% accuracy "
             f"({rows['real']['images']} images)"]
    parts += [f"blurred {k[4:]}x {v['proxy_fd']:.1f}" for k, v in rows.items() if k.startswith("blur")]
    if "reconstructed" in rows:
        parts.append(f"their tokenizer reconstructions {rows['reconstructed']['proxy_fd']:.1f}")
    parts += [f"{k.replace('_', ' ')} samples moved to this layout {v['proxy_fd']:.1f} at "
              f"{100 * v['proxy_accuracy']:.1f}%" for k, v in rows.items() if "samples" in v]
    return ", ".join(parts) + f"; from `{path.relative_to(REPO)}`, `python -m eval.real_reference`"


REAL_PROXY_FD = "0.70; the classifier's own test accuracy is 91.2%"


def proxy_quality(name: str, folder: Path = SHIPPED_V1) -> dict | None:
    """Proxy scores of a shipped VAR from its eval card (written by `sample.py --eval-card`)."""
    path = folder / f"eval_card_{name}.json"
    if not path.is_file():
        return None
    card = json.loads(path.read_text())
    m, settings = card["evaluation"]["proxy"]["metrics"], card["sampling"]["settings"]
    ci = card["evaluation"]["proxy"].get("intervals", {})  # 95 %: bootstrap (FD), Wilson (accuracy)
    bounds = {key: [ci[key]["low"], ci[key]["high"]] if key in ci else None for key in ("proxy_accuracy", "proxy_fd")}
    return {"classifier_accuracy": m["proxy_accuracy"], "proxy_fd": m["proxy_fd"], "num_samples": card["num_samples"],
            "classifier_accuracy_ci": bounds["proxy_accuracy"], "proxy_fd_ci": bounds["proxy_fd"],
            "per_class": settings["per_class"], "cfg": settings["cfg"], "top_k": settings["top_k"],
            "seed": settings["seed"]}


# ---- benchmark tables ------------------------------------------------------------------------------------------

def proxy_cells(row: dict, baseline: dict | None) -> str:
    """'FD [lo, hi] | acc [lo, hi]', with * where the 95 % interval does not overlap the baseline's (same batch)."""
    if "proxy_fd" not in row:
        return "— | —"
    cells = []
    for key, fmt in (("proxy_fd", lambda v: f"{v:.1f}"), ("proxy_accuracy", lambda v: f"{100 * v:.1f}%")):
        text = fmt(row[key])
        ci = row.get(f"{key}_ci")
        if ci:
            text += f" [{fmt(ci[0])}, {fmt(ci[1])}]"
            other = None if baseline is None or baseline is row else baseline.get(f"{key}_ci")
            if other and (ci[1] < other[0] or other[1] < ci[0]):
                text += " *"
        cells.append(text)
    return " | ".join(cells)

def markdown_table(results: dict) -> str:
    """The Markdown report of a benchmarks/benchmark.py result (protocol 2, or the older layout)."""
    return engine_table(results) if results["meta"].get("protocol") == 2 else v1_table(results)


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}x"


REFERENCE_RATIOS = (("speedup_vs_reference_generation_only", "generation only"),
                    ("speedup_vs_reference_decoder_subtracted", "decoder-subtracted"),
                    ("speedup_vs_reference_full_pipeline", "full pipeline"))


def engine_table(results: dict) -> str:
    m = results["meta"]
    rows = results["rows"]
    has_ref = any(r["kind"] == "reference" for r in rows)
    load = m.get("load_average_start")
    lines = [f"Measured {m['date']} on {m['device']} ({m['gpu'] or m['machine']}, {m['cpu_count']} cores, "
             f"{m['torch_threads']} torch threads, OMP_NUM_THREADS={m['omp_num_threads']}, load average "
             f"{load[0] if load else '?'} at start and {(m.get('load_average_end') or ['?'])[0]} at the end); "
             f"model {m['models']['var']} (depth {m['depth']}, width {m['width']}, V={m['vocab_size']}, "
             f"{len(m['patch_nums'])} scales), cfg {m['sampling']['cfg']}, top-k {m['sampling']['top_k']}, "
             f"top-p {m['sampling']['top_p']}; {'images decoded' if m['decode'] else 'generation only (no decode)'}; "
             f"median of {m['repeats']} interleaved rounds" + "".join(f" ({n} at batch {b})" for b, n in
                                                              m.get("batch_repeats", {}).items())
             + f" after {m['warmup']} warm-up call(s); "
             f"ratios against `{m['baseline']}` from the same rounds.", "",
             "| sampler | batch | ms / image | IQR / median (rounds) | speed-up | " + ("vs public loop | " if has_ref else "")
             + "forwards | KV MiB (ratio) | PSNR vs baseline | token agreement | proxy FD | proxy acc. |",
             "|---" * (11 + has_ref) + "|"]
    for r in rows:
        noisy = " **noisy**" if r["noisy"] else (" (re-measured)" if r.get("remeasured") else "")
        if r["kind"] == "reference" and not r["decoded"]:
            name, vs = "public VAR loop, its decoder never called", "—"
        elif r["kind"] == "reference":
            name = "public VAR loop, full call (decodes)"
            vs = (f"its decoder alone: {_ms(r['decoder']['median_s'] / r['batch'])} ms / image, so generation "
                  f"{_ms(r['generation_only']['median_s'] / r['batch'])} ms / image")
        elif r["kind"] == "decoder":
            name, vs = "our decoder alone", "—"
        else:
            name = f"`{r['sampler']}`"
            parts = [f"{_x(r[key])} {label}" for key, label in REFERENCE_RATIOS if key in r]
            vs = "; ".join(parts) or "—"
        forwards = ", ".join(f"{k} {v}" for k, v in r.get("forwards", {}).items()) or "—"
        kv = (f"{r['kv_bytes_peak'] / 2**20:.2f} ({r['kv_bytes_ratio_vs_baseline']:.2f})"
              if "kv_bytes_ratio_vs_baseline" in r else "—")
        p = r.get("psnr_vs_baseline_db")
        psnr_text = "—" if p is None else ("identical" if p == float("inf") else f"{p:.1f} dB")
        agree = f"{r['token_agreement_vs_baseline']:.3f}" if "token_agreement_vs_baseline" in r else "—"
        proxy = proxy_cells(r, next((b for b in rows if b.get("sampler") == m["baseline"] and b["batch"] == r["batch"]
                                     and "proxy_fd" in b), None))
        lines.append(f"| {name} | {r['batch']} | {_ms(r['per_image_s'])} | {100 * r['iqr_frac']:.0f}% "
                     f"({r['repeats']}){noisy} | {_x(r['speedup_vs_baseline'])} | " + (f"{vs} | " if has_ref else "")
                     + f"{forwards} | {kv} | {psnr_text} | {agree} | {proxy} |")
    notes = []
    compiled = [r for r in rows if "compile_s" in r]
    if compiled:
        notes.append("Compilation (first call minus a warm call, per batch size): " + "; ".join(
            f"`{r['sampler']}` batch {r['batch']}: {r['compile_s']:.1f} s" for r in compiled) + ".")
    eff = [r for r in rows if "transformer" in r]
    if eff:
        notes.append("Transformer efficiency of the baseline (blocks + head, timed per call; FLOPs from torch's "
                     "FlopCounterMode): " + "; ".join(
                         f"batch {r['batch']}: {r['transformer']['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
                         f"{100 * r['transformer']['fraction_of_matmul_peak']:.1f}% of the matmul peak measured in "
                         f"this run ({m['matmul_peak_flops'] / 1e9:.0f} GFLOP/s, {m['matmul_peak_size']}² fp32), "
                         f"{100 * r['transformer']['share_of_wall']:.0f}% of the wall time" for r in eff) + ".")
    for batch, checks in results.get("checks", {}).items():
        c = checks.get("reference_equality")
        if c:
            notes.append(f"Batch {batch}: `default:rng=reference` and the public loop on the same weights and seed "
                         + (f"give bitwise identical {c['compared']}." if c["bitwise_equal"] else
                            f"give {c['compared']} that differ by at most {c['max_abs_diff']:.1e} (float "
                            f"rounding; one differing token would move them by a whole code)."))
    for batch, checks in results.get("checks", {}).items():
        for label, prof in checks.get("profiles", {}).items():
            ops = ", ".join(f"`{o['op']}` {100 * o['share']:.0f}%" for o in prof["top_ops"][:4])
            notes.append(f"Profile, `{short_label(label)}` at batch {batch} ({prof['calls']} calls, share of self CPU "
                         f"time): {ops}.")
    if not m["decode"] and any(r["kind"] == "reference" for r in rows):
        notes.append("The public loop always decodes. \"generation only\": its own loop with the reference "
                     "VQVAE's `fhat_to_img` shadowed for the benchmark (the decoder is never called). "
                     "\"decoder-subtracted\": its full call minus its decoder timed alone on a latent of the same "
                     "shape right after it in every round. \"full pipeline\": its full call vs ours plus our "
                     "decoder (its own row).")
    quality = [r for r in rows if "proxy_fd" in r]
    if quality:
        n = quality[0]["proxy_images"]
        notes.append(f"Proxy columns: {n} class-balanced images per sampler at batch {quality[0]['batch']}, scored by "
                     "the offline Fashion-MNIST classifier (Fréchet distance in its features against the real test "
                     "set; accuracy on the intended labels). Not FID. In brackets: 95 % intervals (basic bootstrap "
                     "for the FD, Wilson for the accuracy); * marks an interval that does not overlap the baseline's "
                     "(a significant difference). PSNR and token agreement compare with the baseline's images on "
                     "the same seeds: meaningful for samplers that follow its sample path (ScaleKV, CoDe's early "
                     "scales); samplers with their own randomness (sjd, flow, the fast/reference RNG pair) are judged "
                     "by the proxy columns.")
    if any(r["noisy"] for r in rows):
        notes.append(f"**noisy**: IQR above {100 * m['noise_threshold']:.0f}% of the median even after one "
                     "re-measurement with twice the rounds (the machine is shared).")
    return "\n".join(lines + [""] + [n for note in notes for n in (note, "")]).rstrip("\n") + "\n"


def v1_table(results: dict) -> str:
    """Result files written before protocol 2 (one table layout, kept so their README blocks stay as they are)."""
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


def short_label(spec: str) -> str:
    """A spec with its file paths cut to the file names (legends stay readable)."""
    return re.sub(r"[\w./-]*/([\w.-]+)", r"\1", spec)


def chart_panels(results: dict):
    """Speed-up vs the baseline per batch and, with the public loop in the run, ours vs it."""
    rows = results["rows"]
    batches = sorted({r["batch"] for r in rows})
    if results["meta"].get("protocol") != 2:
        return [bar_panel([(f"batch {b}", [(r["sampler"], r["speedup_vs_default"]) for r in rows if r["batch"] == b])
                           for b in batches], "speed-up vs default sampler (same run)", ref_line=1.0, ylabel="x")]
    ours = [r for r in rows if r["kind"] == "ours"]
    panels = [bar_panel([(f"batch {b}", [(short_label(r["sampler"]), r["speedup_vs_baseline"]) for r in ours
                                          if r["batch"] == b])
                         for b in batches], f"speed-up vs {results['meta']['baseline']} (same rounds)",
                        ref_line=1.0, ylabel="x")]
    groups = [(f"batch {b}, {label}", [(short_label(r["sampler"]), r[key]) for r in ours if r["batch"] == b and key in r])
              for key, label in REFERENCE_RATIOS for b in batches]
    groups = [g for g in groups if g[1]]
    if groups:
        panels.append(bar_panel(groups, "ours vs the public VAR loop (same weights, same rounds)", ref_line=1.0,
                                ylabel="x"))
    return panels


def write_outputs(results: dict, out: Path) -> None:
    atomic_write_json(out.with_suffix(".json"), results)
    atomic_write_text(out.with_suffix(".md"), markdown_table(results))
    save_panels(chart_panels(results), out.with_suffix(".png"), cols=1)


def quality_table(results: dict) -> str:
    """Proxy quality with 95 % intervals of every sampler row that has it (a run with --quality-images N)."""
    m, rows = results["meta"], [r for r in results["rows"] if "proxy_fd" in r]
    base = next((r for r in rows if r.get("sampler") == m["baseline"]), None)
    n = rows[0]["proxy_images"] if rows else 0
    lines = [f"Measured {m['date']}; {n} class-balanced images per sampler (batch {rows[0]['batch'] if rows else '—'}), "
             f"cfg {m['sampling']['cfg']}, top-k {m['sampling']['top_k']}, top-p {m['sampling']['top_p']}; 95 % "
             "intervals (basic bootstrap for the FD, Wilson for the accuracy, t for PSNR and token agreement, which "
             f"compare every image with `{m['baseline']}`'s on the same label and seed); * = the interval does not "
             f"overlap `{m['baseline']}`'s.", "",
             "| sampler | proxy FD | proxy accuracy | PSNR vs baseline | token agreement |", "|---|---|---|---|---|"]
    for r in rows:
        p = r.get("quality_psnr_db", r.get("psnr_vs_baseline_db"))
        psnr_text = "—" if p is None else ("identical" if p == float("inf") else f"{p:.1f} dB")
        if r.get("quality_psnr_db_ci") and p != float("inf"):
            psnr_text += " [{:.1f}, {:.1f}]".format(*r["quality_psnr_db_ci"])
        a = r.get("quality_token_agreement", r.get("token_agreement_vs_baseline"))
        agree = "—" if a is None else f"{a:.3f}"
        if r.get("quality_token_agreement_ci"):
            agree += " [{:.3f}, {:.3f}]".format(*r["quality_token_agreement_ci"])
        lines.append(f"| `{short_label(r['sampler'])}` | {proxy_cells(r, base)} | {psnr_text} | {agree} |")
    return "\n".join(lines) + "\n"


def _with_ci(row: dict, key: str, fmt) -> str:
    if key not in row:
        return "—"
    ci = row.get(f"{key}_ci")
    return fmt(row[key]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def schedule_table(results: dict) -> str:
    """Every sampler's speed per batch (ratio to the baseline in the same rounds, forwards per image) beside its
    proxy quality (FD, accuracy, precision, recall with 95 % intervals): the distilled-decoding schedules."""
    m, rows = results["meta"], results["rows"]
    batches = sorted({r["batch"] for r in rows})
    specs = list(dict.fromkeys(r["sampler"] for r in rows))
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"Measured {m['date']}; {m['models']['var']} with cfg {m['sampling']['cfg']}, top-k "
             f"{m['sampling']['top_k']}, top-p {m['sampling']['top_p']}; speed = ratio to `{m['baseline']}` in the "
             f"same rounds (median of {m['repeats']} interleaved rounds; **noisy**: IQR > "
             f"{100 * m['noise_threshold']:.0f} % of the median), {'images decoded' if m['decode'] else 'no decode'}; "
             "proxy scores with 95 % intervals (basic bootstrap for the FD, Wilson for accuracy, precision and recall).",
             "", "| sampler | transformer forwards | " + " | ".join(f"speed b{b}" for b in batches)
             + " | proxy FD | proxy accuracy | proxy precision | proxy recall |", "|---" * (6 + len(batches)) + "|"]
    for spec in specs:
        by_batch = {r["batch"]: r for r in rows if r["sampler"] == spec}
        first = by_batch[batches[0]]
        speeds = [(_x(by_batch[b]["speedup_vs_baseline"]) + (" **noisy**" if by_batch[b]["noisy"] else ""))
                  if b in by_batch else "—" for b in batches]
        q = next((r for r in by_batch.values() if "proxy_fd" in r), {})
        forwards = " + ".join(f"{v:g} {k}" for k, v in sorted((first.get("forwards") or {}).items()))
        lines.append(f"| `{short_label(spec)}` | {forwards or '—'} | " + " | ".join(speeds) + " | "
                     + " | ".join([_with_ci(q, "proxy_fd", lambda v: f"{v:.1f}"), _with_ci(q, "proxy_accuracy", pct),
                                   _with_ci(q, "proxy_precision", pct), _with_ci(q, "proxy_recall", pct)]) + " |")
    lines += paired_fd_lines(results.get("paired_fd", []), short_label)
    return "\n".join(lines) + "\n"


RESULTS = REPO / "benchmarks" / "results"
BLOCKS = {
    "bench": (RESULTS / "benchmark_fmnist.json", lambda r: markdown_table(r)),
    "bench-sjd-dd": (RESULTS / "benchmark_fmnist_sjd_dd.json", lambda r: markdown_table(r)),
    "bench-official": (RESULTS / "benchmark_d16.json", lambda r: markdown_table(r)),
    "engine-small": (RESULTS / "engine_small_10scale.json", lambda r: markdown_table(r)),
    "engine-d16": (RESULTS / "engine_d16.json", lambda r: markdown_table(r)),
    "engine-fmnist": (RESULTS / "engine_fmnist.json", lambda r: markdown_table(r)),
    "engine-fmnist-quality": (RESULTS / "engine_fmnist_quality.json", quality_table),
    "model-card": (SHIPPED_V1 / "model_card.json", model_card_markdown),
    "model-card-v2": (SHIPPED_V2 / "model_card.json", lambda card: model_card_markdown(card, SHIPPED_V2)),
    "training-pipeline": (RESULTS / "training_pipeline.json", training_pipeline_table),
    "dd-schedules": (RESULTS / "dd_schedules_fmnist.json", schedule_table),
}


def block(name: str) -> str:
    """The generated body of one README block (between its markers)."""
    path, make = BLOCKS[name]
    body = make(json.loads(path.read_text())) if path.is_file() else f"_{path.relative_to(REPO)} not measured yet._\n"
    return f"<!-- generated by `python -m benchmarks.readme_tables` from {path.relative_to(REPO)} -->\n{body}"


def render(readme: str) -> str:
    for name in BLOCKS:
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(readme):
            continue
        body = block(name)
        readme = pattern.sub(lambda m: m.group(1) + body + m.group(2), readme)
    return readme


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=str(REPO / "README.md"))
    p.add_argument("--check", action="store_true", help="only report whether the README is up to date")
    p.add_argument("--print", dest="show", choices=sorted(BLOCKS), help="print one block, markers included")
    args = p.parse_args(argv)
    if args.show:
        print(f"<!-- {args.show}:start -->\n{block(args.show)}<!-- {args.show}:end -->")
        return 0
    path = Path(args.readme)
    current = path.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print(f"{path} is out of date: run `python -m benchmarks.readme_tables`", file=sys.stderr)
            return 1
        return 0
    if fresh != current:
        atomic_write_text(path, fresh)
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tables and plot of a training-pipeline benchmark result (benchmarks/training_pipeline.py writes the JSON)."""
from __future__ import annotations

from pathlib import Path

from benchmarks.plotting import bar_panel, save_panels

MFU_TARGET, SCALING_TARGET = 0.35, 1.6  # the targets: MFU at the d16 shape, 2-process scaling


def _mi(s: dict, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(s['median'])} [IQR {fmt.format(s['iqr'])}]"


def markdown_table(result: dict) -> str:
    """The README tables of a result file (one per section present)."""
    m = result["meta"]
    lines = [f"Measured {m['date']} on {m['machine']} ({m['usable_cpus']} usable CPUs, torch {m['torch']}, load "
             f"average {m['load_average_start']} at the start)" + ("; **provisional** (a `--quick` run on a busy "
             "machine: not the numbers to quote)" if m.get("provisional") else "") + ".", ""]
    if "data" in result:
        d = result["data"]
        lines += [f"Data pipeline: {d['images']} JPEGs ({d['source_sides_px'][0]}-{d['source_sides_px'][1]} px), "
                  f"{d['image_size']} px VAR train transform (mid_reso {d['transform']['mid_reso']}, random crop), "
                  f"batch {d['batch']}; same batches with and without workers: {'yes' if d['same_batches'] else 'NO'}.",
                  "", "| num_workers | images/s (after the first batch) | images/s (incl. start-up) | first batch s | "
                  "vs 0 workers |", "|---|---|---|---|---|"]
        for r in d["rows"]:
            ratio = "1" if r["num_workers"] == 0 else f"{d['speedup_vs_0_workers']['median']:.2f}x"
            lines.append(f"| {r['num_workers']} | {_mi(r['steady_images_per_s'])} | {_mi(r['images_per_s'])} | "
                         f"{_mi(r['first_batch_s'], '{:.2f}')} | {ratio} |")
        lines.append("")
    if "mfu" in result:
        u = result["mfu"]
        lines += [f"Training step (forward + backward + clip + AdamW, fp32): FLOPs from torch's FlopCounterMode, "
                  f"matmul peak {u['matmul_peak_flops'] / 1e9:.1f} GFLOP/s (fp32 {u['matmul_peak_size']}^2 mm, "
                  f"{m['torch_threads']} thread(s), same run). Target: MFU >= {100 * u['target_mfu_d16']:.0f} % at "
                  "the d16 shape.", "",
                  "| shape | depth / width / heads | batch x tokens | GFLOP / step | step s | GFLOP/s | MFU |",
                  "|---|---|---|---|---|---|---|"]
        for r in u["rows"]:
            lines.append(f"| {r['shape']} | {r['depth']} / {r['width']} / {r['heads']} | {r['batch']} x "
                         f"{r['seq_len']} | {r['flops_per_step'] / 1e9:.1f} | {_mi(r['step_s'], '{:.3f}')} | "
                         f"{r['achieved_flops_per_s'] / 1e9:.1f} | {100 * r['mfu']:.1f} % |")
        lines.append("")
    if "scaling" in result:
        s = result["scaling"]
        lines += [f"CPU training, `train.py var` (depth {s['model']['depth']}, width {s['model']['embed_dim']}, "
                  f"{s['image_size']} px procedural, global batch {s['global_batch']}, {s['steps']} steps, the first "
                  f"{s['warmup_steps']} untimed), {s['usable_cpus']} usable CPUs. Target: 2 processes >= "
                  f"{s['target_scaling']}x one.", "",
                  "| setup | threads / process | images/s | step s | vs 1 process |", "|---|---|---|---|---|"]
        for r in s["rows"]:
            lines.append(f"| {r['setup']} | {r['threads_per_process']} | {_mi(r['images_per_s'])} | "
                         f"{_mi(r['step_s'], '{:.3f}')} | {r['vs_1_process']['median']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def panels(result: dict) -> list:
    out = []
    mark = " (PROVISIONAL)" if result["meta"].get("provisional") else ""
    if "data" in result:
        d = result["data"]
        out.append(bar_panel([(label, [(f"{r['num_workers']} workers", r[key]["median"]) for r in d["rows"]])
                              for label, key in (("after the first batch", "steady_images_per_s"),
                                                 ("incl. start-up", "images_per_s"))],
                             f"data pipeline, {d['image_size']} px VAR transform{mark}", ylabel="images/s"))
    if "mfu" in result:
        out.append(bar_panel([(r["shape"], [("MFU %", 100 * r["mfu"])]) for r in result["mfu"]["rows"]],
                             f"training-step MFU (% of measured fp32 matmul peak){mark}", ref_line=100 * MFU_TARGET,
                             ylabel="%"))
    if "scaling" in result:
        rows = result["scaling"]["rows"]
        out.append(bar_panel([("images/s", [(f"{r['setup']} x{r['threads_per_process']}", r["images_per_s"]["median"])
                                            for r in rows])], f"CPU training throughput{mark}", ylabel="images/s"))
        out.append(bar_panel([("vs 1 process", [(f"{r['setup']} x{r['threads_per_process']}", r["vs_1_process"]["median"])
                                                for r in rows])], f"scaling vs 1 process (target {SCALING_TARGET}x){mark}",
                             ref_line=SCALING_TARGET, ylabel="x"))
    return out


def save_plot(result: dict, path: Path) -> Path:
    return save_panels(panels(result), path, cols=2)

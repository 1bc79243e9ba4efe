"""Every accelerator on shipped models v2 (64 px Fashion-MNIST, the official 10-scale schedule, L = 680 tokens)
in the papers' settings, with the paper's figure beside ours.

One protocol (benchmarks/benchmark.py: interleaved rounds, medians with IQR, ratios against `default` from the
same rounds, a noisy row re-measured once). Two runs of it: the full pipeline (tokenizer decoder included), which
also scores --quality-images class-balanced images per sampler with the offline proxy (FD with a bootstrap
interval, accuracy with a Wilson interval, agreement with `default` on the same label and seed), and token
generation only (`--no-decode`, how CoDe and DD time themselves).

Models (checkpoints/fmnist64/): the drafter is the main VAR and every row's baseline; CoDe runs the fine-tuned
refiner (code_refiner) after the drafter's scales (the fine-tuned drafter, code_drafter, is measured with its
pair against its own default in benchmarks/code_finetuned.py); Block-SJD's `var` draft is the plain refiner; DD
is the student distilled from the drafter; ScaleKV uses the drafter's calibration.

  python -m benchmarks.substrate_v2 --out benchmarks/results/substrate_v2
  python -m benchmarks.substrate_v2 --readme     # regenerate the README block from the committed JSON
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import benchmark
from benchmarks.results_io import generated_block, paired_fd_lines, quality_cells, replace_block, write_result
from training.errors import make_parser, run_cli

ROOT = Path(__file__).resolve().parents[1]
SUB = "checkpoints/fmnist64"
RESULT = ROOT / "benchmarks" / "results" / "substrate_v2.json"
MARKERS = ("<!-- substrate-v2:start -->", "<!-- substrate-v2:end -->")
CAL = f"{SUB}/scalekv_drafter.json"


@dataclass(frozen=True)
class Case:
    spec: str  # a benchmark --sampler spec
    setting: str  # the paper's setting this row stands for
    paper: str  # the paper's figure (ImageNet 256 px, GPU)
    target: str = ""  # the target for this substrate, if any


CASES = (
    Case("default", "VAR, 10 scales", "1.0x (VAR-d30 FID 1.95; VAR-d16 FID 4.19 in DD1's protocol)"),
    Case("code:draft_scales=8", "CoDe N = 8 (d30 -> d16)", "1.7x at batch 64, FID 1.95 -> 1.98", ">= 2x at FD <= +5 %"),
    Case("code:draft_scales=6", "CoDe N = 6", "1.6x batch 1, 2.9x batch 64, FID 1.95 -> 2.27", ">= 2x at FD <= +5 %"),
    Case(f"scalekv:calibration={CAL},budget_frac=0.1", "ScaleKV 10 % (Infinity-8B)",
         "KV 10 %, up to 1.25x, FID change small", "<= 25 % KV at >= 1.1x, batch 16"),
    Case(f"scalekv:calibration={CAL},budget_frac=0.25", "ScaleKV 25 %", "KV 25 %", "<= 25 % KV at >= 1.1x, batch 16"),
    Case("scalekv:policy=snapkv,budget_frac=0.1", "SnapKV at 10 % (ScaleKV's baseline)", "below ScaleKV"),
    Case("scalekv:policy=window,budget_frac=0.1", "sliding window at 10 % (ScaleKV's baseline)", "below ScaleKV"),
    Case("sjd:draft=jacobi", "SJD, Jacobi init (raster AR, Lumina-mGPT)", "about 2x, lossless", ">= 0.95x at batch 16"),
    Case("sjd:draft=random", "Block-SJD, random drafts", "(no paper figure)", ">= 0.95x at batch 16"),
    Case("sjd:draft=var", "Block-SJD, small-VAR drafts", "(no paper figure)", ">= 0.95x at batch 16"),
    Case("sjd:draft=dd", "Block-SJD, DD-student drafts", "(no paper figure)", ">= 0.95x at batch 16"),
    Case("sjd:draft=jacobi,window_policy=adaptive", "Block-SJD, Jacobi drafts, adaptive windows", "(no paper figure)",
         ">= 0.95x at batch 16"),
    Case("sjd:draft=var,window_policy=adaptive", "Block-SJD, small-VAR drafts, adaptive windows", "(no paper figure)",
         ">= 0.95x at batch 16"),
    Case("sjd:draft=random,window_policy=adaptive", "Block-SJD, random drafts, adaptive windows", "(no paper figure)",
         ">= 0.95x at batch 16"),
    Case("sjd:draft=dd,window_policy=adaptive", "Block-SJD, DD-student drafts, adaptive windows", "(no paper figure)",
         ">= 0.95x at batch 16"),
    Case("dd:schedule=1step", "DD1 VAR-d16, 1 step", "6.3x, FID 4.19 -> 9.94", ">= 6x at batch 1, FD <= 2x teacher"),
    Case("dd:schedule=2step", "DD1 VAR-d16, 2 steps", "3.7x, FID 7.82", "FD <= 2x teacher"),
    Case("dd:schedule=teacher", "DD1 + teacher, 3 steps", "2.6x, FID 6.54"),
    Case("dd:schedule=teacher,teacher_start=0", "DD1 + teacher, 6 steps", "1.5x, FID 5.03"),
    Case(f"code+scalekv:draft_scales=8,scalekv.calibration={CAL},"
         f"scalekv.refiner_calibration={SUB}/scalekv_refiner.json,budget_frac=0.25", "CoDe N = 8 + ScaleKV 25 %",
         "(not in either paper)"),
    Case("code+sjd:draft_scales=8,draft=jacobi", "CoDe N = 8 + Block-SJD", "(not in either paper)"),
    Case(f"sjd+scalekv:draft=var,calibration={CAL},budget_frac=0.25", "Block-SJD + ScaleKV 25 %", "(not in either paper)"),
)


# DD1's ordering (more teacher involvement, better images) and each schedule against the teacher itself
PAIRED = (("dd:schedule=2step", "dd:schedule=1step"), ("dd:schedule=teacher", "dd:schedule=2step"),
          ("dd:schedule=teacher,teacher_start=0", "dd:schedule=teacher"), ("dd:schedule=1step", "default"),
          ("code:draft_scales=8", "default"), ("code:draft_scales=6", "default"))


def bench_argv(args, decode: bool) -> list[str]:
    argv = ["--vae", f"{SUB}/tokenizer.safetensors", "--var", f"{SUB}/var_drafter.safetensors",
            "--model", f"refiner={SUB}/code_refiner.safetensors", "--model", f"draft_model={SUB}/var_refiner.safetensors",
            "--model", f"student={SUB}/dd_student.safetensors", "--batch-sizes", args.batch_sizes,
            "--repeats", str(args.repeats), "--warmup", "1", "--num-threads", str(args.num_threads),
            "--seed", str(args.seed), "--cfg", str(args.cfg), "--top-k", str(args.top_k), "--top-p", str(args.top_p),
            "--out", "unused"]
    for case in CASES:
        argv += ["--sampler", case.spec]
    if decode:
        argv += ["--proxy-classifier", args.proxy_classifier, "--quality-images", str(args.quality_images),
                 "--count-flops"]
        for a, b in PAIRED:
            argv += ["--paired-fd", f"{a}..{b}"]
    else:
        argv.append("--no-decode")
    return argv


def run(args) -> dict:
    runs = {}
    for decode in (True, False):
        argv = bench_argv(args, decode)
        bench_args = benchmark.build_parser().parse_args(argv)
        bench_args.argv = argv
        with torch.no_grad():
            runs["full" if decode else "no_decode"] = benchmark.run(bench_args)
    return {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "models": SUB,
                     "sampling": {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p},
                     "quality_images": args.quality_images, "repeats": args.repeats,
                     "cases": [case.__dict__ for case in CASES]},
            "runs": runs}


def _row(run: dict, spec: str, batch: int | None = None) -> dict | None:
    return next((r for r in run["rows"] if r["sampler"] == spec and (batch is None or r["batch"] == batch)
                 and (batch is not None or "proxy_fd" in r)), None)


def speed_cell(run: dict, spec: str, batch: int) -> str:
    row = _row(run, spec, batch)
    if row is None:
        return "—"
    # half the IQR of the round-paired ratios (runs before they were stored: of the row's own times)
    half = row.get("speedup_iqr", row["iqr_frac"] * row["speedup_vs_baseline"]) / 2
    return f"{row['speedup_vs_baseline']:.2f}x ± {half:.2f}" + (" noisy" if row.get("noisy") else "")


def ratio_cell(run: dict, spec: str, batch: int, key: str, fmt) -> str:
    """One ratio of a row (KV bytes as a percentage, FLOPs as a factor); '—' where the row has none."""
    row = _row(run, spec, batch)
    return "—" if row is None or key not in row else fmt(row[key])


def percent(v: float) -> str:
    return f"{100 * v:.0f} %"


def load_text(load: list[float] | None) -> str:
    """The 1-minute load average (the benchmark records 1, 5 and 15 minutes; None where the OS has none)."""
    return "unknown" if not load else f"{load[0]:.2f}"


def markdown(result: dict) -> str:
    m, full, fast = result["meta"], result["runs"]["full"], result["runs"]["no_decode"]
    batches = sorted({r["batch"] for r in full["rows"]})
    sampling = "".join(f"{k.replace('_', '-')} {v}, " for k, v in m.get("sampling", {}).items())
    sampling = f"sampling with {sampling[:-2]}. " if sampling else ""
    head = (["setting (paper)", "paper's figure", "ours: sampler"] + [f"b{b} full" for b in batches] +
            [f"b{b} no decode" for b in batches] +
            [f"FLOP ceiling b{batches[0]}", f"KV peak b{batches[-1]}", "KV kept", "proxy FD", "proxy accuracy",
             "proxy recall", "token agreement vs default", "target"])
    paired = any("speedup_iqr" in r for run in (full, fast) for r in run["rows"])
    spread = "of the round-paired ratios " if paired else "of the sampler's own times "
    lines = [f"Measured {m['date']} on {full['meta']['device']} ({full['meta']['torch_threads']} torch threads, load "
             f"average {load_text(full['meta'].get('load_average_start'))} at start); models {m['models']}; speed = ratio to "
             f"`default` in the same rounds ± half the IQR {spread}({m['repeats']} rounds, a noisy row measured "
             f"again over twice as many; `noisy`: IQR > 10 % of the median); "
             f"{m['quality_images']} class-balanced images per sampler, 95 % intervals; {sampling}KV peak: the most "
             f"KV bytes held during a forward (the current scale's own entries included), KV kept: the largest cache "
             f"a compressing policy carries from one scale to the next (what its budget bounds), both against "
             f"`default`; FLOP ceiling: `default`'s model FLOPs per image over the sampler's (the speed-up a "
             f"compute-bound machine allows; transformer, decoder and attention counted); Paper figures: ImageNet "
             f"256 px on GPUs (spec accelerators.md).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in m["cases"]:
        s = case["spec"]
        shown = s.replace(f"{SUB}/", "")
        cells = ([case["setting"], case["paper"], f"`{shown}`"] + [speed_cell(full, s, b) for b in batches] +
                 [speed_cell(fast, s, b) for b in batches] +
                 [ratio_cell(full, s, batches[0], "model_flop_ratio_vs_baseline", lambda v: f"{v:.2f}x"),
                  ratio_cell(full, s, batches[-1], "kv_bytes_ratio_vs_baseline", percent),
                  ratio_cell(full, s, batches[-1], "kv_kept_ratio_vs_baseline", percent)] +
                 quality_cells(_row(full, s), recall=True) + [case["target"] or "—"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += paired_fd_lines(full.get("paired_fd", []), lambda spec: spec.replace(f"{SUB}/", ""))
    return "\n".join(lines) + "\n"


def readme_block(path: Path = RESULT) -> str:
    return generated_block(MARKERS, path, markdown, "python -m benchmarks.substrate_v2 --readme")


def update_readme(readme: Path = ROOT / "README.md") -> None:
    replace_block(readme, MARKERS, readme_block())


def main(argv=None) -> None:
    p = make_parser(description=__doc__)
    p.add_argument("--readme", action="store_true", help="only regenerate the README block from the committed JSON")
    p.add_argument("--out", default=str(RESULT.with_suffix("")), help="output stem (writes .json and .md)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quality-images", type=int, default=1000)
    p.add_argument("--proxy-classifier", default="eval/weights/fmnist64_classifier.safetensors")
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    # DD1's settings for VAR (cfg 2.0, top-k 900 of 4096 codes, top-p 0.95), top-k scaled to 1024 codes: the DD
    # student's training data were drawn with them, so its rows and the teacher's compare like for like
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--top-k", type=int, default=225)
    p.add_argument("--top-p", type=float, default=0.95)
    args = p.parse_args(argv)
    if args.readme:
        update_readme()
        return
    print(write_result(args.out, run(args), markdown))


if __name__ == "__main__":
    sys.exit(run_cli(main))

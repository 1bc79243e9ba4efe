"""CoDe training-free vs fine-tuned (spec accelerators §1.3): the same protocol for both drafter/refiner pairs.

Each pair is measured by benchmarks/benchmark.py (one protocol: interleaved rounds, medians with IQR, ratios
against the pair's own `default` in the same rounds) twice: the full pipeline (tokenizer decoder included) and
token generation only (`--no-decode`, as CoDe's paper times it). The full-pipeline run also scores
`--quality-images` class-balanced images per sampler with the offline proxy (FD with a basic-bootstrap interval,
accuracy with a Wilson interval) and compares every image with the pair's default on the same label and seed
(PSNR, token agreement, t intervals).

  training-free: MODELS/var_drafter + var_refiner (the pre-trained pair, no CoDe training)
  fine-tuned:    MODELS/code_drafter + code_refiner (configs/fmnist*_code_{drafter,refiner}.toml)

  python -m benchmarks.code_finetuned                                # shipped 32 px pair, N = 5 of 6
  python -m benchmarks.code_finetuned --models checkpoints/fmnist64  # shipped models v2, N = 8 of 10
  python -m benchmarks.code_finetuned --readme     # regenerate the README blocks from the committed JSON

N defaults to round(0.8 K) of the drafter's K scales (the `code` sampler's default, and the N both shipped pairs
were fine-tuned for); the proxy classifier defaults to the one trained on the folder's image size.
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import benchmark
from benchmarks.results_io import generated_block, quality_cells, replace_block, write_result
from samplers.code.sampler import default_draft_scales
from training.checkpoint import read_metadata
from training.errors import make_parser, run_cli

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = "checkpoints/fmnist"
# one committed result and one README block per shipped model folder
RESULTS = {"checkpoints/fmnist": (ROOT / "benchmarks" / "results" / "code_finetuned_fmnist.json",
                                  ("<!-- code-finetuned:start -->", "<!-- code-finetuned:end -->")),
           "checkpoints/fmnist64": (ROOT / "benchmarks" / "results" / "code_finetuned_fmnist64.json",
                                    ("<!-- code-finetuned-v2:start -->", "<!-- code-finetuned-v2:end -->"))}
# the offline proxy trained at each folder's image size (eval/proxy_classifier)
CLASSIFIERS = {"checkpoints/fmnist": "eval/weights/fmnist_classifier.safetensors",
               "checkpoints/fmnist64": "eval/weights/fmnist64_classifier.safetensors"}


def pairs(models: str) -> dict[str, tuple[str, str]]:
    """The training-free and the fine-tuned (drafter, refiner) checkpoints of a shipped model folder."""
    return {"training-free": (f"{models}/var_drafter.safetensors", f"{models}/var_refiner.safetensors"),
            "fine-tuned": (f"{models}/code_drafter.safetensors", f"{models}/code_refiner.safetensors")}


def folder_draft_scales(models: str) -> int:
    """round(0.8 K) of the folder's fine-tuned drafter (K read from its checkpoint)."""
    drafter = ROOT / pairs(models)["fine-tuned"][0]
    return default_draft_scales(len(read_metadata(drafter)["config"]["patch_nums"]))


def pair_argv(drafter: str, refiner: str, draft_scales: int, args, decode: bool) -> list[str]:
    argv = ["--vae", f"{args.models}/tokenizer.safetensors", "--var", drafter, "--model", f"refiner={refiner}",
            "--sampler", "default", "--sampler", f"code:draft_scales={draft_scales}", "--batch-sizes", args.batch_sizes,
            "--repeats", str(args.repeats), "--warmup", "1", "--num-threads", str(args.num_threads),
            "--seed", str(args.seed), "--out", "unused"]
    if decode:
        argv += ["--proxy-classifier", args.proxy_classifier, "--quality-images", str(args.quality_images)]
    else:
        argv.append("--no-decode")
    return argv


def run(args) -> dict:
    runs, checkpoints = {}, pairs(args.models)
    for pair, (drafter, refiner) in checkpoints.items():
        for decode in (True, False):
            argv = pair_argv(drafter, refiner, args.draft_scales, args, decode)
            bench_args = benchmark.build_parser().parse_args(argv)
            bench_args.argv = argv
            with torch.no_grad():
                runs[f"{pair}/{'full' if decode else 'no_decode'}"] = benchmark.run(bench_args)
    return {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "draft_scales": args.draft_scales,
                     "pairs": {k: {"drafter": d, "refiner": r} for k, (d, r) in checkpoints.items()},
                     "quality_images": args.quality_images, "repeats": args.repeats},
            "runs": runs}


def _speed(run: dict, spec: str, batch: int) -> str:
    row = next((r for r in run["rows"] if r["sampler"] == spec and r["batch"] == batch), None)
    if row is None:
        return "—"
    text = f"{row['speedup_vs_baseline']:.2f}x ({1000 * row['median_s']:.0f} ± {1000 * row['iqr_s'] / 2:.0f} ms)"
    return text + (" noisy" if row.get("noisy") else "")


def _quality(run: dict, spec: str) -> list[str]:
    return quality_cells(next((r for r in run["rows"] if r["sampler"] == spec and "proxy_fd" in r), None))


def markdown(result: dict) -> str:
    m, runs = result["meta"], result["runs"]
    spec = f"code:draft_scales={m['draft_scales']}"
    batches = sorted({r["batch"] for r in next(iter(runs.values()))["rows"]})
    head = ["pair", "sampler"] + [f"speed b{b} full" for b in batches] + [f"speed b{b} no decode" for b in batches] + [
        "proxy FD", "proxy accuracy", "token agreement vs the pair's default"]
    lines = [f"Measured {m['date']}; N = {m['draft_scales']} draft scales; speed = ratio to the pair's own `default` in the "
             f"same rounds (median ± half the IQR of {m['repeats']} rounds; `noisy`: IQR > 10 % of the median); "
             f"{m['quality_images']} class-balanced images per sampler, 95 % intervals.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pair in m["pairs"]:
        full, fast = runs[f"{pair}/full"], runs[f"{pair}/no_decode"]
        for s in ("default", spec):
            cells = [pair, f"`{s}`"] + [_speed(full, s, b) for b in batches] + [_speed(fast, s, b) for b in batches]
            lines.append("| " + " | ".join(cells + list(_quality(full, s))) + " |")
    return "\n".join(lines) + "\n"


def readme_block(path: Path, markers: tuple[str, str]) -> str:
    return generated_block(markers, path, markdown, "python -m benchmarks.code_finetuned --readme")


def update_readme(readme: Path = ROOT / "README.md") -> None:
    for path, markers in RESULTS.values():
        if path.is_file():
            replace_block(readme, markers, readme_block(path, markers))


def main(argv=None) -> None:
    p = make_parser(description=__doc__)
    p.add_argument("--readme", action="store_true", help="only regenerate the README block from the committed JSON")
    p.add_argument("--models", default=SHIPPED, choices=sorted(RESULTS), help="the shipped model folder")
    p.add_argument("--out", default=None, help="output stem (writes .json and .md; default: the folder's result)")
    p.add_argument("--draft-scales", type=int, default=None, help="N (default round(0.8 K), the N the shipped "
                                                                  "pairs were fine-tuned for)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quality-images", type=int, default=1000)
    p.add_argument("--proxy-classifier", default=None, help="default: the folder's (CLASSIFIERS)")
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.readme:
        update_readme()
        return
    out = args.out or str(RESULTS[args.models][0].with_suffix(""))
    args.draft_scales = args.draft_scales if args.draft_scales is not None else folder_draft_scales(args.models)
    args.proxy_classifier = args.proxy_classifier or CLASSIFIERS[args.models]
    print(write_result(out, run(args), markdown))


if __name__ == "__main__":
    sys.exit(run_cli(main))

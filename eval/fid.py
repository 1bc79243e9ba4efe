"""Evaluate generated samples: FID, sFID, IS, precision/recall, KID (Inception) and/or the offline proxy.

    python -m eval.fid --samples samples/run1.npz --ref VIRTUAL_imagenet256_labeled.npz \
        --inception weights/pt_inception-2015-12-05-6726825d.pth
    python -m eval.fid --samples samples/fmnist/ --proxy-classifier eval/weights/fmnist_classifier.safetensors

--samples: a folder of PNG/JPEG files or an ADM-format .npz (`arr_0` uint8 NHWC, optional `arr_1` labels).
--ref: our statistics file (`python -m eval.ref_stats`) or an ADM reference batch; --fid-mode picks the
protocol (adm / recompute / clean, see the README's FID modes table; default: the one --ref was made in). The proxy compares with
the real Fashion-MNIST test set (--proxy-data) or a proxy statistics file (--proxy-ref). Prints the metrics
and writes them as JSON (--out, default next to the samples).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import torch

from eval.data import open_images
from eval.harness import (FIDModeError, default_fid_mode, evaluate, fashion_mnist_reference, load_reference,
                          pick_device)
from eval.resize import FID_MODES
from eval.proxy import write_json_atomic
from training.atomic import check_writable

DEFAULT_FMNIST = "/usr/share/datasets/fashion-mnist"


def build_parser() -> argparse.ArgumentParser:
    from training.errors import make_parser

    ap = make_parser(description=__doc__)
    ap.add_argument("--samples", required=True, help="folder of PNG/JPEG or ADM .npz (arr_0 uint8 NHWC)")
    ap.add_argument("--labels", help="intended class labels (.npy or .txt, one per image in file order); "
                                     "default: arr_1 / labels of the .npz")
    ap.add_argument("--ref", help="reference statistics .npz (ours or ADM's reference batch) for Inception metrics")
    ap.add_argument("--inception", help="local path of pt_inception-2015-12-05-6726825d.pth")
    ap.add_argument("--fid-mode", choices=("auto",) + FID_MODES, default="auto",
                    help="adm: the reference file's stored statistics as they are + the TF graph's input path "
                         "(what published ImageNet FIDs use); recompute: both sides through our network with "
                         "pytorch-fid's resize; clean: clean-fid's PIL bicubic resize on both sides; auto (default): "
                         "the mode the --ref file's statistics were made in (adm for an ADM reference batch), "
                         "recompute for a file of images only")
    ap.add_argument("--ref-stats-from-file", action="store_true", help=argparse.SUPPRESS)  # old name of --fid-mode adm
    ap.add_argument("--bootstrap", type=int, default=200,
                    help="bootstrap resamples for the 95%% confidence intervals (0: no intervals)")
    ap.add_argument("--ci-seed", type=int, default=0, help="seed of the bootstrap resampling")
    ap.add_argument("--proxy-classifier", help="proxy classifier .safetensors (eval/weights/fmnist_classifier.safetensors)")
    ap.add_argument("--proxy-ref", help="proxy statistics .npz from `python -m eval.ref_stats --proxy-classifier ...`")
    ap.add_argument("--proxy-data", default=DEFAULT_FMNIST, help="Fashion-MNIST folder (real test set for the proxy)")
    ap.add_argument("--out", help="metrics JSON (default: <samples>_metrics.json next to the samples)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--device", help="cpu / cuda / cuda:1 (default: cuda if available)")
    ap.add_argument("--is-splits", type=int, default=10)
    ap.add_argument("--kid-subsets", type=int, default=100)
    ap.add_argument("--kid-subset-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    return ap


def software_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        toolkit = version("var-toolkit")
    except PackageNotFoundError:
        toolkit = "source checkout"
    return {"toolkit": toolkit, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__}


def run(args: argparse.Namespace) -> dict:
    if not args.inception and not args.proxy_classifier:
        raise SystemExit("nothing to compute: pass --inception PATH (with --ref) and/or --proxy-classifier PATH")
    if args.inception and not args.ref:
        raise SystemExit("--inception needs --ref (reference statistics or an ADM reference batch)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    source = open_images(args.samples, args.labels)
    report = {"samples": str(args.samples), "num_samples": len(source),
              "image_size": list(source.image_size), "has_labels": source.labels is not None,
              "device": str(device), "software": software_versions(), "settings": vars(args)}
    start = time.perf_counter()
    common = dict(batch_size=args.batch_size, device=device, kid_subsets=args.kid_subsets,
                  kid_subset_size=args.kid_subset_size, is_splits=args.is_splits,
                  bootstrap=getattr(args, "bootstrap", 0), ci_seed=getattr(args, "ci_seed", 0))
    if args.inception:
        from eval.inception import InceptionFeatures

        mode = resolve_fid_mode(args)
        net = InceptionFeatures.from_file(args.inception, device, mode=mode)
        ref = load_reference(args.ref, net, batch_size=args.batch_size, device=device)
        report["inception"] = evaluate(net, source, ref, **common)
    if args.proxy_classifier:
        from eval.proxy import load_classifier

        net = load_classifier(args.proxy_classifier, device)
        if args.proxy_ref:
            ref = load_reference(args.proxy_ref, net, batch_size=args.batch_size, device=device)
        else:
            ref = fashion_mnist_reference(args.proxy_data, net, device=device)
        # "proxy_" on every key: these are not FID/IS and must never be reported as such
        report["proxy"] = evaluate(net, source, ref, prefix="proxy_", labels=source.labels, compute_is=False, **common)
        report["proxy"]["note"] = ("offline proxy: distances in a small Fashion-MNIST classifier's features; "
                                   "not FID, not comparable with published numbers")
    report["total_seconds"] = round(time.perf_counter() - start, 2)
    return report


def resolve_fid_mode(args: argparse.Namespace) -> str:
    mode = getattr(args, "fid_mode", "auto")
    if getattr(args, "ref_stats_from_file", False):
        if mode not in ("auto", "adm"):
            raise SystemExit(f"--ref-stats-from-file means --fid-mode adm, which contradicts --fid-mode {mode}")
        mode = "adm"
    return default_fid_mode(args.ref) if mode == "auto" else mode


def default_out(samples: str | Path) -> Path:
    samples = Path(samples)
    return samples.parent / f"{samples.stem if samples.is_file() else samples.name}_metrics.json"


def format_metrics(report: dict) -> str:
    lines = []
    for part in ("inception", "proxy"):
        if part in report:
            cis = report[part].get("intervals", {})
            for key, value in report[part]["metrics"].items():
                text = f"{value:.6g}" if isinstance(value, float) else str(value)
                if key in cis:
                    text += f"  [{cis[key]['low']:.6g}, {cis[key]['high']:.6g}] ({cis[key]['level']:.0%} CI)"
                lines.append(f"{part:9s} {key:18s} {text}")
            if "protocol" in report[part]:
                p = report[part]["protocol"]
                lines.append(f"{part:9s} FID mode {p['fid_mode']}, resize {p['resize']}, {p['num_samples']} samples, "
                             f"Inception sha256 {p['weights_sha256']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.inception and not args.proxy_classifier:
        parser.error("nothing to compute: pass --inception PATH (with --ref) and/or --proxy-classifier PATH")
    if args.inception and not args.ref:
        parser.error("--inception needs --ref (reference statistics or an ADM reference batch)")
    if getattr(args, "ref_stats_from_file", False) and not args.inception:
        parser.error("--ref-stats-from-file applies to the Inception reference: use it with --inception and --ref")
    out = Path(args.out) if args.out else default_out(args.samples)
    check_writable(out, "--out", folder=False)  # before the features are computed
    try:
        report = run(args)
    except FIDModeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json_atomic(out, report)
    print(format_metrics(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from training.errors import run_cli

    sys.exit(run_cli(main))

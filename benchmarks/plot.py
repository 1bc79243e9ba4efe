"""Charts from benchmark result JSON: the CoDe / ScaleKV panels, a redraw of any result's bar chart, and a
speed-versus-quality scatter of every sampler. Figures under benchmarks/results/figures/ get a sidecar JSON
(their inputs' sha256, settings, the command) that tests/test_figures_current.py checks.

  python -m benchmarks.plot scatter benchmarks/results/benchmark_fmnist.json \\
      --out benchmarks/results/figures/speed_quality_fmnist.png
  python -m benchmarks.plot bars benchmarks/results/benchmark_fmnist.json \\
      --out benchmarks/results/figures/speedup_fmnist.png      # default --out: the PNG beside the JSON
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.plotting import Panel, ScatterPoint, bar_chart, bar_panel, have_matplotlib, save_panels, scatter_chart
from training.atomic import atomic_write_json, file_sha256

ROOT = Path(__file__).resolve().parents[1]


def panels(result: dict) -> list[Panel]:
    out = []
    q = result.get("quality")
    if q:
        groups = [(f"N={n}", [("speed x", r["speed_ratio"]), ("KV peak ratio", r["kv_peak_ratio"])])
                  for n, r in q["code"].items()]
        out.append(bar_panel(groups, "CoDe vs drafter-only (ratios)", ref_line=1.0, ylabel="ratio"))
        kv = q["kv_compression"]
        budgets = sorted({k.split("@")[1] for k in kv}, key=float)
        policies = list(dict.fromkeys(k.split("@")[0] for k in kv))
        out.append(bar_panel([(f"budget {b}", [(p, kv[f"{p}@{b}"]["psnr_db"]) for p in policies if f"{p}@{b}" in kv])
                              for b in budgets], "PSNR vs uncompressed, by KV budget fraction", ref_line=25.0,
                             ylabel="dB"))
        out.append(bar_panel([(f"budget {b}", [(p, kv[f"{p}@{b}"].get("kv_kept_ratio", 1.0)) for p in policies
                                               if f"{p}@{b}" in kv]) for b in budgets],
                             "kept KV bytes / full cache, by KV budget fraction", ylabel="ratio"))
    o = result.get("official_shapes")
    if o:
        groups = []
        for key, res in o.items():
            if not key.startswith("batch_"):
                continue
            for name, row in res.items():
                if name == "refiner_only":
                    continue
                groups.append((f"B{key[6:]} {name[4:]}", [(k, v["speed_ratio"]) for k, v in row.items() if k.startswith("code_")]))
        out.append(bar_panel(groups, "official shapes (random init): CoDe speed x vs drafter-only", ref_line=1.0,
                             ylabel="x"))
    return out


def save_plot(result: dict, path: str | Path) -> Path:
    return save_panels(panels(result), path)


def redraw(result: dict, path: Path) -> Path:
    """The bar chart the benchmark script that wrote `result` draws, from the JSON alone."""
    if "rows" in result and "meta" in result:  # benchmarks/benchmark.py (same groups as its write_outputs)
        rows = sampler_rows(result)
        groups = {f"batch {b}": {r["sampler"]: speedup(r) for r in rows if r["batch"] == b}
                  for b in sorted({r["batch"] for r in rows})}
        return bar_chart(path, groups, "speed-up vs default sampler (same run)", "x", reference_line=1.0)
    if "quality" in result or "official_shapes" in result:
        return save_plot(result, path)
    if "speed" in result and "relaxed" in result:
        from benchmarks.sjd_dd import plot  # lazily: it pulls in torch and the samplers
        plot(result, path)
        return path
    raise ValueError(f"unknown result layout (top-level keys {sorted(result)}); expected the JSON of "
                     f"benchmarks/benchmark.py, code_scalekv.py or sjd_dd.py")


def speed_quality_points(result: dict, batch: int | None = None) -> tuple[list[ScatterPoint], int]:
    """Every sampler's (speed-up vs default, proxy FD) at one batch size, with error bars where the row
    carries intervals (see row_interval). The batch defaults to the largest one that has proxy FD."""
    rows = [r for r in sampler_rows(result) if "proxy_fd" in r]
    if not rows:
        raise ValueError("no row of this result has proxy_fd; rerun benchmarks/benchmark.py with --proxy-classifier")
    batch = max(r["batch"] for r in rows) if batch is None else batch
    rows = [r for r in rows if r["batch"] == batch]
    if not rows:
        raise ValueError(f"no row with proxy_fd at batch {batch}; batches with it: "
                         f"{sorted({r['batch'] for r in result['rows'] if 'proxy_fd' in r})}")
    return [ScatterPoint(r["sampler"], speedup(r), r["proxy_fd"],
                         row_interval(r, "speedup_vs_baseline") or row_interval(r, "speedup_vs_default"),
                         row_interval(r, "proxy_fd")) for r in rows], batch


def sampler_rows(result: dict) -> list[dict]:
    """The rows of samplers (not the public loop or decoder-only contenders of the protocol)."""
    return [r for r in result.get("rows", []) if r.get("kind", "ours") == "ours"]


def speedup(row: dict) -> float:
    """Speed-up over the run's baseline (protocol 2) or over the default sampler (older result files)."""
    return row["speedup_vs_baseline"] if "speedup_vs_baseline" in row else row["speedup_vs_default"]


def row_interval(row: dict, key: str) -> tuple[float, float] | None:
    """`key`'s interval in a result row: `<key>_ci` as [low, high] or as eval.intervals' {"low", "high", ...},
    or `intervals[key]` (the eval-card layout); None when the row has none."""
    ci = row.get(f"{key}_ci") or row.get("intervals", {}).get(key)
    if not ci:
        return None
    return (float(ci["low"]), float(ci["high"])) if isinstance(ci, dict) else (float(ci[0]), float(ci[1]))


def rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def default_renderer() -> str:
    if have_matplotlib():
        import matplotlib
        return f"matplotlib {matplotlib.__version__}"
    import PIL
    return f"PIL {PIL.__version__} (matplotlib not installed)"


def write_provenance(png: Path, inputs: list[Path], settings: dict, command: str, renderer: str | None = None) -> Path:
    """`<png stem>.json`: what the figure was drawn from, for the currency test (no re-rendering needed)."""
    record = {"figure": png.name, "figure_sha256": file_sha256(png), "command": command,
              "renderer": renderer or default_renderer(),
              "inputs": {rel(p): file_sha256(p) for p in inputs}, "settings": settings}
    return atomic_write_json(png.with_suffix(".json"), record)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bars", help="redraw a result's bar chart")
    b.add_argument("result", type=Path)
    b.add_argument("--out", type=Path, default=None, help="PNG (default: beside the JSON)")
    s = sub.add_parser("scatter", help="speed-up vs proxy FD of every sampler")
    s.add_argument("result", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--batch", type=int, default=None, help="batch size (default: the largest with proxy FD)")
    args = p.parse_args(argv)
    command = " ".join(["python -m benchmarks.plot"] + (argv if argv is not None else sys.argv[1:]))
    if not args.result.is_file():
        raise SystemExit(f"result file {args.result} does not exist")
    result = json.loads(args.result.read_text())
    if args.what == "bars":
        out = redraw(result, args.out or args.result.with_suffix(".png"))
        settings = {"chart": "bars"}
    else:
        try:
            points, batch = speed_quality_points(result, args.batch)
        except ValueError as err:
            raise SystemExit(f"{args.result}: {err}") from None
        with_ci = any(pt.x_ci or pt.y_ci for pt in points)
        n = next((r.get("proxy_images") for r in result["rows"] if "proxy_fd" in r), None)
        note = (f"{result.get('meta', {}).get('device', '?')}, batch {batch}; speed-up = default sampler's time / "
                f"sampler's time in the same run; proxy FD over {n} images (lower is better); dashed / dotted lines: "
                f"the default sampler. " + ("Bars: the intervals in the JSON." if with_ci
                                             else "No intervals in this JSON, so no error bars."))
        out = scatter_chart(args.out, points, f"Speed vs quality of every sampler ({args.result.name})",
                            "speed-up vs default (x, higher is faster)", "proxy FD (lower is better)",
                            ref_x=1.0, ref_y=next((pt.y for pt in points if pt.label == "default"), None), note=note)
        settings = {"chart": "scatter", "batch": batch, "error_bars": with_ci}
    if out.resolve().parent == (ROOT / "benchmarks" / "results" / "figures").resolve():
        write_provenance(out, [args.result], settings, command)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

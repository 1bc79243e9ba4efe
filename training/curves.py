"""Plot training curves from metrics.jsonl as one PNG: one panel per key against the step; a train key and
its validation twin (`loss` and `val_loss`) share a panel; several runs are overlaid with labels.

    python -m training.curves runs/var_d16 --out curves.png
    python -m training.curves runs/a runs/b/metrics.jsonl --out cmp.png --keys loss,acc_s0+acc_s5 --smooth 20

Each argument is a run folder (train.out_dir, holding metrics.jsonl) or a .jsonl file. `--keys` is a comma list
of panels; `a+b` draws several keys on one panel. Without it: loss, the last scale's accuracy, psnr,
grad_norm, lr and images_per_s, those present in the logs. `--smooth N` draws the trailing mean of the last N
logged points over the raw curve (not lr). A partial last line (a run killed mid-write) is skipped. The figure is
400 x 300 pixels per panel at --dpi 100, at most 3 panels a row. Needs matplotlib.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from training.atomic import atomic_write
from training.errors import make_parser, run_cli
from training.run_state import read_log_records

PANEL_INCHES = (4.0, 3.0)  # width, height of one panel
COLUMNS = 3
VAL_PREFIX = "val_"
NOT_CURVES = {"step", "epoch"}
NOT_SMOOTHED = {"lr", "epoch", "wall_s"}  # schedules and clocks: a trailing mean would only shift them
TRAIN_STYLES = ("-", ":", "-.", (0, (5, 1)))  # keys of one panel, several runs: the run is the colour
DEFAULT_KEYS = ("loss", "acc_last", "psnr", "grad_norm", "lr", "images_per_s")


def load_run(source: str | Path) -> tuple[str, list[dict]]:
    """(label, records) of a run folder or a metrics .jsonl file."""
    path = Path(source)
    if path.is_dir():
        log = path / "metrics.jsonl"
        if not log.is_file():
            raise FileNotFoundError(f"{path}: no metrics.jsonl in this folder; pass a run folder (train.out_dir) "
                                    f"or a metrics .jsonl file")
        label = path.name
    elif path.is_file():
        log, label = path, (path.parent.name if path.name == "metrics.jsonl" else path.stem)
    else:
        raise FileNotFoundError(f"{path}: no such run folder or log file; check the path")
    records = [record for _, record in read_log_records(log)[0]]
    if not records:
        raise ValueError(f"{log}: no complete log line yet; plot once the run has logged a step")
    return label, records


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records if _numeric(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def _keys(runs) -> set[str]:
    return {k for _, records in runs for r in records for k, v in r.items() if _numeric(v)} - NOT_CURVES


def _acc_order(key: str) -> int:
    return int(re.fullmatch(r"acc_s(\d+)", key).group(1))


def default_panels(runs) -> list[list[str]]:
    present, panels = _keys(runs), []
    accs = sorted((k for k in present if re.fullmatch(r"acc_s\d+", k)), key=_acc_order)
    for key in DEFAULT_KEYS:
        key = (accs[-1] if accs else None) if key == "acc_last" else key
        if key in present or key and f"{VAL_PREFIX}{key}" in present:
            panels.append([key])
    return panels or [[sorted(present)[0]]] if present else []


def resolve_panels(spec: str | None, runs) -> list[list[str]]:
    """The keys of each panel, every train key joined by its val_ twin; a key no log holds is an error."""
    present = _keys(runs)
    panels = default_panels(runs) if spec is None else [
        [k.strip() for k in panel.split("+") if k.strip()] for panel in spec.split(",") if panel.strip()]
    if not panels:
        raise ValueError("--keys names no key; give a comma list such as loss,val_loss,acc_s5")
    out, drawn = [], set()
    for panel in panels:
        keys = []
        for key in panel:
            twin = key[len(VAL_PREFIX):] if key.startswith(VAL_PREFIX) else f"{VAL_PREFIX}{key}"
            found = [k for k in (key, twin) if k in present]
            if key not in present and not (spec is None and found):
                available = ", ".join(sorted(present))
                raise ValueError(f"--keys: {key!r} is in none of the logs; choose from: {available}")
            keys += [k for k in sorted(found, key=lambda k: k.startswith(VAL_PREFIX)) if k not in keys]
        if not set(keys) <= drawn:  # `loss,val_loss`: the val key is already on the loss panel
            out.append(keys)
            drawn |= set(keys)
    return out


def smooth(values: list[float], n: int) -> list[float]:
    """Trailing mean of the last n points (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def figure_pixels(num_panels: int, dpi: int) -> tuple[int, int]:
    cols = min(COLUMNS, num_panels)
    rows = math.ceil(num_panels / cols)
    return round(PANEL_INCHES[0] * cols * dpi), round(PANEL_INCHES[1] * rows * dpi)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting curves needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, also on machines without a display
    import matplotlib.pyplot as plt
    return plt


def plot_curves(sources, out: str | Path, keys: str | None = None, smooth_n: int = 1, dpi: int = 100,
                labels: list[str] | None = None, title: str | None = None) -> Path:
    """Draw the curves of the runs in `sources` into the PNG `out` (written atomically); returns its path."""
    if smooth_n < 1:
        raise ValueError(f"--smooth must be >= 1 (logged points to average), got {smooth_n}")
    if dpi < 10:
        raise ValueError(f"--dpi must be >= 10, got {dpi}")
    runs = [load_run(s) for s in sources]
    if labels:
        if len(labels) != len(runs):
            raise ValueError(f"--labels gives {len(labels)} labels for {len(runs)} runs; give one per run")
        runs = [(label, records) for label, (_, records) in zip(labels, runs)]
    panels = resolve_panels(keys, runs)
    plt = _pyplot()
    cols = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), dpi=dpi,
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        train_keys = [k for k in panel if not k.startswith(VAL_PREFIX)] or panel
        for r, (label, records) in enumerate(runs):
            for key in panel:
                steps, values = series(records, key)
                if not steps:
                    continue
                val = key.startswith(VAL_PREFIX)
                base = key[len(VAL_PREFIX):] if val and key[len(VAL_PREFIX):] in panel else key
                # one run: a colour per key (its val twin shares it); several: a colour per run
                color = colors[(r if len(runs) > 1 else train_keys.index(base) if base in train_keys else 0)
                               % len(colors)]
                name = key if len(runs) == 1 else f"{label} {key}" if len(panel) > 1 else label
                solid = TRAIN_STYLES[train_keys.index(base) % len(TRAIN_STYLES)] if len(runs) > 1 and \
                    base in train_keys else "-"
                style = dict(color=color, linestyle="--" if val else solid, marker="o" if val else None, markersize=3)
                if smooth_n > 1 and not val and key not in NOT_SMOOTHED:
                    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                    values = smooth(values, smooth_n)
                ax.plot(steps, values, label=name, linewidth=1.2, **style)
        ax.set_title(" / ".join(panel), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(panel) > 1 or len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()  # moves the axes inside the figure; the figure size (pixels) stays as set
    try:
        return atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), suffix=".png")
    finally:
        plt.close(fig)


def main(argv=None):
    parser = make_parser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="run folders (train.out_dir) or metrics .jsonl files")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--keys", default=None, help="comma list of panels, `a+b` for keys sharing one panel")
    parser.add_argument("--smooth", type=int, default=1, help="trailing mean over N logged points (1: raw)")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--labels", default=None, help="comma list, one legend label per run")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    path = plot_curves(args.runs, args.out, keys=args.keys, smooth_n=args.smooth, dpi=args.dpi, labels=labels,
                       title=args.title)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

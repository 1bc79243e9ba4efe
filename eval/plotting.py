"""Dependency-light charts for benchmark scripts: matplotlib when installed (an optional extra), otherwise a
plain PIL rendering, so every benchmark always writes its PNG."""
from __future__ import annotations

from pathlib import Path

from var.atomic import atomic_write


def bar_chart(path: str | Path, groups: dict[str, dict[str, float]], title: str, ylabel: str,
              reference_line: float | None = None) -> Path:
    """Grouped bars: `groups[group][series] = value` (e.g. groups = batch sizes, series = samplers)."""
    path = Path(path)
    series = sorted({s for values in groups.values() for s in values})
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        atomic_write(path, lambda tmp: _pil_bars(tmp, groups, series, title, ylabel, reference_line), suffix=".png")
        return path
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(groups) * max(1, len(series)) / 2, 4))
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        xs = [i + j * width for i in range(len(groups))]
        ax.bar(xs, [groups[g].get(name, 0.0) for g in groups], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], list(groups))
    if reference_line is not None:
        ax.axhline(reference_line, color="black", linewidth=0.8, linestyle="--")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=".png")
    plt.close(fig)
    return path


def _pil_bars(out: str, groups, series, title, ylabel, reference_line) -> None:
    from PIL import Image, ImageDraw

    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127)]
    bar_w, gap, left, top, bottom, height = 22, 26, 60, 30, 60, 260
    n_bars = max(1, len(series))
    width = left + len(groups) * (n_bars * bar_w + gap) + 20 + 160
    img = Image.new("RGB", (width, top + height + bottom), "white")
    draw = ImageDraw.Draw(img)
    values = [v for g in groups.values() for v in g.values()] + ([reference_line] if reference_line else [])
    vmax = max(values + [1e-12]) * 1.1
    y_of = lambda v: top + height - int(height * v / vmax)  # noqa: E731
    draw.line([(left, top), (left, top + height), (width - 170, top + height)], fill="black")
    for frac in (0.0, 0.5, 1.0):
        draw.text((4, y_of(vmax * frac / 1.1) - 5), f"{vmax * frac / 1.1:.3g}", fill="black")
    for i, (group, vals) in enumerate(groups.items()):
        x0 = left + gap // 2 + i * (n_bars * bar_w + gap)
        for j, name in enumerate(series):
            v = vals.get(name, 0.0)
            draw.rectangle([x0 + j * bar_w, y_of(v), x0 + (j + 1) * bar_w - 3, top + height], fill=palette[j % 8])
        draw.text((x0, top + height + 6), str(group), fill="black")
    if reference_line is not None:
        draw.line([(left, y_of(reference_line)), (width - 170, y_of(reference_line))], fill=(0, 0, 0), width=1)
    for j, name in enumerate(series):
        draw.rectangle([width - 160, top + 16 * j, width - 150, top + 16 * j + 10], fill=palette[j % 8])
        draw.text((width - 145, top + 16 * j - 1), name[:24], fill="black")
    draw.text((left, 8), f"{title}   [{ylabel}]", fill="black")
    img.save(out, format="PNG")

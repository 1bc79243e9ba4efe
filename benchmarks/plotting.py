"""Dependency-light charts for benchmark scripts: PIL bar panels (always available) combined into one
PNG sheet, and a grouped bar chart that uses matplotlib when installed (an optional extra)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from training.atomic import atomic_write

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
PANEL_W, PANEL_H = 560, 300

Groups = list[tuple[str, list[tuple[str, float]]]]  # [(group label, [(series, value), ...]), ...]


def bar_panel(groups: Groups, title: str, ref_line: float | None = None) -> Image.Image:
    """One panel of grouped bars (values >= 0; NaN draws nothing), with an optional reference line."""
    img = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 6), title, fill="black")
    values = [v for _, bars in groups for _, v in bars if v == v] + ([ref_line] if ref_line else [])
    top = max(values + [1e-9]) * 1.15
    x0, x1, y0, y1 = 50, PANEL_W - 10, PANEL_H - 40, 30
    d.line((x0, y0, x1, y0), fill="black")
    d.line((x0, y0, x0, y1), fill="black")
    for frac in (0.0, 0.5, 1.0):
        d.text((4, y0 - (y0 - y1) * frac - 6), f"{top * frac:.3g}", fill="gray")
    series = list(dict.fromkeys(s for _, bars in groups for s, _ in bars))
    slot = (x1 - x0) / max(1, len(groups))
    width = max(2.0, slot * 0.8 / max(1, len(series)))
    for gi, (label, bars) in enumerate(groups):
        gx = x0 + gi * slot + slot * 0.1
        for s, v in bars:
            si = series.index(s)
            h = (y0 - y1) * (v / top if v == v else 0)
            d.rectangle((gx + si * width, y0 - h, gx + (si + 1) * width - 2, y0), fill=COLOURS[si % len(COLOURS)])
        d.text((gx, y0 + 4), label[:12], fill="black")
    if ref_line:
        y = y0 - (y0 - y1) * ref_line / top
        d.line((x0, y, x1, y), fill=(120, 120, 120))
    for si, s in enumerate(series):  # legend: three per row below the axis, the rest along the top
        lx, ly = x0 + 10 + (si % 3) * 170, (PANEL_H - 18 if si < 3 else 16 + 12 * ((si - 3) // 3))
        d.rectangle((lx, ly, lx + 8, ly + 8), fill=COLOURS[si % len(COLOURS)])
        d.text((lx + 12, ly - 2), s[:24], fill="black")
    return img


def save_panels(panels: list[Image.Image], path: str | Path, cols: int = 2) -> Path:
    """Paste panels into one sheet (row-major) and write it atomically as PNG."""
    panels = panels or [bar_panel([], "no results")]
    cols = min(cols, len(panels))
    rows = (len(panels) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * PANEL_W, rows * PANEL_H), "white")
    for i, im in enumerate(panels):
        sheet.paste(im, ((i % cols) * PANEL_W, (i // cols) * PANEL_H))
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"), suffix=".png")


def bar_chart(path: str | Path, groups: dict[str, dict[str, float]], title: str, ylabel: str,
              reference_line: float | None = None) -> Path:
    """Grouped bars: `groups[group][series] = value` (e.g. groups = batch sizes, series = samplers)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        panel = bar_panel([(g, list(v.items())) for g, v in groups.items()], f"{title} [{ylabel}]", reference_line)
        return save_panels([panel], path)
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(groups) * max(1, len(series)) / 2, 4))
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        ax.bar([i + j * width for i in range(len(groups))], [groups[g].get(name, 0.0) for g in groups], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], list(groups))
    if reference_line is not None:
        ax.axhline(reference_line, color="black", linewidth=0.8, linestyle="--")
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), suffix=".png")
    plt.close(fig)
    return Path(path)

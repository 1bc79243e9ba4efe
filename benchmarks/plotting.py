"""Benchmark charts: grouped bars (one panel or a sheet of panels) and a speed-versus-quality scatter.

matplotlib is an optional extra (requirements-test.txt). With it, bars carry their values, labels are shown
in full (wrapped), and the legend sits right of the axes, clear of the title and the ticks. Without it the same
calls draw a plain PIL chart with the same content: full wrapped labels, values on the bars, the legend in
its own band under the title -- cruder, but nothing is cut. `have_matplotlib()` says which one is in use.

  panel = bar_panel([("batch 1", [("code", 1.46), ("sjd", 1.19)]), ...], "speed-up vs default", ref_line=1.0)
  save_panels([panel, ...], "out.png")            # one PNG, panels row-major
  bar_chart("out.png", {"batch 1": {"code": 1.46}}, "speed-up vs default", "x", reference_line=1.0)
  scatter_chart("sq.png", [ScatterPoint("code", 1.39, 212.1, y_ci=(205.0, 219.0))], "title", "speed-up", "FD")
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from training.atomic import atomic_write

Groups = list[tuple[str, list[tuple[str, float]]]]  # [(group label, [(series, value), ...]), ...]
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94"]


@dataclass
class Panel:
    """One chart of grouped bars; values >= 0, NaN draws no bar and reads 'n/a'."""
    groups: Groups
    title: str
    ref_line: float | None = None
    ylabel: str = ""


@dataclass
class ScatterPoint:
    label: str
    x: float
    y: float
    x_ci: tuple[float, float] | None = None  # (low, high) interval, drawn as an error bar when present
    y_ci: tuple[float, float] | None = None


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never a window, also on machines without a display
    import matplotlib.pyplot as plt
    return plt


def fmt(v: float) -> str:
    if v != v:
        return "n/a"
    return f"{v:.2f}" if 0.01 <= abs(v) < 1000 else f"{v:.3g}"


def series_colours(panels: list[Panel]) -> dict[str, str]:
    """One colour per series name across a whole sheet, so 'code' is the same colour in every panel."""
    names = dict.fromkeys(s for p in panels for _, bars in p.groups for s, _ in bars)
    return {s: COLOURS[i % len(COLOURS)] for i, s in enumerate(names)}


def bar_panel(groups: Groups, title: str, ref_line: float | None = None, ylabel: str = "") -> Panel:
    return Panel(list(groups), title, ref_line, ylabel)


def save_panels(panels: list[Panel], path: str | Path, cols: int = 2) -> Path:
    """All panels in one PNG (row-major, `cols` per row), written atomically."""
    panels = panels or [bar_panel([], "no results")]
    cols = max(1, min(cols, len(panels)))
    if have_matplotlib():
        return _save_panels_mpl(panels, Path(path), cols)
    return _save_image(_sheet([_draw_panel_pil(p, series_colours(panels)) for p in panels], cols), Path(path))


def bar_chart(path: str | Path, groups: dict[str, dict[str, float]], title: str, ylabel: str,
              reference_line: float | None = None) -> Path:
    """Grouped bars: `groups[group][series] = value` (e.g. groups = batch sizes, series = samplers)."""
    panel = bar_panel([(g, list(v.items())) for g, v in groups.items()], title, reference_line, ylabel)
    return save_panels([panel], path, cols=1)


def scatter_chart(path: str | Path, points: list[ScatterPoint], title: str, xlabel: str, ylabel: str,
                  ref_x: float | None = None, ref_y: float | None = None, note: str = "") -> Path:
    """Numbered points (the legend maps each number to its full label), interval bars where given."""
    if have_matplotlib():
        return _scatter_mpl(Path(path), points, title, xlabel, ylabel, ref_x, ref_y, note)
    return _save_image(_scatter_pil(points, title, xlabel, ylabel, ref_x, ref_y, note), Path(path))


# ---- matplotlib ------------------------------------------------------------------------------------------
def _wrap(text: str, width: int) -> str:
    """Greedy wrap that may break after ' ', ',', '=', '/' or ':' (sampler specs have few spaces); no
    character is dropped or cut, a single over-long piece just runs long."""
    lines = []
    for para in text.split("\n"):
        line = ""
        for piece in re.findall(r"[^ ,=/:]*[ ,=/:]?", para):
            if line and len(line) + len(piece.rstrip()) > width:
                lines.append(line.rstrip())
                line = ""
            line += piece
        lines.append(line.rstrip())
    return "\n".join(lines)


def _draw_bars_mpl(ax, panel: Panel, colours: dict[str, str]) -> None:
    series = list(dict.fromkeys(s for _, bars in panel.groups for s, _ in bars))
    width = 0.8 / max(1, len(series))
    n_bars = sum(len(bars) for _, bars in panel.groups)
    rotate = n_bars > 8 or width < 0.2
    finite = [v for _, bars in panel.groups for _, v in bars if v == v] + ([panel.ref_line] if panel.ref_line else [])
    top = max(finite + [1e-9])
    for j, name in enumerate(series):
        xs, hs, labels = [], [], []
        for gi, (_, bars) in enumerate(panel.groups):
            for s, v in bars:
                if s == name:
                    xs.append(gi + (j - (len(series) - 1) / 2) * width)
                    hs.append(0.0 if v != v else v)
                    labels.append(fmt(v))
        bars = ax.bar(xs, hs, width * 0.92, color=colours[name], label=_wrap(name, 38))
        texts = ax.bar_label(bars, labels, padding=2, fontsize=7, rotation=90 if rotate else 0)
        for t in texts:  # stays legible where it crosses the reference line or the grid
            t.set_bbox(dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))
    if panel.ref_line is not None:
        ax.axhline(panel.ref_line, color="#444444", linewidth=0.9, linestyle="--", label=f"reference = {panel.ref_line:g}")
    ax.set_ylim(0, top * (1.3 if rotate else 1.15))
    labels = [_wrap(g, 14) for g, _ in panel.groups]
    ax.set_xticks(range(len(panel.groups)), labels, rotation=30 if len(labels) > 6 else 0,
                  ha="right" if len(labels) > 6 else "center", fontsize=8)
    ax.set_title(_wrap(panel.title, 60), fontsize=10)
    ax.set_ylabel(panel.ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    if series or panel.ref_line is not None:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)


def _save_panels_mpl(panels: list[Panel], path: Path, cols: int) -> Path:
    plt = _pyplot()
    rows = math.ceil(len(panels) / cols)
    widest = max(max(1, sum(len(b) for _, b in p.groups)) for p in panels)
    w = min(7.5, 3.0 + 0.35 * widest) + 2.6  # plot area grows with the bar count, plus the legend column
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, 4.0 * rows), layout="constrained", squeeze=False)
    colours = series_colours(panels)
    for ax, panel in zip(axes.flat, panels):
        _draw_bars_mpl(ax, panel, colours)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _save_fig(fig, path)


def _save_fig(fig, path: Path) -> Path:
    plt = _pyplot()
    # fixed metadata: the same data gives the same bytes, so a figure's sha256 tells whether it changed
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png", metadata={"Software": None}), suffix=".png")
    plt.close(fig)
    return path


def _scatter_mpl(path, points, title, xlabel, ylabel, ref_x, ref_y, note) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 5.2), layout="constrained")
    families = list(dict.fromkeys(p.label.split(":")[0] for p in points))
    for i, p in enumerate(points, 1):
        colour = COLOURS[families.index(p.label.split(":")[0]) % len(COLOURS)]
        xerr = [[p.x - p.x_ci[0]], [p.x_ci[1] - p.x]] if p.x_ci else None
        yerr = [[p.y - p.y_ci[0]], [p.y_ci[1] - p.y]] if p.y_ci else None
        ax.errorbar([p.x], [p.y], xerr=xerr, yerr=yerr, fmt="o", ms=7, color=colour, capsize=3,
                    label=_wrap(f"{i}: {p.label}", 56))
        ax.annotate(str(i), (p.x, p.y), xytext=(5, 4), textcoords="offset points", fontsize=8)
    if ref_x is not None:
        ax.axvline(ref_x, color="#444444", linewidth=0.8, linestyle="--")
    if ref_y is not None:
        ax.axhline(ref_y, color="#444444", linewidth=0.8, linestyle=":")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(_wrap(title, 80), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    if note:
        fig.text(0.01, 0.005, _wrap(note, 150), fontsize=7, color="#444444", va="bottom")
        fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))
    return _save_fig(fig, path)


# ---- PIL fallback ----------------------------------------------------------------------------------------
def load_font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:
        return ImageFont.load_default()


def _text_w(d: ImageDraw.ImageDraw, text: str, font) -> int:
    return int(d.multiline_textbbox((0, 0), text, font=font)[2])


def _nice_step(top: float) -> float:
    raw = top / 4
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def _draw_panel_pil(panel: Panel, colours: dict[str, str]) -> Image.Image:
    font, small = load_font(13), load_font(11)
    n_bars = max(1, sum(len(b) for _, b in panel.groups))
    bar_w = 34
    plot_w = n_bars * bar_w + len(panel.groups) * 24
    width = max(560, plot_w + 90)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title = _wrap(panel.title + (f" [{panel.ylabel}]" if panel.ylabel else ""), max(30, width // 8))
    series = list(dict.fromkeys(s for _, bars in panel.groups for s, _ in bars))
    entries = [(colours[s], _wrap(s, max(30, width // 7 - 4))) for s in series]
    if panel.ref_line is not None:
        entries.append(("#444444", f"dashed line: reference = {panel.ref_line:g}"))
    title_h = probe.multiline_textbbox((0, 0), title, font=font)[3] + 12
    legend_h = sum(probe.multiline_textbbox((0, 0), t, font=small)[3] + 6 for _, t in entries)
    slot = plot_w / max(1, len(panel.groups))
    glabels = [_wrap(g, max(6, int(slot // 7))) for g, _ in panel.groups]
    glabel_h = max([probe.multiline_textbbox((0, 0), g, font=small)[3] for g in glabels] + [0]) + 10
    plot_h = 220
    height = title_h + legend_h + 24 + plot_h + glabel_h + 10
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.multiline_text((10, 6), title, fill="black", font=font)
    y = title_h
    for colour, text in entries:
        d.rectangle((12, y + 3, 22, y + 13), fill=colour)
        d.multiline_text((28, y), text, fill="black", font=small)
        y += probe.multiline_textbbox((0, 0), text, font=small)[3] + 6
    x0, y1 = 70, y + 24
    y0 = y1 + plot_h
    values = [v for _, bars in panel.groups for _, v in bars if v == v] + ([panel.ref_line] if panel.ref_line else [])
    step = _nice_step(max(values + [1e-9]) * 1.1)
    top = step * math.ceil(max(values + [1e-9]) * 1.1 / step)
    scale = plot_h / top
    for k in range(int(round(top / step)) + 1):
        ty = y0 - k * step * scale
        d.line((x0, ty, x0 + plot_w, ty), fill=(230, 230, 230))
        d.text((x0 - 6 - _text_w(d, f"{k * step:g}", small), ty - 7), f"{k * step:g}", fill="gray", font=small)
    d.line((x0, y0, x0 + plot_w, y0), fill="black")
    d.line((x0, y0, x0, y1), fill="black")
    for gi, (_, bars) in enumerate(panel.groups):
        gx = x0 + gi * slot + (slot - len(bars) * bar_w) / 2
        for bi, (s, v) in enumerate(bars):
            bx = gx + bi * bar_w
            h = 0 if v != v else v * scale
            d.rectangle((bx + 2, y0 - h, bx + bar_w - 2, y0), fill=colours[s])
            label = fmt(v)
            d.text((bx + (bar_w - _text_w(d, label, small)) / 2, y0 - h - 14), label, fill="black", font=small)
        d.multiline_text((x0 + gi * slot + 4, y0 + 6), glabels[gi], fill="black", font=small)
    if panel.ref_line is not None:
        ry = y0 - panel.ref_line * scale
        for sx in range(x0, x0 + plot_w, 10):
            d.line((sx, ry, sx + 5, ry), fill="#444444")
    return img


def _scatter_pil(points, title, xlabel, ylabel, ref_x, ref_y, note) -> Image.Image:
    font, small = load_font(13), load_font(11)
    W, plot_w, plot_h, x0, y1 = 900, 560, 360, 80, 50
    lines = [f"{i}: {p.label}" for i, p in enumerate(points, 1)] + ([note] if note else [])
    img = Image.new("RGB", (W, y1 + plot_h + 60 + 16 * len(lines)), "white")
    d = ImageDraw.Draw(img)
    d.multiline_text((10, 8), _wrap(title, 100), fill="black", font=font)
    xs = [v for p in points for v in ((p.x,) + (p.x_ci or ()))] + ([ref_x] if ref_x is not None else [])
    ys = [v for p in points for v in ((p.y,) + (p.y_ci or ()))] + ([ref_y] if ref_y is not None else [])
    (xl, xh), (yl, yh) = [(min(v), max(v)) if v else (0.0, 1.0) for v in (xs, ys)]
    px = lambda x: x0 + (x - xl) / ((xh - xl) or 1) * plot_w * 0.9 + plot_w * 0.05  # noqa: E731
    py = lambda y: y1 + plot_h - ((y - yl) / ((yh - yl) or 1) * plot_h * 0.9 + plot_h * 0.05)  # noqa: E731
    d.rectangle((x0, y1, x0 + plot_w, y1 + plot_h), outline="black")
    for v, pos in ((xl, px(xl)), (xh, px(xh))):
        d.text((pos - 10, y1 + plot_h + 4), f"{v:.3g}", fill="gray", font=small)
    for v, pos in ((yl, py(yl)), (yh, py(yh))):
        d.text((x0 - 6 - _text_w(d, f"{v:.4g}", small), pos - 7), f"{v:.4g}", fill="gray", font=small)
    if ref_x is not None:
        d.line((px(ref_x), y1, px(ref_x), y1 + plot_h), fill=(150, 150, 150))
    if ref_y is not None:
        d.line((x0, py(ref_y), x0 + plot_w, py(ref_y)), fill=(150, 150, 150))
    for i, p in enumerate(points, 1):
        if p.x_ci:
            d.line((px(p.x_ci[0]), py(p.y), px(p.x_ci[1]), py(p.y)), fill="black")
        if p.y_ci:
            d.line((px(p.x), py(p.y_ci[0]), px(p.x), py(p.y_ci[1])), fill="black")
        d.ellipse((px(p.x) - 4, py(p.y) - 4, px(p.x) + 4, py(p.y) + 4), fill=COLOURS[0])
        d.text((px(p.x) + 6, py(p.y) - 14), str(i), fill="black", font=small)
    d.text((x0 + plot_w / 2 - 40, y1 + plot_h + 22), xlabel, fill="black", font=small)
    d.text((x0 + plot_w + 12, y1), ylabel, fill="black", font=small)
    for k, line in enumerate(lines):
        d.text((10, y1 + plot_h + 44 + 16 * k), line, fill="black", font=small)
    return img


def _sheet(images: list[Image.Image], cols: int) -> Image.Image:
    rows = math.ceil(len(images) / cols)
    cw, rh = max(im.width for im in images), max(im.height for im in images)
    sheet = Image.new("RGB", (cols * cw, rows * rh), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * cw, (i // cols) * rh))
    return sheet


def _save_image(img: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), suffix=".png")

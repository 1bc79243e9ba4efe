"""The committed figures are current: every README image link exists; every figure under
benchmarks/results/figures/ has its provenance JSON, and the sha256 of the figure, of the benchmark JSON and
of the models it was drawn from still match (cheap: hashes only, nothing is re-rendered). A stale figure is
fixed by rerunning the command its JSON records."""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from benchmarks import plotting
from benchmarks.plot import speed_quality_points, write_provenance

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "benchmarks" / "results" / "figures"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")


def sha256(path: Path) -> str:  # independent of training.atomic.file_sha256, which wrote the records
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stale(record_path: Path) -> list[str]:
    """Why a figure's record no longer describes it (empty when current)."""
    record = json.loads(record_path.read_text())
    png = record_path.with_name(record["figure"])
    cmd = record.get("command", "?")
    if not png.is_file():
        return [f"{png} is missing; rerun `{cmd}`"]
    problems = [] if sha256(png) == record["figure_sha256"] else [f"{png.name} differs from its record; rerun `{cmd}`"]
    for name, digest in record["inputs"].items():
        path = Path(name) if Path(name).is_absolute() else ROOT / name
        if not path.is_file():
            if Path(name).is_absolute():  # a system data set (e.g. the Fashion-MNIST package) not installed here
                continue
            problems.append(f"{png.name}: input {name} is gone; rerun `{cmd}`")
        elif sha256(path) != digest:
            problems.append(f"{png.name}: input {name} changed since the figure was drawn; rerun `{cmd}`")
    return problems


def records() -> list[Path]:
    return sorted(FIGURES.glob("*.json"))


def test_readme_image_links_exist():
    links = [m for m in IMAGE_LINK.findall((ROOT / "README.md").read_text()) if "://" not in m]
    assert links, "README.md has no image links (the regex or the README changed)"
    missing = [link for link in links if not (ROOT / link.split("#")[0]).is_file()]
    assert not missing, f"README image links to missing files: {missing}"
    untracked = [link for link in links if link.startswith("benchmarks/results/figures/")
                 and not (ROOT / link).with_suffix(".json").is_file()]
    assert not untracked, f"figures linked without a provenance JSON (draw them by command): {untracked}"


def test_every_figure_has_a_record():
    assert records(), f"no figure records in {FIGURES}"
    pngs = {p.name for p in FIGURES.glob("*.png")}
    recorded = {json.loads(r.read_text())["figure"] for r in records()}
    assert pngs == recorded, f"figures without a record (hand-made?): {sorted(pngs - recorded)}; " \
                             f"records without a figure: {sorted(recorded - pngs)}"


@pytest.mark.parametrize("record", records(), ids=lambda p: p.stem)
def test_figure_is_current(record):
    problems = stale(record)
    assert not problems, "; ".join(problems)


def test_staleness_check_catches_a_changed_input(tmp_path):
    """The check above can fail: a changed input or a redrawn figure is reported."""
    source = tmp_path / "bench.json"
    source.write_text('{"rows": []}')
    png = tmp_path / "fig.png"
    png.write_bytes(b"\x89PNG fake")
    record = write_provenance(png, [source], {"chart": "test"}, "python -m benchmarks.plot ...")
    assert stale(record) == []
    source.write_text('{"rows": [1]}')
    assert any("changed since the figure was drawn" in p for p in stale(record))
    source.write_text('{"rows": []}')
    png.write_bytes(b"\x89PNG other")
    assert any("differs from its record" in p for p in stale(record))


def test_wrap_keeps_every_character():
    label = "scalekv:calibration=checkpoints/fmnist/scalekv_drafter.json,budget_frac=0.35"
    wrapped = plotting._wrap(label, 20)
    assert wrapped.replace("\n", "") == label and max(len(line) for line in wrapped.split("\n")) <= 21


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_charts_draw_with_and_without_matplotlib(tmp_path, monkeypatch, with_matplotlib):
    if with_matplotlib and not plotting.have_matplotlib():
        pytest.skip("matplotlib not installed (an optional extra)")
    if not with_matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    assert plotting.have_matplotlib() == with_matplotlib
    from PIL import Image
    bars = plotting.bar_chart(tmp_path / "bars.png", {"batch 1": {"default": 1.0, "code": 1.46},
                                                      "batch 16": {"default": 1.0, "code": float("nan")}},
                              "speed-up", "x", reference_line=1.0)
    sheet = plotting.save_panels([plotting.bar_panel([("g", [("a", 2.0)])], f"panel {i}") for i in range(3)],
                                 tmp_path / "sheet.png", cols=2)
    scatter = plotting.scatter_chart(tmp_path / "sq.png", [plotting.ScatterPoint("default", 1.0, 230.0),
                                                           plotting.ScatterPoint("code", 1.4, 212.0, y_ci=(205.0, 219.0))],
                                     "speed vs quality", "speed-up", "FD", ref_x=1.0)
    for path in (bars, sheet, scatter):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_scatter_reads_intervals_in_every_layout():
    rows = [{"sampler": "default", "batch": 16, "speedup_vs_default": 1.0, "proxy_fd": 230.0,
             "proxy_fd_ci": [220.0, 241.0]},
            {"sampler": "code", "batch": 16, "speedup_vs_default": 1.4, "proxy_fd": 212.0,
             "proxy_fd_ci": {"low": 205.0, "high": 219.0, "level": 0.95}, "speedup_vs_default_ci": [1.3, 1.5]},
            {"sampler": "sjd", "batch": 16, "speedup_vs_default": 0.7, "proxy_fd": 225.0,
             "intervals": {"proxy_fd": {"low": 215.0, "high": 236.0}}},
            {"sampler": "window", "batch": 16, "speedup_vs_default": 0.8, "proxy_fd": 211.0},
            {"sampler": "default", "batch": 1, "speedup_vs_default": 1.0}]  # no proxy FD: not plotted
    points, batch = speed_quality_points({"rows": rows})
    assert batch == 16 and [p.label for p in points] == ["default", "code", "sjd", "window"]
    assert [p.y_ci for p in points] == [(220.0, 241.0), (205.0, 219.0), (215.0, 236.0), None]
    assert [p.x_ci for p in points] == [None, (1.3, 1.5), None, None]
    with pytest.raises(ValueError, match="batches with it: \\[16\\]"):
        speed_quality_points({"rows": rows}, batch=1)

"""The README's ScaleKV quality tables are the ones generated from the committed result JSON."""
from __future__ import annotations

from pathlib import Path

from benchmarks import scalekv_quality

ROOT = Path(__file__).resolve().parents[1]


def test_readme_scalekv_block_is_generated_from_the_json():
    readme = (ROOT / "README.md").read_text()
    start, end = (readme.index(m) for m in scalekv_quality.MARKERS)
    assert readme[start:end + len(scalekv_quality.MARKERS[1])] == scalekv_quality.readme_block(), \
        "README ScaleKV tables are stale: run `python -m benchmarks.scalekv_quality --readme`"
    for name in scalekv_quality.README_RESULTS:
        assert (ROOT / "benchmarks" / "results" / name).is_file()

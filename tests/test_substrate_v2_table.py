"""The README's v2 accelerator table is the one generated from the committed JSON (or says it is not measured
yet), every case names a paper figure, and each cell shows its own row's numbers (a synthetic result)."""
from __future__ import annotations

from pathlib import Path

from benchmarks import substrate_v2

ROOT = Path(__file__).resolve().parents[1]


def test_readme_block_is_generated_from_the_json():
    readme = (ROOT / "README.md").read_text()
    start, end = (readme.index(m) for m in substrate_v2.MARKERS)
    assert readme[start:end + len(substrate_v2.MARKERS[1])] == substrate_v2.readme_block(), \
        "README v2 accelerator table is stale: run `python -m benchmarks.substrate_v2 --readme`"


def test_cases_cover_the_papers_settings():
    specs = [c.spec for c in substrate_v2.CASES]
    assert len(set(specs)) == len(specs) and specs[0] == "default"
    for needed in ("code:draft_scales=6", "code:draft_scales=8", "budget_frac=0.1", "budget_frac=0.25", "sjd:draft=jacobi",
                   "sjd:draft=random", "sjd:draft=var", "sjd:draft=dd", "dd:schedule=1step", "dd:schedule=2step"):
        assert any(needed in s for s in specs), needed
    assert all(c.paper for c in substrate_v2.CASES)
    for draft in ("jacobi", "random", "var", "dd"):  # the 0.95x target asks it of every draft source, both policies
        assert f"sjd:draft={draft}" in specs and f"sjd:draft={draft},window_policy=adaptive" in specs, draft


def _row(spec, batch, speed, iqr_frac=0.04, **extra):
    return {"sampler": spec, "batch": batch, "median_s": 0.1, "iqr_frac": iqr_frac, "speedup_vs_baseline": speed, **extra}


def test_table_cells_come_from_their_rows():
    spec = "code:draft_scales=8"
    quality = dict(proxy_fd=100.0, proxy_fd_ci=[90.0, 110.0], proxy_accuracy=0.9, proxy_accuracy_ci=[0.88, 0.92],
                   proxy_recall=0.25, proxy_recall_ci=[0.2, 0.3], quality_token_agreement=0.5, quality_token_agreement_ci=[0.49, 0.51])
    full = {"meta": {"device": "cpu", "torch_threads": 1, "load_average_start": [1.0, 0.5, 0.25]},
            "rows": [_row("default", 1, 1.0), _row("default", 16, 1.0, kv_bytes_ratio_vs_baseline=1.0),
                     _row(spec, 1, 1.8, model_flop_ratio_vs_baseline=2.125), _row(spec, 16, 2.4, iqr_frac=0.2, noisy=True, kv_bytes_ratio_vs_baseline=0.3,
                                              kv_kept_ratio_vs_baseline=0.125, **quality)]}
    full["paired_fd"] = [{"a": spec, "b": "default", "fd_difference": 4.25, "ci": [1.0, 7.5], "significant": True}]
    fast = {"rows": [_row(spec, 1, 2.0), _row(spec, 16, 3.0)]}
    cases = [{"spec": spec, "setting": "CoDe N = 8", "paper": "1.7x", "target": ">= 2x"}]
    result = {"meta": {"date": "d", "models": "m", "repeats": 3, "quality_images": 10, "cases": cases},
              "runs": {"full": full, "no_decode": fast}}
    table = substrate_v2.markdown(result)
    assert f"| `{spec}` | `default` | 4.2 [1.0, 7.5] | yes |" in table
    rows = [line for line in table.splitlines() if f"`{spec}`" in line and "CoDe" in line]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:3] == ["CoDe N = 8", "1.7x", f"`{spec}`"]
    assert cells[3] == "1.80x ± 0.04" and cells[4] == "2.40x ± 0.24 noisy"
    assert cells[5] == "2.00x ± 0.04" and cells[6] == "3.00x ± 0.06" and cells[7] == "2.12x"
    assert cells[8] == "30 %" and cells[9] == "12 %"
    assert cells[10:] == ["100.0 [90.0, 110.0]", "90.0% [88.0, 92.0]", "0.250 [0.200, 0.300]", "0.500 [0.490, 0.510]",
                         ">= 2x"]

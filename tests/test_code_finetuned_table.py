"""The README's CoDe training-free vs fine-tuned table is the one generated from the committed JSON, and the
table shows each row's own numbers (a synthetic result with known values)."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

from benchmarks import code_finetuned
from training.checkpoint import read_metadata

ROOT = Path(__file__).resolve().parents[1]


def test_readme_code_blocks_are_generated_from_the_json():
    readme = (ROOT / "README.md").read_text()
    for models, (result, markers) in code_finetuned.RESULTS.items():
        start, end = (readme.index(m) for m in markers)
        assert readme[start:end + len(markers[1])] == code_finetuned.readme_block(result, markers), \
            f"README CoDe table of {models} is stale: run `python -m benchmarks.code_finetuned --readme`"
        assert result.is_file()
        for drafter, refiner in code_finetuned.pairs(models).values():
            assert (ROOT / drafter).is_file() and (ROOT / refiner).is_file()


def test_defaults_are_the_folder_pairs_fine_tuned_n_and_the_folder_proxy():
    """N defaults to the draft_scales each shipped pair was fine-tuned with (its training config), and the proxy
    classifier to the one trained on that folder's image size."""
    for models in code_finetuned.RESULTS:
        prefix = Path(models).name
        trained = tomllib.loads((ROOT / "configs" / f"{prefix}_code_drafter.toml").read_text())["code"]["draft_scales"]
        assert code_finetuned.folder_draft_scales(models) == trained
        classifier = json.loads((ROOT / code_finetuned.CLASSIFIERS[models]).with_suffix(".json").read_text())["config"]
        tokenizer = read_metadata(ROOT / models / "tokenizer.safetensors")["config"]
        image_size = tokenizer["patch_nums"][-1] * 2 ** (len(tokenizer["ch_mult"]) - 1)
        assert classifier.get("data_size", classifier["image_size"]) == image_size


def _row(spec, batch, median, speed, **extra):
    return {"sampler": spec, "batch": batch, "median_s": median, "iqr_s": 0.002, "speedup_vs_baseline": speed, **extra}


def test_table_cells_come_from_their_rows():
    spec = "code:draft_scales=5"
    full = {"rows": [_row("default", 16, 0.30, 1.0, proxy_fd=200.0, proxy_fd_ci=[190.0, 210.0], proxy_accuracy=0.8,
                          proxy_accuracy_ci=[0.78, 0.82]),
                     _row(spec, 16, 0.20, 1.5, noisy=True, proxy_fd=205.0, proxy_fd_ci=[195.0, 215.0],
                          proxy_accuracy=0.79, proxy_accuracy_ci=[0.77, 0.81], quality_token_agreement=0.75,
                          quality_token_agreement_ci=[0.74, 0.76])]}
    fast = {"rows": [_row("default", 16, 0.25, 1.0), _row(spec, 16, 0.125, 2.0)]}
    result = {"meta": {"date": "d", "draft_scales": 5, "repeats": 3, "quality_images": 10,
                       "pairs": {"training-free": {}, "fine-tuned": {}}},
              "runs": {f"{p}/{k}": r for p in ("training-free", "fine-tuned") for k, r in (("full", full), ("no_decode", fast))}}
    lines = code_finetuned.markdown(result).splitlines()
    code_rows = [line for line in lines if f"`{spec}`" in line]
    assert len(code_rows) == 2
    cells = [c.strip() for c in code_rows[0].strip("|").split("|")]
    assert cells[2] == "1.50x (200 ± 1 ms) noisy" and cells[3] == "2.00x (125 ± 1 ms)"
    assert cells[4] == "205.0 [195.0, 215.0]" and cells[5] == "79.0% [77.0, 81.0]"
    assert cells[6] == "0.750 [0.740, 0.760]"

"""Every shipped recipe in configs/ loads with the job its own header names, its tables validate against that
job's dataclasses (unknown keys and wrong types fail here, not an hour into a run), every input it reads from
checkpoints/ is in the repository, and the peak lr its comment states is the one the numbers give
(base_lr x batch / 256). Paths under runs/ are an earlier stage's output and are not checked."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import train
from samplers.code.training import CoDeTrainConfig
from samplers.dd.data import DDConfig
from tokenizers.config import VQVAEConfig
from var.config import from_dict

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.toml"))
COMMAND = re.compile(r"train\.py (\w+) --config configs/(\w+)\.toml")
NUMBER = re.compile(r"\d+(?:\.\d+)?e-?\d+")


def job_of(path: Path) -> str:
    """The job the header's own command runs; configs without one are named by their model table."""
    text = path.read_text()
    for job, name in COMMAND.findall(text):
        if name == path.stem:
            return job
    tables = set(re.findall(r"^\[(\w+)\]", text, flags=re.M))
    return "dd" if "dd" in tables else "var" if "var" in tables else "tokenizer"


def peak_lr_in(line: str) -> float | None:
    """The last number of a base_lr comment between 'peak lr' and the first ',' or '('."""
    clause = re.split(r"[,(]", line.split("peak lr", 1)[1])[0]
    numbers = NUMBER.findall(clause)
    return float(numbers[-1]) if numbers else None


def stated_peak_lr(path: Path) -> float | None:
    line = next((s for s in path.read_text().splitlines() if s.startswith("base_lr") and "peak lr" in s), None)
    return None if line is None else peak_lr_in(line)


def test_every_config_is_covered():
    assert len(CONFIGS) >= 20 and {job_of(p) for p in CONFIGS} >= {"tokenizer", "var", "dd", "code_refiner"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads_and_validates(path):
    job = job_of(path)
    cfg, table, description = train.load_job_config(job, str(path), [])
    if job == "tokenizer":
        from_dict(VQVAEConfig, table, f"{path.name}[tokenizer]")
    elif job == "dd":
        dd = from_dict(DDConfig, table, f"{path.name}[dd]")
    else:
        # the tokenizer's share of the VAR config from the checked description, else a stand-in (only types and
        # keys are under test here; tests/test_recipes.py builds the official shapes)
        tok = from_dict(VQVAEConfig, description or {}, f"{path.name}[tokenizer]")
        stand_in = SimpleNamespace(vocab_size=tok.vocab_size, z_channels=tok.z_channels, patch_nums=tok.patch_nums)
        train.build_var_config(table, stand_in, 10, f"{path.name}[var]")
        if job.startswith("code_"):
            code = from_dict(CoDeTrainConfig, cfg.code, f"{path.name}[code]")
            assert code.teacher or job == "code_drafter"
    inputs = [cfg.train.tokenizer, cfg.train.init_from] + (
        [dd.teacher, dd.tokenizer] if job == "dd" else [code.teacher] if job.startswith("code_") else [])
    for ref in inputs:
        if ref.startswith("checkpoints/"):
            assert (REPO / ref).is_file(), f"{path.name} reads {ref}, which is not in the repository"
    peak = stated_peak_lr(path)
    if peak is not None:
        assert cfg.optim.peak_lr() == pytest.approx(peak, rel=0.02), f"{path.name}: comment says peak lr {peak}"


def test_peak_lr_comment_parser():
    # the parser on the phrasings the configs use, against values worked out by hand
    cases = {"base_lr = 16e-3  # peak lr = 16e-3 * 16 / 256 = 1e-3, as the 32 px models": 1e-3,
             "base_lr = 4.8e-3  # peak lr 3e-4 (0.3x the earlier stages' 1e-3), decayed to 3e-5": 3e-4,
             "base_lr = 8e-5  # tblr: peak lr = 8e-5 x 768 / 256 = 2.4e-04": 2.4e-4}
    for line, want in cases.items():
        assert peak_lr_in(line) == want

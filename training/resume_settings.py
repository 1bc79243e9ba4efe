"""What a resumed run must share with the run it continues, and the check that refuses anything else.

A checkpoint stores these settings; `--resume` may change steps, logging and paths, nothing else. Two
checks use them: an early one in train.py (before datasets and token caches are built, from the newest
checkpoint's state.json alone) and the full one when the train state loads (which also knows the built
models' configs).
"""
from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from training.atomic import file_sha256

# Resume-relevant settings added after runs were made, with the default that reproduces the old behaviour: a
# checkpoint written before a setting existed resumes as long as the setting keeps that default.
ADDED_SETTINGS = {"optim": {"ema_warmup": False}}
# [data] keys that only tune the loader: the batches are bitwise the same for any value, so a resume may change them
LOADER_ONLY = ("num_workers", "persistent_workers", "prefetch_factor")


def plain(obj):
    """As stored in JSON (tuples become lists), so a loaded config compares equal to the current one."""
    return json.loads(json.dumps(obj))


def resume_relevant(cfg: dict) -> dict:
    """The run-level settings (a TrainConfig as a dict) a resumed run must keep. The frozen tokenizer counts by
    content (its tokens are the data), the precision as configured ('auto' may resolve differently on other
    hardware)."""
    tokenizer = cfg["train"]["tokenizer"]
    data = {k: v for k, v in cfg["data"].items() if k not in LOADER_ONLY}
    return plain({"job": cfg["job"], "data": data, "optim": cfg["optim"], "loss": cfg["loss"],
                  "code": cfg.get("code", {}), "seed": cfg["train"]["seed"],
                  "label_smoothing": cfg["train"]["label_smoothing"],
                  "mixed_precision": cfg["train"]["mixed_precision"],
                  "tokenizer_sha256": file_sha256(tokenizer) if tokenizer and Path(tokenizer).is_file() else tokenizer})


def model_settings(models: list[torch.nn.Module]) -> list:
    """The configs of the trained models (architecture, dropout rates, ...), as JSON."""
    return plain([asdict(m.config) if is_dataclass(getattr(m, "config", None)) else type(m).__name__ for m in models])


def saved_settings(saved: dict) -> dict:
    """A checkpoint's resume-relevant settings with the ADDED_SETTINGS it predates filled in."""
    out = dict(saved)
    for section, added in ADDED_SETTINGS.items():
        if isinstance(out.get(section), dict):
            out[section] = {**added, **out[section]}
    if isinstance(out.get("data"), dict):  # checkpoints written before LOADER_ONLY was left out
        out["data"] = {k: v for k, v in out["data"].items() if k not in LOADER_ONLY}
    return out


def check_same_settings(now: dict, saved: dict, out_dir) -> None:
    """Refuse a resume whose settings differ. Settings a checkpoint predates entirely (it was written before they
    were stored) cannot be compared and are skipped."""
    saved = saved_settings(saved)
    changed = sorted(k for k in now if k in saved and saved[k] != now[k])
    if changed:
        raise ValueError(f"--resume: the config differs from the run in {out_dir} in {changed}; a resumed run must "
                         f"keep its data, optim, loss, seed, model, tokenizer and precision settings (only steps, "
                         f"logging and paths may change)")


def check_resume_early(cfg: dict, out_dir: str | Path) -> None:
    """The run-level part of the check, from the newest checkpoint's state.json, before anything expensive is
    built. Without a readable one it passes: the full check at load time names the problem."""
    ckpt_dir = Path(out_dir) / "checkpoints"
    try:
        named = Path((ckpt_dir / "latest.txt").read_text().strip()).name
        saved = json.loads((ckpt_dir / named / "state.json").read_text())["tree"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if isinstance(saved, dict):
        check_same_settings(resume_relevant(cfg), saved, out_dir)

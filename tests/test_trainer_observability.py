"""Trainer observability through train.py: held-out validation loss, trackers, throughput / memory / gradient
norm in every log line. The validation loss is checked against an independent cross-entropy of the exported
model on the held-out items (teacher forcing written out here, not the job's code)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import tracking as acc_tracking

import train
from tests.test_tracking import JsonlTracker, read_events
from tests.test_training import read_log, tiny_tokenizer, write_var_config  # noqa: F401 (fixture)
from training.checkpoint import load_model
from training.config import DataConfig
from training.data import build_datasets

TIMING_KEYS = {"step_time_s", "data_time_s", "images_per_s", "tokens_per_s"}


def run_var(tmp_path, tokenizer, *overrides, steps=4):
    cfg = write_var_config(tmp_path, tokenizer, steps=steps)
    out = tmp_path / "run"
    train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={out}", *overrides])
    return out


def test_validation_loss_is_the_held_out_cross_entropy(tmp_path, tiny_tokenizer):
    out = run_var(tmp_path, tiny_tokenizer, "--set", "data.val_fraction=0.25", "--set", "train.val_every=2")
    records = read_log(out)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert all(r["val_items"] == 12 for r in val)  # ceil(0.25 * 48) held-out items
    train_steps = [r for r in records if "loss" in r]
    assert len(train_steps) == 4

    # independent: the exported (final, no EMA) model on the held-out split, CE over every token
    data_cfg = DataConfig(kind="procedural", image_size=8, num_samples=48, num_classes=4, val_fraction=0.25)
    train_set, val_set = build_datasets(data_cfg, seed=0)
    assert len(train_set) == 36 and len(val_set) == 12
    model = load_model(out / "var.safetensors").eval()
    vae = load_model(tiny_tokenizer).eval()
    imgs = torch.stack([val_set[i][0] for i in range(len(val_set))])
    labels = torch.tensor([val_set[i][1] for i in range(len(val_set))])
    with torch.no_grad():
        idx = vae.img_to_tokens(imgs)
        logits = model(labels, vae.teacher_forcing_input(idx))
        targets = torch.cat(idx, dim=1)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
        acc0 = (logits[:, :1].argmax(-1) == targets[:, :1]).float().mean().item()
    assert val[-1]["val_loss"] == pytest.approx(ce, rel=1e-5)
    assert val[-1]["val_acc_s0"] == pytest.approx(acc0, abs=1e-6)


def test_every_log_line_has_throughput_memory_and_grad_norm(tmp_path, tiny_tokenizer):
    out = run_var(tmp_path, tiny_tokenizer, "--set", "optim.grad_clip=0")  # no clipping: the norm is still logged
    for r in read_log(out):
        assert TIMING_KEYS <= set(r) and r["images_per_s"] > 0 and r["rss_mb"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["images_per_s"] * (1 + 4 + 9 + 16), rel=1e-6)
        assert r["grad_norm"] > 0 and r["skipped_images"] == 0


def test_a_tracker_receives_the_log_lines(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setitem(acc_tracking.LOGGER_TYPE_TO_CLASS, JsonlTracker.name, JsonlTracker)
    out = run_var(tmp_path, tiny_tokenizer, "--set", f"train.log_with={JsonlTracker.name}",
                  "--set", "data.val_fraction=0.25", "--set", "train.val_every=2", steps=2)
    events = read_events(out / "trackers" / "var" / "events.jsonl")
    assert events[0]["config"]["optim.batch_size"] == 8 and events[-1] == {"finished": True}
    logged = [e for e in events if "values" in e]
    lines = read_log(out)
    assert [e["step"] for e in logged] == [r["step"] for r in lines]
    for e, r in zip(logged, lines):
        assert e["values"] == {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert any("val_loss" in e["values"] for e in logged)
    json.dumps(events)  # plain JSON all the way


def test_unknown_tracker_is_refused_before_anything_is_written(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown tracker"):
        run_var(tmp_path, tiny_tokenizer, "--set", "train.log_with=tensorbord")
    assert not (tmp_path / "run").exists()

"""training.tracking: records reach a tracker through accelerate's own tracker machinery (Accelerator(log_with=
...), init_trackers, log), only numbers are logged, tracker names are checked with one-line errors, and the
step meter's rates and memory readings are right."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate import tracking as acc_tracking
from accelerate.tracking import GeneralTracker, on_main_process

from training import tracking
from training.config import RunConfig


class JsonlTracker(GeneralTracker):
    """A tracker that keeps local files, like tensorboard: one JSON line per call."""
    name = "jsonl_test"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir, **kwargs):
        super().__init__()
        self.path = Path(logging_dir) / run_name / "events.jsonl"

    @property
    def tracker(self):
        return self.path

    def _write(self, obj) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(obj) + "\n")

    @on_main_process
    def store_init_configuration(self, values: dict):
        self._write({"config": values})

    @on_main_process
    def log(self, values: dict, step=None, **kwargs):
        self._write({"step": step, "values": values})

    @on_main_process
    def finish(self):
        self._write({"finished": True})


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


RECORDS = [
    {"step": 10, "epoch": 0, "loss": 2.5, "acc_s0": 0.25, "lr": 1e-4, "tag": "warm-up", "flag": True, "extra": None,
     "per_scale": [1.0, 2.0], "count": torch.tensor(3)},
    {"step": 20, "epoch": 1, "loss": 1.75, "val_loss": 2.0, "images_per_s": 123.5},
]
# what a tracker may receive of RECORDS (numbers only; bools, text, None, lists dropped; the step apart)
EXPECTED = [(10, {"epoch": 0, "loss": 2.5, "acc_s0": 0.25, "lr": 1e-4, "count": 3}),
            (20, {"epoch": 1, "loss": 1.75, "val_loss": 2.0, "images_per_s": 123.5})]
CONFIG = {"job": "var", "data": {"root": "/d", "image_size": 32}, "optim": {"betas": (0.9, 0.95)},
          "train": {"token_cache": None, "seed": 3}}


def run_through_accelerate(kwargs, project="proj"):
    acc = Accelerator(cpu=True, **kwargs)
    tracking.start_trackers(acc, project, CONFIG)
    for record in RECORDS:
        tracking.log_trackers(acc, record, record["step"])
    tracking.finish_trackers(acc)
    return acc


def check_events(events):
    assert events[0] == {"config": {"job": "var", "data.root": "/d", "data.image_size": 32,
                                    "optim.betas": "[0.9, 0.95]", "train.token_cache": "none", "train.seed": 3}}
    assert [(e["step"], e["values"]) for e in events[1:-1]] == EXPECTED
    assert events[-1] == {"finished": True}


def test_tracker_instance_receives_the_records(tmp_path):
    tracker = JsonlTracker("inst", tmp_path / "elsewhere")
    kwargs = tracking.accelerator_tracking_kwargs(RunConfig(), tmp_path / "run", log_with=[tracker])
    acc = run_through_accelerate(kwargs)
    assert acc.trackers == [tracker]
    check_events(read_events(tmp_path / "elsewhere" / "inst" / "events.jsonl"))


def test_registered_tracker_by_name_writes_under_out_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(acc_tracking.LOGGER_TYPE_TO_CLASS, JsonlTracker.name, JsonlTracker)
    run_cfg = RunConfig(log_with="jsonl_test", out_dir=str(tmp_path / "run"))
    kwargs = tracking.accelerator_tracking_kwargs(run_cfg, run_cfg.out_dir)
    assert kwargs["log_with"] == ["jsonl_test"]
    run_through_accelerate(kwargs, project=run_cfg.tracker_project)
    # accelerate hands its logging_dir (<out_dir>/trackers) and the project name to the tracker
    check_events(read_events(tmp_path / "run" / "trackers" / run_cfg.tracker_project / "events.jsonl"))


def test_no_trackers_by_default(tmp_path):
    kwargs = tracking.accelerator_tracking_kwargs(RunConfig(), tmp_path)
    assert kwargs["log_with"] is None
    assert kwargs["project_config"].logging_dir == str(tmp_path / "trackers")
    acc = run_through_accelerate(kwargs)  # start / log / finish are no-ops
    assert acc.trackers == [] and not (tmp_path / "trackers").exists()


def test_tracker_names_are_checked(monkeypatch):
    monkeypatch.setattr(acc_tracking, "get_available_trackers", lambda: [])
    for log_with, words in [("tensorbord", "unknown tracker 'tensorbord'"),
                            ("tensorboard", "pip install tensorboard"),
                            ("wandb, tensorboard", "pip install wandb"),
                            ("all", "no tracker package is installed")]:
        with pytest.raises(ValueError, match=words) as err:
            tracking.parse_log_with(log_with)
        assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="GeneralTracker"):
        tracking.parse_log_with([3])
    assert tracking.parse_log_with("") == [] and tracking.parse_log_with(" , ") == []
    monkeypatch.setattr(acc_tracking, "get_available_trackers", lambda: ["wandb", "tensorboard"])
    assert tracking.parse_log_with("Tensorboard,wandb,tensorboard") == ["tensorboard", "wandb"]
    assert tracking.parse_log_with("all") == ["tensorboard", "wandb"]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_meter_rates_with_a_fake_clock():
    clock = FakeClock()
    meter = tracking.StepMeter("cpu", tokens_per_image=680, num_processes=2, clock=clock)
    # step 1: 0.5 s of data wait then 1.5 s of compute for 8 images; step 2: 0.5 s for 8 images
    meter.start(); clock.now += 0.5; meter.data_ready(); clock.now += 1.5
    one = meter.stop(8)
    assert one["step_time_s"] == 2.0 and one["data_time_s"] == 0.5
    assert one["images_per_s"] == 8 * 2 / 2.0 and one["tokens_per_s"] == 8 * 2 / 2.0 * 680
    meter.start(); clock.now += 0.5
    two = meter.stop(8)
    assert two["images_per_s"] == 8 * 2 / 0.5 and two["data_time_s"] == 0.0
    window = meter.window()
    # the window's rate is all images over all time, not the mean of the two steps' rates
    assert window["step_time_s"] == pytest.approx(1.25) and window["data_time_s"] == pytest.approx(0.25)
    assert window["images_per_s"] == pytest.approx(32 / 2.5) and window["tokens_per_s"] == pytest.approx(32 / 2.5 * 680)
    assert meter.window() == {}  # nothing timed since
    plain = tracking.StepMeter("cpu", clock=clock)  # the tokenizer: no tokens_per_image
    plain.start(); clock.now += 0.25
    assert plain.stop(4)["images_per_s"] == 16.0 and "tokens_per_s" not in plain.window()
    with pytest.raises(RuntimeError):
        meter.stop(1)


_RSS_PROBE = """
import json, resource, sys
import torch
from training import tracking
meter = tracking.StepMeter("cpu")
meter.start()
before = meter.stop(1)["rss_mb"]
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched
meter.window()  # a new window: its peak must come from the reading below
meter.start()
meter.stop(1)
after = meter.window()["rss_mb"]
print(json.dumps({"before": before, "peak": peak_mb, "after": after}))
"""


def test_cpu_memory_is_the_resident_size():
    # A fresh process: in the test session, memory freed by earlier tests can be reused without growing the
    # resident size, and where /proc is missing the reading falls back to a peak that earlier tests set.
    probe = subprocess.run([sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": "."})
    assert probe.returncode == 0, probe.stderr[-2000:]
    mb = json.loads(probe.stdout.strip().splitlines()[-1])
    assert 0 < mb["before"] <= mb["peak"] + 1, mb
    assert mb["after"] - mb["before"] > 48, mb


def test_tokens_per_image_matches_the_recipe():
    assert tracking.tokens_per_image((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) == 680


def test_cuda_memory_is_the_window_peak(monkeypatch):
    """No GPU here: torch.cuda's counters are replaced by a fake that keeps a peak like the allocator does."""
    calls = []

    class FakeAllocator:
        peak = 0

        def max_memory_allocated(self, device=None):
            return self.peak

        def reset_peak_memory_stats(self, device=None):
            calls.append("reset")
            self.peak = 0

        def synchronize(self, device=None):
            calls.append("sync")

    fake = FakeAllocator()
    for name in ("max_memory_allocated", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    clock = FakeClock()
    meter = tracking.StepMeter("cuda:0", clock=clock)
    assert calls == ["reset"]  # the first window starts clean
    meter.start(); fake.peak = 3 * 2**30; clock.now += 1
    meter.stop(2)
    assert calls == ["reset", "sync", "sync"]  # the clock is read after the queued kernels finished
    first = meter.window()
    assert first["cuda_max_alloc_mb"] == 3 * 1024 and "rss_mb" not in first
    meter.start(); fake.peak = 2**29; clock.now += 1
    meter.stop(2)
    assert meter.window()["cuda_max_alloc_mb"] == 512  # the 3 GiB peak belonged to the previous window

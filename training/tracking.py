"""Experiment trackers through accelerate (tensorboard, wandb, ... besides the always-written metrics.jsonl)
and the per-step throughput / memory meter whose window means go into every log line.

The trainer's calls:

    acc = Accelerator(..., **accelerator_tracking_kwargs(cfg.train, cfg.train.out_dir))
    start_trackers(acc, cfg.train.tracker_project, asdict(cfg))          # once, after the run folder exists
    meter = StepMeter(acc.device, tokens_per_image, num_processes=acc.num_processes)
    meter.start(); ...one optimiser step over this process's images...; meter.stop(images_this_process)
    record.update(meter.window())                                        # at every log line
    log_trackers(acc, record, step)
    finish_trackers(acc)                                                 # at the end of the run

Trackers write under <out_dir>/trackers/<tracker_project>/ (those that keep local files; wandb keeps its own).
"""
from __future__ import annotations

import json
import math
import numbers
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from accelerate import tracking as acc_tracking
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration

# the pip package that provides each tracker accelerate knows by name
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
                    "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}
TRACKERS_DIR = "trackers"


# ---- which trackers --------------------------------------------------------------------------------------
def parse_log_with(log_with) -> list:
    """train.log_with ("" | "tensorboard" | "wandb" | "all" | "tensorboard,wandb", or a list mixing names and
    GeneralTracker instances) as the list accelerate's `log_with` takes. Every name is checked here, because
    accelerate itself drops a tracker whose package is missing with only a debug message."""
    items = log_with.split(",") if isinstance(log_with, str) else list(log_with or [])
    available = {str(t) for t in acc_tracking.get_available_trackers()}
    out: list = []
    for item in items:
        if isinstance(item, GeneralTracker):
            out.append(item)
            continue
        if not isinstance(item, str):
            raise TypeError(f"train.log_with entries must be tracker names or accelerate GeneralTracker instances, "
                            f"got {item!r}")
        name = item.strip().lower()
        if not name or name in out:
            continue
        if name == "all":
            if not available:
                raise ValueError("train.log_with = 'all' but no tracker package is installed: pip install tensorboard "
                                 "(or wandb), or set train.log_with = ''")
            out += sorted(available - set(out))
        elif name in TRACKER_PACKAGES:
            if name not in available:
                raise ValueError(f"train.log_with names {name!r} but its package is not installed: pip install "
                                 f"{TRACKER_PACKAGES[name]}, or drop it from train.log_with")
            out.append(name)
        elif name in acc_tracking.LOGGER_TYPE_TO_CLASS:  # a class registered with register_tracker_class
            out.append(name)
        else:
            known = ", ".join(sorted(set(TRACKER_PACKAGES) | {"all"}))
            raise ValueError(f"train.log_with: unknown tracker {name!r}; use a comma list of {known}, or '' for "
                             f"metrics.jsonl only")
    return out


def accelerator_tracking_kwargs(run_cfg, out_dir: str | Path, log_with=None, **project_kwargs) -> dict:
    """Keyword arguments for `Accelerator(**kwargs)`: the parsed trackers (from `log_with` when given, e.g.
    tracker instances built in Python, else run_cfg.log_with) and a ProjectConfiguration rooted at out_dir with
    the trackers' files in out_dir/trackers. `project_kwargs` go to ProjectConfiguration (e.g. total_limit)."""
    out_dir = Path(out_dir)
    trackers = parse_log_with(run_cfg.log_with if log_with is None else log_with)
    project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / TRACKERS_DIR), **project_kwargs)
    return {"log_with": trackers or None, "project_config": project}


def flatten_config(config, prefix: str = "") -> dict:
    """A nested config as one level of `a.b.c` keys with values every tracker accepts (bool, int, float,
    str): lists and tuples become their JSON text, None becomes "none"."""
    flat: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif value is None:
            flat[name] = "none"
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, os.PathLike):
            flat[name] = os.fspath(value)
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def start_trackers(accelerator, project: str, config_dict: dict) -> None:
    """Start the accelerator's trackers with the flattened run config as hyper-parameters (main process only,
    as accelerate does it; a no-op without trackers)."""
    if accelerator.log_with:
        accelerator.init_trackers(project, config=flatten_config(config_dict))


def numeric_record(record: dict) -> dict:
    """The entries of a log record a tracker can plot: finite or not, real numbers only (bools, strings,
    lists, None are left out); 'step' is passed separately."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, numbers.Integral):
            out[key] = int(value)
        elif isinstance(value, numbers.Real):
            out[key] = float(value)
    return out


def log_trackers(accelerator, record: dict, step: int) -> None:
    if accelerator.log_with:
        accelerator.log(numeric_record(record), step=step)


def finish_trackers(accelerator) -> None:
    """Flush and close the trackers. Not accelerator.end_training(), which also destroys the process group."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            tracker.finish()


# ---- throughput and memory -------------------------------------------------------------------------------
def cpu_rss_mb() -> float:
    """This process's resident memory now (Linux: /proc/self/statm), else its peak (getrusage: ru_maxrss is
    KiB on Linux, bytes on macOS)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class StepMeter:
    """Times optimiser steps and reads memory; `window()` returns the figures since its last call.

    Per step: `start()` before fetching the batch, optionally `data_ready()` once the batch is on the device,
    `stop(num_images)` after the optimiser step with the images *this process* trained on (micro-batch x
    grad_accum). Rates are global (x num_processes: every process runs the same number of images per step)
    and taken over the whole window (total images / total time), so a slow step weighs by its duration.
    Memory is the window's peak: CUDA max allocated (its peak counter is reset at each window), else RSS.
    """

    def __init__(self, device, tokens_per_image: int = 0, num_processes: int = 1,
                 clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.tokens_per_image, self.num_processes, self.clock = tokens_per_image, num_processes, clock
        self._t0 = self._t_data = None
        self._reset()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def _reset(self) -> None:
        self.steps, self.images, self.seconds, self.data_seconds, self.rss_peak = 0, 0, 0.0, 0.0, 0.0

    def _sync(self) -> None:
        if self.cuda:  # kernels run asynchronously: without this the clock reads launch time, not step time
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0, self._t_data = self.clock(), None

    def data_ready(self) -> None:
        if self._t0 is not None:
            self._t_data = self.clock()

    def stop(self, num_images: int) -> dict:
        """The figures of the step just timed (also added to the window)."""
        if self._t0 is None:
            raise RuntimeError("StepMeter.stop() without start()")
        self._sync()
        t1 = self.clock()
        elapsed, data = t1 - self._t0, (self._t_data - self._t0 if self._t_data is not None else 0.0)
        self._t0 = None
        self.steps, self.images = self.steps + 1, self.images + num_images
        self.seconds, self.data_seconds = self.seconds + elapsed, self.data_seconds + data
        if not self.cuda:
            self.rss_peak = max(self.rss_peak, cpu_rss_mb())
        return self._figures(1, num_images, elapsed, data)

    def _figures(self, steps: int, images: int, seconds: float, data_seconds: float) -> dict:
        rate = images * self.num_processes / seconds if seconds > 0 else math.nan
        out = {"step_time_s": seconds / steps, "data_time_s": data_seconds / steps, "images_per_s": rate}
        if self.tokens_per_image:
            out["tokens_per_s"] = rate * self.tokens_per_image
        if self.cuda:
            out["cuda_max_alloc_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            out["rss_mb"] = max(self.rss_peak, cpu_rss_mb())
        return out

    def window(self) -> dict:
        """Means over the steps since the last call ({} when none was timed); starts a new window."""
        if not self.steps:
            return {}
        out = self._figures(self.steps, self.images, self.seconds, self.data_seconds)
        self._reset()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        return out


def tokens_per_image(patch_nums: Iterable[int]) -> int:
    """Tokens a VAR predicts per image: the sum of the scales' pn x pn maps (680 for the 256 px recipe)."""
    return sum(int(pn) ** 2 for pn in patch_nums)

"""The training loop through `accelerate`, in one place: a DataLoader over step-keyed batches (workers; the data
order is a pure function of the step, training/loader.py), gradient accumulation, clipping, the VAR lr/wd
schedule, EMA, validation every `train.val_every` steps, JSONL logs and trackers with throughput / memory /
gradient norm, sample grids, atomic pickle-free checkpoints that hold the full state under DDP and FSDP.

A *job* (training/job.py: the tokenizer, VAR, CoDe and DD jobs) supplies the models, the loader dataset and
collate, `prepare_batch` (e.g. encoding streamed images into tokens), the loss, the validation metrics, the
sample grid and the exported weights.

Run directory (`train.out_dir`): config.json (the full config + distributed setup), metrics.jsonl (one JSON
record per logged step, and one per validation pass), trackers/ (train.log_with), samples/step_XXXXXXX.png,
checkpoints/latest.txt (name of the newest complete checkpoint) and checkpoints/step_XXXXXXX/ (the newest
`train.keep_checkpoints`; pickle-free, sealed by a sha256 manifest: training/run_state.py), <job>.safetensors
(the exported weights) and, for VAR jobs with train.tokens = "cache", the sharded token cache
(training/token_cache.py). `--resume` continues from the newest intact checkpoint: same data / optim / loss /
seed settings; steps, logging and paths may change.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import GradScalerKwargs
from tqdm import tqdm

from training.atomic import atomic_write_bytes
from training.images import save_png_atomic
from training.dist_state import (ShardedEMA, check_supported, distributed_kind, full_model_state,
                                 full_optimizer_state, load_model_state, load_optimizer_state)
from training.optim import EMA, build_adamw, ema_decay_at, set_schedule
from training.resume_settings import check_same_settings, model_settings, plain, resume_relevant
from training.config import TrainConfig
from training.job import TrainJob
from training.loader import SkipCounter, StepBatchSampler, ValSampler, make_loader
from training.tracking import (StepMeter, accelerator_tracking_kwargs, finish_trackers, log_trackers,
                               start_trackers)
from training.run_state import (find_intact_checkpoint, load_tree, read_log_records, rng_state, save_tree,
                                set_rng_state, write_manifest)

STATE_FILES = ("state.json", "state.safetensors")
STATE_KEYS = {"step", "epoch", "pos", "world_size", "wall_s", "config", "optimizers", "models", "ema", "scaler"}


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """bf16 autocast on CUDA by default, fp32 on CPU ("auto"). CPU bf16 autocast is opt-in: it pays on CPUs with
    bf16 dot-product instructions (AVX512-BF16 / AMX; 1.2-1.3x per VAR step measured on this machine's EPYC), and
    is slower than fp32 elsewhere. fp16 (CUDA only) uses the recipe's gradient scaler (initial scale 2^11, growth
    interval 1000)."""
    on_cuda = torch.cuda.is_available()
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if on_cuda else "no"
    if mp == "fp16" and not on_cuda:
        raise ValueError("train.mixed_precision = 'fp16' needs a CUDA device; use 'bf16', 'auto' or 'no' on CPU")
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    handlers = [GradScalerKwargs(init_scale=2.0**11, growth_interval=1000)] if mp == "fp16" else []
    tracking = accelerator_tracking_kwargs(cfg.train, cfg.train.out_dir)  # a bad log_with fails before any file is written
    return Accelerator(mixed_precision=mp, cpu=not on_cuda, kwargs_handlers=handlers, **tracking)


class Trainer:
    def __init__(self, cfg: TrainConfig, job: TrainJob, accelerator: Accelerator):
        self.cfg, self.job, self.acc = cfg, job, accelerator
        self.out = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        world, accum = accelerator.num_processes, cfg.optim.grad_accum
        if cfg.optim.batch_size % (world * accum):
            raise ValueError(f"optim.batch_size {cfg.optim.batch_size} must be divisible by processes x grad_accum "
                             f"= {world} x {accum}")
        self.micro_batch = cfg.optim.batch_size // (world * accum)
        # what a resume must keep: the run's settings and the configs of the models it trains
        self.resume_settings = {**resume_relevant(asdict(cfg)), "models": model_settings(job.all_models()),
                                **plain(job.resume_settings())}
        self.num_items = job.num_items()
        if self.num_items < cfg.optim.batch_size:
            raise ValueError(f"the dataset has {self.num_items} items, fewer than one global batch ({cfg.optim.batch_size})")
        self.step, self.epoch, self.pos = 0, 0, 0
        self.wall_s = 0.0  # training wall time, carried over by --resume
        fsdp = distributed_kind(accelerator) == "fsdp"
        # FSDP leaves no unsharded model: sample grids and the export load the gathered state into this copy
        self._fsdp = fsdp
        self._plain = copy.deepcopy(job.model) if fsdp and accelerator.is_main_process else None
        self.ema = EMA(job.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 and not fsdp else None
        # Each model with its optimizer in ONE prepare call: accelerate's FSDP2 refuses a model without its
        # optimizer (and two models in one call), and swaps the optimizer's parameters for the shards.
        # optimizers[i] belongs to all_models()[i]; the checkpoint pairs them the same way.
        optimizers = [build_adamw(job.model, cfg.optim)] + job.extra_optimizers(cfg.optim)
        pairs = [accelerator.prepare(m, o) for m, o in zip(job.all_models(), optimizers, strict=True)]
        job.set_prepared([m for m, _ in pairs])
        self.optimizers = [o for _, o in pairs]
        for model in job.all_models():
            check_supported(accelerator, model)  # DeepSpeed / flat FSDP1: a one-line error now, not at the first checkpoint
        if cfg.optim.ema_decay > 0 and fsdp:  # per-shard average; state_dict() gathers it
            self.ema = ShardedEMA(accelerator.unwrap_model(job.model), cfg.optim.ema_decay)
        self.skipped = 0  # unreadable images skipped so far (data.skip_corrupt), over all processes
        self.skips = SkipCounter()  # this process's: warns once about each unreadable file
        # Checkpointed objects besides models and optimizers (state_dict / load_state_dict), stored in the
        # pickle-free train state under their name; jobs may register more.
        self.registered: dict[str, object] = {}
        self._val_loader = None

    def register_for_checkpointing(self, name: str, obj) -> None:
        """Like accelerate's, but stored pickle-free in the train state (training/run_state.py)."""
        if name in self.registered or name in STATE_KEYS:
            raise ValueError(f"a checkpointed object named {name!r} is already registered")
        self.registered[name] = obj

    # ---- data: a seeded permutation per epoch, each global batch split over processes (training/loader.py)

    def _sampler(self, start_step: int) -> StepBatchSampler:
        cfg, acc = self.cfg, self.acc
        return StepBatchSampler(self.num_items, cfg.optim.batch_size, cfg.optim.grad_accum, acc.num_processes,
                                acc.process_index, cfg.train.seed, start_step, cfg.train.steps)

    def _loader(self, dataset, batch_sampler, num_workers: int):
        d = self.cfg.data
        return make_loader(dataset, batch_sampler, self.job.collate, num_workers, d.persistent_workers,
                           d.prefetch_factor, pin_memory=self.acc.device.type == "cuda", seed=self.cfg.train.seed)

    # ---- the loop -----------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> Path:
        cfg, acc = self.cfg, self.acc
        if resume:
            self._load_latest()
        elif (self.ckpt_dir / "latest.txt").exists():
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or choose another train.out_dir")
        acc.wait_for_everyone()  # nobody may create files before every process has checked for an old run
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resume:  # a run that died before its first checkpoint leaves a log nobody can continue
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            run_info = {**asdict(cfg), "distributed": {"num_processes": acc.num_processes, "backend": acc.state.backend,
                                                       "mixed_precision": acc.mixed_precision,
                                                       "device": str(acc.device), "torch_threads": torch.get_num_threads()}}
            atomic_write_bytes(self.out / "config.json", json.dumps(run_info, indent=2).encode())
        start_trackers(acc, cfg.train.tracker_project, asdict(cfg))
        self._seed_everything(resume)
        meter = StepMeter(acc.device, tokens_per_image=self.job.tokens_per_item, num_processes=acc.num_processes)
        total = cfg.train.steps
        data_order = self._sampler(self.step)
        batches = iter(self._loader(self.job.loader_dataset(), data_order, self.job.loader_num_workers()))
        bar = tqdm(total=total, initial=self.step, disable=not acc.is_main_process, desc=f"train {cfg.job}")
        started = time.perf_counter() - self.wall_s
        while self.step < total:
            meter.start()
            metrics = self._train_step(batches, meter)
            meter.stop(self.micro_batch * cfg.optim.grad_accum)
            self.step += 1
            self.epoch, self.pos = data_order.epoch_pos(self.step)  # a pure function of the step
            self.wall_s = time.perf_counter() - started
            bar.update(1)
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(self.job.model), ema_decay_at(cfg.optim, self.step))
            if acc.is_main_process and (self.step % cfg.train.log_every == 0 or self.step == total):
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                self._log({"step": self.step, "epoch": self.epoch, **metrics, **meter.window(),
                           "skipped_images": self.skipped, "wall_s": round(self.wall_s, 2)})
            if cfg.train.val_every and (self.step % cfg.train.val_every == 0 or self.step == total):
                self._validate()
            if self.step % cfg.train.sample_every == 0 or self.step == total:
                self._sample_grid()
            if self.step % cfg.train.ckpt_every == 0 or self.step == total:
                self._save_checkpoint()
        bar.close()
        finish_trackers(acc)
        return self._export()

    def _train_step(self, batches, meter: StepMeter) -> dict:
        """One optimiser update over the global batch: grad_accum micro-batches per process, gradients
        synchronised once (on the last micro-batch), clipped, then the generator step and the job's
        extra steps (the tokenizer's discriminator)."""
        cfg, acc, job = self.cfg, self.acc, self.job
        lr = [set_schedule(opt, self.step, cfg.train.steps, cfg.optim) for opt in self.optimizers][0]
        micro = [next(batches) for _ in range(cfg.optim.grad_accum)]
        meter.data_ready()
        # unreadable images skipped in this step, x processes: the mean over processes below is then the sum
        skipped = sum(self.skips.update(b) for b in micro)
        sums: dict[str, float] = {"skipped_step": float(acc.num_processes * skipped)}
        for i, cpu_batch in enumerate(micro):
            batch = job.prepare_batch(cpu_batch, acc.device)
            last = i == len(micro) - 1
            with acc.no_sync(job.model) if not last else nullcontext():
                with acc.autocast():
                    loss, metrics = job.loss(batch, self.step)
                self._check_finite(loss)
                acc.backward(loss / len(micro))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(micro)
        # without clipping the norm is still measured (max_norm = inf leaves the gradients unchanged)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        sums["grad_norm"] = float(acc.clip_grad_norm_(job.model.parameters(), max_norm))
        if cfg.optim.grad_clip > 0:
            # fp16 skips steps with inf gradients through its scaler; elsewhere a non-finite norm is fatal
            if acc.scaler is None and not math.isfinite(sums["grad_norm"]):
                self._stop(f"non-finite gradient norm ({sums['grad_norm']})")
        self.optimizers[0].step()
        self.optimizers[0].zero_grad(set_to_none=True)
        sums.update(job.after_step(self.optimizers[1:], self.step, micro, acc))
        sums["lr"] = lr
        keys = sorted(sums)  # one collective for all metrics (same keys on every process)
        means = acc.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=acc.device), "mean")
        metrics = dict(zip(keys, means.tolist()))
        self.skipped += round(metrics.pop("skipped_step"))
        return metrics

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Every process takes the same decision (the flag is summed), so none is left waiting in a collective."""
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=self.acc.device)
        if float(self.acc.reduce(bad, "sum")) > 0:
            self._stop(f"non-finite loss ({float(loss.detach())})")

    def _stop(self, what: str) -> None:
        latest = self.ckpt_dir / "latest.txt"
        last = self.ckpt_dir / latest.read_text().strip() if latest.exists() else "none (no checkpoint written yet)"
        raise FloatingPointError(f"{what} at step {self.step + 1} (after {self.step} completed steps); stopping. "
                                 f"Last good checkpoint: {last}. Lower optim.base_lr or enable optim.grad_clip, "
                                 f"then continue it with --resume")

    # ---- validation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _validate(self) -> None:
        """Mean of the job's val_metrics over the held-out split (item-weighted, over all processes)."""
        dataset = self.job.val_dataset()
        if dataset is None:
            return
        acc, model = self.acc, self.job.model
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        count = 0.0
        # this process's share of the held-out batches, padded so every process runs the same forwards;
        # train.val_batches counts global batches, so the items scored do not depend on processes x grad_accum
        micro_per_global = acc.num_processes * self.cfg.optim.grad_accum
        batches = ValSampler(len(dataset), self.micro_batch, self.cfg.train.val_batches * micro_per_global,
                             acc.num_processes, acc.process_index, pad=True)
        if self._val_loader is None:  # built once: with persistent_workers its workers live between passes
            self._val_loader = self._loader(dataset, batches, self.cfg.data.num_workers)  # images: decoded by workers
        for weight, cpu_batch in zip(batches.weights, self._val_loader, strict=True):
            self.skips.update(cpu_batch)  # warns about unreadable files; the logged count is training's
            with acc.autocast():
                metrics = self.job.val_metrics(self.job.prepare_batch(cpu_batch, acc.device))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
            count += weight
        model.train(was_training)
        keys = sorted(sums)
        totals = acc.reduce(torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=acc.device), "sum")
        means = {f"val_{k}": v / float(totals[-1]) for k, v in zip(keys, totals[:-1].tolist())}
        if acc.is_main_process:
            self._log({"step": self.step, "epoch": self.epoch, **means, "val_items": int(totals[-1])})

    # ---- logging, grids -------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        """metrics.jsonl always (one JSON record per line); accelerate trackers (train.log_with) too."""
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        log_trackers(self.acc, record, record["step"])

    def _model_for_use(self):
        """The EMA model (the trained one without EMA or with train.export_weights = "model") as a plain module
        on the main process, None elsewhere. Every process must call it: under FSDP it gathers the shards."""
        acc = self.acc
        use_ema = self.ema is not None and self.cfg.train.export_weights == "ema"
        if not self._fsdp:
            if not acc.is_main_process:
                return None
            return self.ema.model if use_ema else acc.unwrap_model(self.job.model)
        sd = self.ema.state_dict() if use_ema else full_model_state(acc, self.job.model)
        if not acc.is_main_process:
            return None
        self._plain.load_state_dict(sd)
        return self._plain.to(acc.device)

    def _sample_grid(self) -> None:
        model = self._model_for_use()
        if model is None:
            return
        grid = self.job.sample_grid(model)
        if grid is not None:
            (self.out / "samples").mkdir(exist_ok=True)
            save_png_atomic(grid, self.out / "samples" / f"step_{self.step:07d}.png")

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _seed_everything(self, resumed: bool) -> None:
        if resumed:
            return  # RNG states came from the checkpoint
        seed = self.cfg.train.seed * 1000 + self.acc.process_index
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _save_checkpoint(self) -> None:
        """Layout in training/run_state.py: every process writes its RNG state, the main process the rest,
        then seals the folder with manifest.json (last) and renames it into place; latest.txt follows."""
        acc = self.acc
        name = f"step_{self.step:07d}"
        tmp, final = self.ckpt_dir / f"{name}.tmp", self.ckpt_dir / name
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_tree(tmp, f"rng_rank{acc.process_index}", rng_state())
        # on every process: under FSDP these gather the shards (collectives); plain / DDP: state_dict() itself
        models = [full_model_state(acc, m) for m in self.job.all_models()]
        optimizers = [full_optimizer_state(acc, m, o) for m, o in zip(self.job.all_models(), self.optimizers)]
        ema = self.ema.state_dict() if self.ema is not None else None
        acc.wait_for_everyone()
        if acc.is_main_process:
            # The lr / wd schedule is a pure function of the step, so the step is the scheduler state.
            state = {"step": self.step, "epoch": self.epoch, "pos": self.pos, "world_size": acc.num_processes,
                     "wall_s": self.wall_s, "config": self.resume_settings,
                     "optimizers": optimizers, "models": models, "ema": ema,
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "skipped": self.skipped,
                     "registered": {name: obj.state_dict() for name, obj in self.registered.items()}}
            save_tree(tmp, "state", state)
            write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_bytes(self.ckpt_dir / "latest.txt", name.encode())
            kept = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
            for old in kept[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _load_latest(self) -> None:
        folder, state, listed = find_intact_checkpoint(self.ckpt_dir, STATE_FILES, STATE_KEYS,
                                                       warn=self.acc.is_main_process)
        check_same_settings(self.resume_settings, state["config"], self.out)
        for model, opt, model_sd, opt_sd in zip(self.job.all_models(), self.optimizers, state["models"],
                                                state["optimizers"]):
            load_model_state(self.acc, model, model_sd)  # every process holds the full state: no broadcast
            load_optimizer_state(self.acc, model, opt, opt_sd)
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.acc.scaler is not None and state.get("scaler") is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        missing = sorted(set(self.registered) - set(state.get("registered", {})))
        if missing:
            raise ValueError(f"--resume: {folder} holds no state for the registered object(s) {missing}; it was "
                             f"written by a run without them: start a fresh run in another train.out_dir")
        for name, obj in self.registered.items():
            obj.load_state_dict(state["registered"][name])
        self.step, self.epoch, self.pos, self.wall_s = state["step"], state["epoch"], state["pos"], state["wall_s"]
        self.skipped = int(state.get("skipped", 0))
        rng_stem = f"rng_rank{self.acc.process_index}"
        if state["world_size"] == self.acc.num_processes and f"{rng_stem}.json" in listed:
            set_rng_state(load_tree(folder, rng_stem), str(folder / f"{rng_stem}.json"))
        else:
            self._seed_everything(False)
        log = self.out / "metrics.jsonl"
        if log.exists():  # every process reads it, so a corrupt log stops all of them, not just the main one
            records, partial = read_log_records(log)
            if self.acc.is_main_process:
                if partial is not None:
                    warnings.warn(f"--resume: dropped the partial last line of {log} (the run was killed while "
                                  f"writing it): {partial[:80]!r}", stacklevel=3)
                # drop log lines written after the checkpoint we resume from
                keep = [line for line, record in records if record["step"] <= self.step]
                atomic_write_bytes(log, ("\n".join(keep) + "\n" if keep else "").encode())

    def _export(self) -> Path:
        path = self.out / f"{self.job.export_name}.safetensors"
        model = self._model_for_use()
        if model is not None:
            self.job.export(path, model)
        self.acc.wait_for_everyone()
        return path


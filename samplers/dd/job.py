"""Distilled-decoding student training job for `training.trainer.Trainer` (spec accelerators.md 4.5).

  python -m samplers.dd.data --config configs/fmnist_dd.toml      # 1. the (label, noise, tokens) dataset
  python train.py dd --config configs/fmnist_dd.toml         # 2. the student (accelerate, resume, JSONL logs)

Each row gets a timestep t from dd.train_t (default DD1's {0, t2}; uniform, from the process's seeded RNG,
so --resume is exact). With dd.val_samples, the last pairs of the dataset are held out and scored every
train.val_every steps at each training timestep (val_t{t}_acc_s{scale}, val_t{t}_ce, ... in metrics.jsonl). Its
input holds the code vectors of the flow-mapped tokens of scales < t and the original noise of scales >= t;
the targets are the tokens of scales >= t: cross-entropy through the classifier head for scales < loss_split,
per-coordinate MSE to the code vector through the continuous head for the others, divided by the codebook's
per-coordinate variance so that `cont_weight` = 1 weighs both heads alike whatever the tokenizer's code scale
(the spec leaves the exact regression loss open, 4.5 [U]; MSE is the plain choice). Data slots are not supervised.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from samplers.base import check_models_compatible
from samplers.dd.data import DDConfig, DDDataset, model_fingerprint
from samplers.dd.sampler import DDSampler
from samplers.dd.student import DDStudent
from training.checkpoint import load_any, load_model, read_metadata, save_model
from training.config import TrainConfig
from training.images import grid_image
from training.job import TrainJob
from var.config import from_dict


def dd_loss(forward, student: DDStudent, codebook_VC: torch.Tensor, labels_B: torch.Tensor, noise_BLC: torch.Tensor,
            tokens_BL: torch.Tensor, t_B: torch.Tensor, cont_weight: float) -> tuple[torch.Tensor, dict]:
    """Loss of one batch at per-row timesteps t_B. `forward` is the (possibly DDP-wrapped) student, `student`
    the module itself (for its schedule). Metrics: CE, MSE and per-scale accuracy of the
    supervised (noise) slots, argmax for classifier scales and nearest code for continuous ones."""
    scale_L = student.scale_of_token_L
    data_BL = scale_L[None, :] < t_B[:, None]
    codes_BLC = codebook_VC[tokens_BL].float()
    slots = torch.where(data_BL[..., None], codes_BLC, noise_BLC.float())
    logits_BLV, cont_BLC = forward(labels_B, slots, t_B)
    supervised = ~data_BL
    discrete = supervised & (scale_L[None, :] < student.loss_split)
    continuous = supervised & (scale_L[None, :] >= student.loss_split)
    zero = logits_BLV.sum() * 0.0  # keeps every head in the graph (DDP needs all parameters used)
    ce = F.cross_entropy(logits_BLV[discrete], tokens_BL[discrete]) if discrete.any() else zero
    mse = F.mse_loss(cont_BLC[continuous], codes_BLC[continuous]) if continuous.any() else zero
    # relative to the codebook's spread: a tokenizer's code scale is arbitrary, the CE's is not
    code_var = codebook_VC.float().var(dim=0, unbiased=False).mean()
    loss = ce + cont_weight * mse / code_var + 0.0 * cont_BLC.sum()
    metrics = {"loss": loss.detach(), "ce": ce.detach(), "mse": mse.detach(), "mse_rel": (mse / code_var).detach()}
    with torch.no_grad():
        pred = logits_BLV.argmax(-1)
        if continuous.any():
            d = torch.cdist(cont_BLC.reshape(-1, cont_BLC.shape[-1]), codebook_VC.float())
            pred = torch.where(continuous, d.argmin(-1).view_as(pred), pred)
        correct = (pred == tokens_BL).float()
        for s, sl in enumerate(student.scale_slices()):
            rows = supervised[:, sl.start]
            if rows.any():
                metrics[f"acc_s{s}"] = correct[rows][:, sl].mean()
    return loss, metrics


@torch.no_grad()
def evaluate_pairs(student: DDStudent, codebook_VC: torch.Tensor, data: DDDataset, batch_size: int = 256) -> dict:
    """Held-out (noise, tokens) pairs (spec 4.9 item 4): per-scale token accuracy, CE and code-vector MSE of
    the supervised slots at t = 0 and t = t2, averaged over batches weighted by their size."""
    was_training = student.training
    student.eval()
    device = codebook_VC.device
    out = {}
    for t in (0, student.t2):
        sums: dict[str, float] = {}
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            labels, noise, tokens = data.fetch(idx, device)
            _, metrics = dd_loss(student, student, codebook_VC, labels, noise, tokens,
                                 torch.full((len(idx),), t, device=device), 0.0)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx) / len(data)
        out[f"t{t}"] = {k: round(v, 5) for k, v in sums.items() if k != "loss"}
    student.train(was_training)
    return out


class HeldOutPairs(Dataset):
    """The held-out pairs as loader keys: key (i, epoch) -> (offset + i, epoch), for the job's fetch."""

    def __init__(self, offset: int, count: int):
        self.offset, self.count = offset, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        index, epoch = key
        return self.offset + index, epoch


def check_student_file(path: str, teacher_fingerprint: str, source: str, teacher: str, kind_fix: str,
                       teacher_fix: str) -> None:
    """A dd_student checkpoint distilled from these teacher weights, read from its metadata before any loading
    (source names the setting that passed it, teacher the weights it must match; *_fix: how to mend each)."""
    meta = read_metadata(path)
    if meta["kind"] != "dd_student":
        raise ValueError(f"{source} = {path} holds a {meta['kind']} checkpoint; {kind_fix}")
    if meta["extra"].get("teacher_fingerprint") != teacher_fingerprint:
        raise ValueError(f"{source} = {path} was distilled from other teacher weights than {teacher}; {teacher_fix}")


def continued_student(path: str, teacher_fingerprint: str, dd: DDConfig) -> DDStudent:
    """train.init_from for the dd job: a student to train further (e.g. on a larger dataset). It must have been
    distilled from these teacher weights with the same t2 and loss_split, or its slots would mean other things."""
    check_student_file(path, teacher_fingerprint, "train.init_from", dd.teacher,
                       "the dd job continues a dd_student (leave train.init_from empty to start the student from "
                       "dd.teacher)", "continue a student of this teacher or leave train.init_from empty")
    student = load_model(path, "dd_student")
    if (student.t2, student.loss_split) != (dd.t2, dd.loss_split):
        raise ValueError(f"train.init_from = {path} has t2 = {student.t2}, loss_split = {student.loss_split}, but "
                         f"[dd] sets {dd.t2}, {dd.loss_split}; make them equal")
    return student


class DDJob(TrainJob):
    export_name = "dd_student"

    def __init__(self, cfg: TrainConfig, dd: DDConfig, device: torch.device, main_process: bool = True):
        if not dd.teacher or not dd.tokenizer:
            raise ValueError("the dd job needs dd.teacher (the VAR being distilled) and dd.tokenizer")
        self.cfg, self.dd = cfg, dd
        self.teacher = load_any(dd.teacher, "var", device=device).eval().requires_grad_(False)
        self.vae = load_any(dd.tokenizer, "vqvae", device=device, patch_nums=self.teacher.patch_nums)
        self.vae.eval().requires_grad_(False)
        check_models_compatible(self.teacher, self.vae, "dd.teacher")
        self.teacher_fingerprint = model_fingerprint(self.teacher)  # hashes every weight: once
        self.data = DDDataset(dd.data_dir)
        self._check_dataset()
        K = self.teacher.num_scales
        if dd.timesteps[-1] >= K or dd.t2 >= K:
            raise ValueError(f"[dd] t2 = {dd.t2} and train_t = {dd.timesteps} must be below the teacher's {K} scales")
        if dd.val_samples >= len(self.data):
            raise ValueError(f"[dd] val_samples = {dd.val_samples} leaves no training pairs of the {len(self.data)} in "
                             f"{dd.data_dir}")
        self.timesteps_T = torch.tensor(dd.timesteps)
        if cfg.train.init_from:
            self.student = continued_student(cfg.train.init_from, self.teacher_fingerprint, dd)
        else:
            self.student = DDStudent.from_teacher(self.teacher, t2=dd.t2, loss_split=dd.loss_split)
        self.student = self.student.to(device).train()
        self.model = self.student  # replaced by the accelerate-prepared wrapper (same parameters)
        self.codebook_VC = self.vae.quantize.embedding.weight.detach()

    def _check_dataset(self) -> None:
        m = self.data.manifest
        if m["teacher_fingerprint"] != self.teacher_fingerprint:
            raise ValueError(f"{self.dd.data_dir} was generated by other teacher weights than {self.dd.teacher}; "
                             f"regenerate it (python -m samplers.dd.data) or point dd.teacher at the generating model")
        if m["tokenizer_fingerprint"] != model_fingerprint(self.vae):
            raise ValueError(f"{self.dd.data_dir} was generated with another tokenizer than {self.dd.tokenizer}")

    # ---- job interface (see training/trainer.py) ---------------------------------------------------------------
    def resume_settings(self) -> dict:
        return {"dd": dataclasses.asdict(self.dd)}

    def num_items(self) -> int:
        return len(self.data) - self.dd.val_samples

    def fetch(self, indices: list[int], device: torch.device):
        return self.data.fetch(indices, device)

    def loss(self, batch, step: int):
        labels_B, noise_BLC, tokens_BL = batch
        # a uniform pick from the timesteps; with DD1's two, exactly the earlier where(rand < 0.5, 0, t2)
        pick_B = (torch.rand(labels_B.shape[0]) * len(self.timesteps_T)).long()
        t_B = self.timesteps_T[pick_B].to(labels_B.device)
        return dd_loss(self.model, self.student, self.codebook_VC, labels_B, noise_BLC, tokens_BL, t_B, self.dd.cont_weight)

    def val_dataset(self) -> Dataset | None:
        n = self.dd.val_samples
        return HeldOutPairs(len(self.data) - n, n) if n else None

    @torch.no_grad()
    def val_metrics(self, batch) -> dict:
        """Held-out CE, MSE and per-scale accuracy of the supervised slots at each training timestep."""
        labels_B, noise_BLC, tokens_BL = batch
        out = {}
        for t in self.dd.timesteps:
            t_B = torch.full_like(labels_B, t)
            _, metrics = dd_loss(self.model, self.student, self.codebook_VC, labels_B, noise_BLC, tokens_BL, t_B,
                                 self.dd.cont_weight)
            out.update({f"t{t}_{k}": float(v) for k, v in metrics.items() if k != "loss"})
        return out

    def after_step(self, extra_optimizers, step, micro, acc) -> dict:
        return {}

    @torch.no_grad()
    def sample_grid(self, model: DDStudent):
        """One row per class (first 10), 1-step student samples with a fixed seed: comparable over steps."""
        was_training = model.training
        model.eval()
        per_class = self.cfg.train.samples_per_class
        labels = torch.arange(min(model.num_classes, 10), device=self.codebook_VC.device)
        sampler = DDSampler(self.teacher, self.vae, student=model, schedule="1step")
        images = sampler.sample(labels.repeat_interleave(per_class), seed=0).images
        model.train(was_training)
        return grid_image(images, nrow=per_class)

    def export(self, path: Path, model: DDStudent) -> None:
        m = self.data.manifest
        extra = {"teacher": self.dd.teacher, "tokenizer": self.dd.tokenizer, "teacher_fingerprint": m["teacher_fingerprint"],
                 "data_dir": self.dd.data_dir, "generation": m["settings"], "num_samples": len(self.data),
                 "cont_weight": self.dd.cont_weight}
        save_model(path, model, extra=extra)


def build_dd_job(cfg: TrainConfig, table: dict, config_path: str, device: torch.device, main_process: bool) -> DDJob:
    """The [dd] table -> DDJob (what train.py calls for `train.py dd`)."""
    return DDJob(cfg, from_dict(DDConfig, table, f"{config_path}[dd]"), device, main_process)

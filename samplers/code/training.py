"""CoDe specialised fine-tuning (spec accelerators §1.3): losses and trainer jobs.

* Drafter: cross-entropy against ground-truth tokens on scales 0..N-1 only (teacher forcing; the
  refining scales get no gradient at all).
* Refiner: knowledge distillation from a larger pre-trained VAR (the teacher's logits, not labels)
  over all scales, per-token weight w_k = lambda for drafting scales k < N and 1 for refining scales,
  with lambda(t) = max(0, 1 - t / T) decaying linearly from 1 to 0 over the run (t, T in epochs, or in
  optimiser steps, as long as both use the same unit; the jobs use steps).
  KL direction: forward KD, KL(teacher || student) = sum_v p_t (log p_t - log p_s), as the authors'
  released helper (the paper text writes KL(student || teacher)). Optional softmax temperature tau
  (released helper: 1), with the usual tau^2 gradient rescaling. Reduction: the weighted sum over all
  B x L tokens divided by B x L, so lambda -> 0 really removes the drafting scales instead of
  renormalising the remaining weights.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.checkpoint import load_any
from training.hub import is_hub_uri
from training.var_job import VARJob


def scale_ids(patch_nums) -> torch.Tensor:
    """(L,) scale index of every sequence position."""
    return torch.cat([torch.full((p * p,), si) for si, p in enumerate(patch_nums)])


def check_draft_scales(patch_nums, draft_scales: int, low: int) -> None:
    K = len(patch_nums)
    if not isinstance(draft_scales, int) or not low <= draft_scales <= K:
        raise ValueError(f"draft_scales must be an integer in [{low}, {K}] for patch_nums {tuple(patch_nums)}, got {draft_scales!r}")


def drafter_loss(logits_BLV: torch.Tensor, targets_BL: torch.Tensor, patch_nums, draft_scales: int,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the positions of scales < draft_scales only."""
    check_draft_scales(patch_nums, draft_scales, 1)
    n = sum(p * p for p in patch_nums[:draft_scales])  # scales are contiguous from position 0
    return F.cross_entropy(logits_BLV[:, :n].flatten(0, 1), targets_BL[:, :n].flatten(), label_smoothing=label_smoothing)


def kd_lambda(t: float, total: float) -> float:
    """Weight of the drafting scales at 0-based step t: 1 at the start, linearly down to 0 at `total` (so the
    last step of a run with total = steps uses 1 / steps), then 0."""
    if total <= 0:
        raise ValueError(f"the schedule length must be > 0, got {total}")
    return max(0.0, 1.0 - t / total)


def scale_weights(patch_nums, draft_scales: int, lam: float) -> torch.Tensor:
    """(L,) per-position weights: lam on drafting scales (k < N), 1 on refining scales."""
    check_draft_scales(patch_nums, draft_scales, 0)
    ids = scale_ids(patch_nums)
    return torch.where(ids < draft_scales, torch.tensor(float(lam)), torch.tensor(1.0))


def distillation_loss(student_BLV: torch.Tensor, teacher_BLV: torch.Tensor, patch_nums, draft_scales: int,
                      lam: float, temperature: float = 1.0) -> torch.Tensor:
    """sum over tokens of w_k KL(teacher_k || student_k), divided by the token count (see module doc)."""
    if student_BLV.shape != teacher_BLV.shape:
        raise ValueError(f"student logits {tuple(student_BLV.shape)} and teacher logits {tuple(teacher_BLV.shape)} differ; "
                         f"the teacher must share the tokenizer (vocabulary and scales) with the student")
    log_s = F.log_softmax(student_BLV.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_BLV.float() / temperature, dim=-1)
    kl_BL = (log_t.exp() * (log_t - log_s)).sum(-1)
    w_L = scale_weights(patch_nums, draft_scales, lam).to(kl_BL.device)
    return (kl_BL * w_L).mean() * temperature ** 2


@dataclass
class CoDeTrainConfig:
    """The [code] table of a CoDe fine-tuning config."""
    draft_scales: int = 6  # N: scales 0..N-1 belong to the drafter
    teacher: str = ""  # refiner job: path of the larger pre-trained VAR (frozen)
    kd_temperature: float = 1.0
    lambda_steps: int = 0  # refiner job: steps over which lambda decays 1 -> 0 (0: the whole run)

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.draft_scales, bool) or not isinstance(self.draft_scales, int) or self.draft_scales < 0:
            problems.append(f"code.draft_scales must be an integer >= 0, got {self.draft_scales!r}")
        if not isinstance(self.kd_temperature, (int, float)) or not 0 < self.kd_temperature < math.inf:
            problems.append(f"code.kd_temperature must be a finite number > 0, got {self.kd_temperature!r}")
        if isinstance(self.lambda_steps, bool) or not isinstance(self.lambda_steps, int) or self.lambda_steps < 0:
            problems.append(f"code.lambda_steps must be an integer >= 0 (0: the whole run), got {self.lambda_steps!r}")
        if problems:
            raise ValueError("; ".join(problems))


class CoDeDrafterJob(VARJob):
    """VAR job whose loss only covers the drafting scales; start it from the pre-trained drafter (init_from)."""
    export_name = "var_drafter"

    def __init__(self, cfg, var_config, dataset, device, main_process, code: CoDeTrainConfig, sample_images=None,
                 val_dataset=None):
        check_draft_scales(var_config.patch_nums, code.draft_scales, 1)  # before the token cache is built
        super().__init__(cfg, var_config, dataset, device, main_process, sample_images, val_dataset)
        self.code = code

    def loss(self, batch, step: int):
        flat_BL, labels_B = batch
        logits_BLV = self.teacher_forced(flat_BL, labels_B)
        loss = drafter_loss(logits_BLV, flat_BL, self.patch_nums, self.code.draft_scales, self.cfg.train.label_smoothing)
        return loss, {"loss": loss.detach()}


class CoDeRefinerJob(VARJob):
    """Distillation of the refiner (init_from: the pre-trained small VAR) from a frozen teacher.

    Condition dropout is drawn here, once, so student and teacher see the same (possibly null) labels;
    the student is therefore built with cond_drop_rate 0 and the configured rate is applied by the job.
    """
    export_name = "var_refiner"

    def __init__(self, cfg, var_config, dataset, device, main_process, code: CoDeTrainConfig, sample_images=None,
                 val_dataset=None):
        check_draft_scales(var_config.patch_nums, code.draft_scales, 0)  # before the token cache is built
        if not code.teacher:
            raise ValueError("the CoDe refiner job needs code.teacher = path of the larger pre-trained VAR")
        if not is_hub_uri(code.teacher) and not Path(code.teacher).is_file():
            raise FileNotFoundError(f"code.teacher = {code.teacher} does not exist; give the larger pre-trained VAR")
        self.cond_drop_rate = var_config.cond_drop_rate
        super().__init__(cfg, dataclasses.replace(var_config, cond_drop_rate=0.0), dataset, device, main_process,
                         sample_images, val_dataset)
        # loaded after the student, as the shipped refiners were trained (its random init draws from the seed)
        self.teacher = load_any(code.teacher, "var", device=device, patch_nums=self.patch_nums).eval().requires_grad_(False)
        if self.teacher.config.vocab_size != self.model.config.vocab_size or self.teacher.num_classes != self.model.num_classes:
            raise ValueError(f"teacher {code.teacher} (vocab {self.teacher.config.vocab_size}, {self.teacher.num_classes} "
                             f"classes) does not match the student (vocab {self.model.config.vocab_size}, "
                             f"{self.model.num_classes} classes)")
        self.code = code

    def lam(self, step: int) -> float:
        return kd_lambda(step, self.code.lambda_steps or self.cfg.train.steps)

    def loss(self, batch, step: int):
        flat_BL, labels_B = batch
        idx_per_scale = list(flat_BL.split([p * p for p in self.patch_nums], dim=1))
        if self.model.training and self.cond_drop_rate > 0:
            drop = torch.rand(labels_B.shape[0], device=labels_B.device) < self.cond_drop_rate
            labels_B = torch.where(drop, self.teacher.num_classes, labels_B)
        with torch.no_grad():
            x_tf = self.vae.teacher_forcing_input(idx_per_scale)
            teacher_BLV = self.teacher(labels_B, x_tf)
        lam = self.lam(step)
        loss = distillation_loss(self.model(labels_B, x_tf), teacher_BLV, self.patch_nums, self.code.draft_scales,
                                 lam, self.code.kd_temperature)
        return loss, {"loss": loss.detach(), "kd_lambda": torch.tensor(lam)}


JOBS = {"drafter": CoDeDrafterJob, "refiner": CoDeRefinerJob}

"""Optimiser pieces of the VAR recipe: weight-decay groups, lr/wd schedules, EMA weights."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from training.config import OptimConfig

# Parameters whose names contain any of these are never decayed (positional/level tables, gates, scales).
NO_DECAY_NAME_PARTS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                       "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


def param_groups(model: nn.Module, lr_ratio: float = 1.0) -> list[dict]:
    """Two AdamW groups: decayed weights, and everything 1-D / bias / in NO_DECAY_NAME_PARTS (wd 0).

    `wd_scale` and `lr_ratio` ride along in the group dicts so that they survive `accelerator.prepare`
    and optimizer state_dict round trips (attributes set on the optimizer object would not)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith("bias") or any(part in name for part in NO_DECAY_NAME_PARTS)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "wd_scale": 1.0, "lr_ratio": lr_ratio},
            {"params": no_decay, "wd_scale": 0.0, "lr_ratio": lr_ratio}]


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up from warmup_start_ratio*peak, then 'lin0': flat for 5% of the rest, linear decay
    to final_lr_ratio*peak at the last step."""
    peak = cfg.peak_lr()
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return peak * (cfg.warmup_start_ratio + (1 - cfg.warmup_start_ratio) * step / warmup)
    progress = (step - warmup) / max(total_steps - 1 - warmup, 1)
    if progress < 0.05:
        return peak
    return peak * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * (1 - progress) / 0.95)


def wd_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Cosine from weight_decay at step 0 to weight_decay_end at the last step."""
    t = step / max(total_steps - 1, 1)
    return cfg.weight_decay_end + 0.5 * (cfg.weight_decay - cfg.weight_decay_end) * (1 + math.cos(math.pi * t))


def build_adamw(model: nn.Module, cfg: OptimConfig, lr_ratio: float = 1.0, decay_groups: bool = True) -> torch.optim.AdamW:
    """AdamW as in the recipe (eps 1e-8, fused kernel on CUDA). Without `decay_groups` every parameter
    shares one group (used for the discriminator, which trains without weight decay)."""
    groups = param_groups(model, lr_ratio) if decay_groups else [
        {"params": [p for p in model.parameters() if p.requires_grad], "wd_scale": 0.0, "lr_ratio": lr_ratio}]
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.peak_lr() * lr_ratio, betas=cfg.betas, eps=1e-8,
                             weight_decay=cfg.weight_decay, fused=on_cuda or None)


def set_schedule(optimizer: torch.optim.Optimizer, step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Set this step's lr and weight decay on every group; returns the lr of the first group."""
    lr, wd = lr_at(step, total_steps, cfg), wd_at(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
        group["weight_decay"] = wd * group.get("wd_scale", 1.0)
    return optimizer.param_groups[0]["lr"]


def ema_decay_at(cfg: OptimConfig, step: int) -> float:
    """The EMA decay after optimizer step `step` (1-based). With optim.ema_warmup, min(decay, (1 + step) /
    (10 + step)) (diffusers' EMAModel warm-up): early averages forget the random initialisation quickly, and a
    short run's EMA no longer keeps decay^steps of it (0.998^800 = 20 %)."""
    if not cfg.ema_warmup:
        return cfg.ema_decay
    return min(cfg.ema_decay, (1 + step) / (10 + step))


class EMA:
    """Exponential moving average of a model's parameters and buffers (kept in fp32 on the model's device)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        weight = 1 - (self.decay if decay is None else decay)
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().float(), weight)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

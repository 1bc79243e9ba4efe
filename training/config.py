"""Training configuration: dataclasses read from the TOML tables [data], [optim], [train] (+ [loss])."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers.config import VQVAEConfig
from var.config import from_dict, load_toml, var_config, VARConfig


@dataclass
class DataConfig:
    kind: str = "fashion_mnist"  # fashion_mnist | image_folder | procedural
    root: str = "/usr/share/datasets/fashion-mnist"
    image_size: int = 32
    split: str = "train"
    skip_corrupt: bool = False  # skip unreadable images with a counted warning instead of failing
    num_samples: int = 2048  # procedural only
    num_classes: int = 10  # procedural only

    def __post_init__(self) -> None:
        if self.kind not in ("fashion_mnist", "image_folder", "procedural"):
            raise ValueError(f"data.kind must be fashion_mnist, image_folder or procedural, got {self.kind!r}")
        if self.image_size < 8:
            raise ValueError(f"data.image_size must be >= 8, got {self.image_size}")


@dataclass
class OptimConfig:
    """AdamW with the VAR recipe: peak lr = base_lr * global_batch / 256, linear warm-up from
    warmup_start_ratio * peak, flat for 5% then linear decay to final_lr_ratio * peak; weight decay
    cosine from weight_decay to weight_decay_end; no decay on biases, norms, positional/level tables."""
    base_lr: float = 1e-4
    batch_size: int = 64  # global batch (over processes and accumulation steps)
    grad_accum: int = 1
    betas: tuple[float, ...] = (0.9, 0.95)
    weight_decay: float = 0.05
    weight_decay_end: float = 0.05
    warmup_steps: int = 100
    warmup_start_ratio: float = 0.005
    final_lr_ratio: float = 0.1
    grad_clip: float = 2.0  # global L2 norm; <= 0 disables
    ema_decay: float = 0.0  # 0 disables EMA weights

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"optim.batch_size and optim.grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"optim.batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")

    def peak_lr(self) -> float:
        return self.base_lr * self.batch_size / 256


@dataclass
class RunConfig:
    steps: int = 1000
    seed: int = 0
    out_dir: str = "runs/default"
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, no on CPU) | no | bf16 | fp16
    log_every: int = 10
    sample_every: int = 500  # sample grid PNGs
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    label_smoothing: float = 0.0  # VAR only
    tokenizer: str = ""  # VAR only: path of the frozen tokenizer (ours .safetensors or the official .pth)
    init_from: str = ""  # optional weights to start from (fine-tuning)
    cache_tokens: bool = True  # VAR only: tokenise the dataset once (exact when there is no augmentation)
    token_cache: str = ""  # VAR only: where that cache lives (default: <out_dir>/token_cache.pt); runs may share one
    sample_cfg: float = 1.5  # VAR only: guidance of the periodic sample grids
    samples_per_class: int = 8  # VAR only: one grid row per class (at most 10 classes)
    num_threads: int = 0  # CPU threads for torch (0: torch's default); 1-2 on a shared machine

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        for name in ("log_every", "sample_every", "ckpt_every", "keep_checkpoints", "samples_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class TokenizerLossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    vq_weight: float = 1.0
    gan_weight: float = 0.0  # 0 disables the patch-GAN discriminator
    gan_start_step: int = 2000
    disc_lr_ratio: float = 1.0
    perceptual_weight: float = 0.0  # needs perceptual_weights (local VGG16 state dict); nothing is downloaded
    perceptual_weights: str = ""
    dead_code_every: int = 200  # re-seed never-used codes from encoder outputs; 0 disables

    def __post_init__(self) -> None:
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ValueError("loss.perceptual_weight > 0 needs loss.perceptual_weights = path of a local torchvision "
                             "vgg16 state dict (nothing is downloaded); or set loss.perceptual_weight = 0")
        if min(self.l1_weight, self.l2_weight, self.vq_weight, self.gan_weight, self.perceptual_weight) < 0:
            raise ValueError("loss weights must be >= 0")


@dataclass
class TrainConfig:
    job: str = "var"  # tokenizer | var
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    code: dict = field(default_factory=dict)  # [code] of CoDe jobs, validated as samplers.code.training.CoDeTrainConfig


def model_configs_from_toml(path: str | Path):
    """Read the `[tokenizer]` and `[var]` tables of a config file into (VQVAEConfig, VARConfig | None).

    `[var]` may name a registered size with `size = "var_d16"`; other keys override it. The VAR's
    vocab_size, z_channels and patch_nums are taken from the tokenizer unless given.
    """
    raw = load_toml(path)
    if "tokenizer" not in raw:
        raise KeyError(f"{path}: missing [tokenizer] table")
    vae_cfg = from_dict(VQVAEConfig, raw["tokenizer"], f"{path}[tokenizer]")
    if "var" not in raw:
        return vae_cfg, None
    var_table = dict(raw["var"])
    size = var_table.pop("size", None)
    inherited = dict(vocab_size=vae_cfg.vocab_size, z_channels=vae_cfg.z_channels, patch_nums=vae_cfg.patch_nums)
    base = dataclasses.asdict(var_config(size)) if size else {}
    merged = {**base, **inherited, **var_table}
    merged["patch_nums"] = list(merged["patch_nums"])
    return vae_cfg, from_dict(VARConfig, merged, f"{path}[var]")

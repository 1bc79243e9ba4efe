"""Training configuration: dataclasses read from the TOML tables [data], [optim], [train] (+ [loss])."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers.config import VQVAEConfig
from var.config import from_dict, load_toml, var_config, VARConfig


# numpy seeds must be < 2**32 and each process seeds with seed * 1000 + rank
MAX_SEED = 2**32 // 1000 - 1000


def _number(key: str, value, *, integer: bool = False, gt=None, ge=None, lt=None, le=None):
    """`value` as a finite int / float satisfying the bounds, else a one-line error naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    high = f"{lt})" if lt is not None else f"{le}]" if le is not None else None
    ok = ((gt is None or value > gt) and (ge is None or value >= ge) and (lt is None or value < lt)
          and (le is None or value <= le))
    if not ok:
        if low and high:
            rule = f"in {low}, {high}"
        elif low:
            rule = f"{'>=' if ge is not None else '>'} {low[1:]}"
        else:
            rule = f"{'<' if lt is not None else '<='} {high[:-1]}"
        raise ValueError(f"{key} must be {rule}, got {value!r}")
    return value


def _text(key: str, value, choices: tuple[str, ...] | None = None, nonempty: bool = False) -> None:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string, got {value!r}")
    if choices is not None and value not in choices:
        raise ValueError(f"{key} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
    if nonempty and not value.strip():
        raise ValueError(f"{key} must not be empty")


def _flag(key: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be true or false, got {value!r}")


@dataclass
class DataConfig:
    kind: str = "fashion_mnist"  # fashion_mnist | image_folder | procedural
    root: str = "/usr/share/datasets/fashion-mnist"
    image_size: int = 32
    split: str = "train"  # fashion_mnist: train | test
    skip_corrupt: bool = False  # skip unreadable images with a counted warning instead of failing
    skip_empty_classes: bool = False  # leave out class folders without images (counted warning) instead of failing
    num_samples: int = 2048  # procedural only
    num_classes: int = 10  # procedural only
    # The VAR train transform (training/transforms.py): resize the shorter side to round(mid_reso * image_size),
    # then a random crop of image_size (centre crop when random_crop is false), optional horizontal flip.
    # The public recipe: mid_reso = 1.125, random_crop = true, hflip = false. 1.0 / false / false: no augmentation.
    mid_reso: float = 1.0
    random_crop: bool = False
    hflip: bool = False
    # images no larger than image_size at mid_reso = 1: centre-padded with the background (true: Fashion-MNIST's
    # 28 px digits unresampled in 32 px), or upsampled with Lanczos like larger ones are downsampled (false)
    pad_small: bool = True
    # DataLoader: worker processes decode and augment; batches are the same for any num_workers (per-sample
    # randomness is seeded by (seed, epoch, index), not by the worker)
    num_workers: int = 0
    persistent_workers: bool = True  # with num_workers > 0: keep the workers alive between validation passes
    prefetch_factor: int = 2  # with num_workers > 0: batches each worker prepares ahead
    # held-out validation split (train.val_every): a folder with the same class names (image_folder), or
    # else the last val_fraction of a seeded permutation of the training items (left out of training)
    val_root: str = ""
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        _text("data.kind", self.kind, ("fashion_mnist", "image_folder", "procedural"))
        _text("data.root", self.root, nonempty=self.kind != "procedural")
        _number("data.image_size", self.image_size, integer=True, ge=8)
        _text("data.split", self.split, ("train", "test") if self.kind == "fashion_mnist" else None)
        _flag("data.skip_corrupt", self.skip_corrupt)
        _flag("data.skip_empty_classes", self.skip_empty_classes)
        _number("data.num_samples", self.num_samples, integer=True, ge=1)
        _number("data.num_classes", self.num_classes, integer=True, ge=1)
        _number("data.mid_reso", self.mid_reso, ge=1, le=4)
        _flag("data.random_crop", self.random_crop)
        _flag("data.hflip", self.hflip)
        _flag("data.pad_small", self.pad_small)
        _number("data.num_workers", self.num_workers, integer=True, ge=0)
        _flag("data.persistent_workers", self.persistent_workers)
        _number("data.prefetch_factor", self.prefetch_factor, integer=True, ge=1)
        _text("data.val_root", self.val_root)
        if self.val_root and self.kind != "image_folder":
            raise ValueError(f"data.val_root is for data.kind = 'image_folder'; for {self.kind!r} hold out a "
                             f"part of the training set with data.val_fraction")
        _number("data.val_fraction", self.val_fraction, ge=0, lt=1)
        if self.val_root and self.val_fraction:
            raise ValueError("set data.val_root or data.val_fraction, not both")

    @property
    def augmented(self) -> bool:
        """True when the train transform is random (tokens then cannot be cached): a random crop is random even
        at mid_reso = 1, along the longer side of a non-square image (training/transforms.py is_random)."""
        return self.random_crop or self.hflip

    @property
    def has_val(self) -> bool:
        return bool(self.val_root) or self.val_fraction > 0


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
    ema_warmup: bool = False  # decay min(ema_decay, (1 + step) / (10 + step)) (diffusers); for short runs

    def __post_init__(self) -> None:
        _number("optim.base_lr", self.base_lr, gt=0)
        _number("optim.batch_size", self.batch_size, integer=True, ge=1)
        _number("optim.grad_accum", self.grad_accum, integer=True, ge=1)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"optim.batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers [beta1, beta2], got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            _number(f"optim.betas[{i}]", beta, ge=0, lt=1)
        self.betas = tuple(float(b) for b in self.betas)
        _number("optim.weight_decay", self.weight_decay, ge=0)
        _number("optim.weight_decay_end", self.weight_decay_end, ge=0)
        _number("optim.warmup_steps", self.warmup_steps, integer=True, ge=0)
        _number("optim.warmup_start_ratio", self.warmup_start_ratio, ge=0, le=1)
        _number("optim.final_lr_ratio", self.final_lr_ratio, ge=0, le=1)
        _number("optim.grad_clip", self.grad_clip)  # any finite value: <= 0 disables clipping
        _number("optim.ema_decay", self.ema_decay, ge=0, lt=1)

    def peak_lr(self) -> float:
        return self.base_lr * self.batch_size / 256


@dataclass
class RunConfig:
    steps: int = 1000
    seed: int = 0
    out_dir: str = "runs/default"
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, no on CPU) | no | bf16 (CUDA or CPU) | fp16 (CUDA)
    log_every: int = 10
    sample_every: int = 500  # sample grid PNGs
    ckpt_every: int = 500
    keep_checkpoints: int = 2  # >= 2 keeps an older checkpoint for --resume to fall back on if the newest is damaged
    label_smoothing: float = 0.0  # VAR only
    tokenizer: str = ""  # VAR only: path of the frozen tokenizer (ours .safetensors or the official .pth)
    init_from: str = ""  # optional weights to start from (fine-tuning)
    # VAR only: "cache" tokenises the (unaugmented) training set once, each process its own shard; "stream"
    # encodes every batch on the accelerator inside the step (needed with augmentation); "auto": cache for
    # unaugmented sets of at most 200k images, else stream
    tokens: str = "auto"
    # VAR only: where that cache lives (safetensors shards plus a .json manifest; default
    # <out_dir>/token_cache.safetensors); runs may share one
    token_cache: str = ""
    val_every: int = 0  # VAR / tokenizer: validation loss (and per-scale accuracy) every N steps; 0 disables
    val_batches: int = 0  # global batches (optim.batch_size items) of the held-out split per validation pass; 0: all
    # accelerate trackers besides metrics.jsonl (always written): "" (none), "tensorboard", "wandb", "all", or
    # a comma list; their files go to <out_dir>/trackers
    log_with: str = ""
    tracker_project: str = "var"
    # train.init_from with a different class count (fine-tuning on new classes): "error", "reinit" (a fresh
    # class embedding), or "resize" (keep the first min(K_old, K_new) rows and the null-class row, new rows fresh)
    init_class_embedding: str = "error"
    sample_cfg: float = 1.5  # VAR only: guidance of the periodic sample grids
    samples_per_class: int = 8  # VAR only: one grid row per class (at most 10 classes)
    num_threads: int = 0  # CPU threads for torch (0: torch's default); 1-2 on a shared machine
    # which weights the exported file and the sample grids hold when EMA is on: "ema" or "model" (the trained
    # weights); may change on --resume (a finished run resumed re-exports)
    export_weights: str = "ema"

    def __post_init__(self) -> None:
        _number("train.steps", self.steps, integer=True, ge=1)
        _number("train.seed", self.seed, integer=True, ge=0, le=MAX_SEED)
        _text("train.out_dir", self.out_dir, nonempty=True)
        _text("train.mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        _text("train.export_weights", self.export_weights, ("ema", "model"))
        for name in ("log_every", "sample_every", "ckpt_every", "keep_checkpoints", "samples_per_class"):
            _number(f"train.{name}", getattr(self, name), integer=True, ge=1)
        _number("train.label_smoothing", self.label_smoothing, ge=0, lt=1)
        for name in ("tokenizer", "init_from", "token_cache"):
            _text(f"train.{name}", getattr(self, name))
        _text("train.tokens", self.tokens, ("auto", "cache", "stream"))
        _number("train.val_every", self.val_every, integer=True, ge=0)
        _number("train.val_batches", self.val_batches, integer=True, ge=0)
        _text("train.log_with", self.log_with)
        _text("train.tracker_project", self.tracker_project, nonempty=True)
        _text("train.init_class_embedding", self.init_class_embedding, ("error", "reinit", "resize"))
        _number("train.sample_cfg", self.sample_cfg, ge=0)
        _number("train.num_threads", self.num_threads, integer=True, ge=0)


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
        for name in ("l1_weight", "l2_weight", "vq_weight", "gan_weight", "perceptual_weight"):
            _number(f"loss.{name}", getattr(self, name), ge=0)
        _number("loss.gan_start_step", self.gan_start_step, integer=True, ge=0)
        _number("loss.disc_lr_ratio", self.disc_lr_ratio, gt=0)
        _text("loss.perceptual_weights", self.perceptual_weights)
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ValueError("loss.perceptual_weight > 0 needs loss.perceptual_weights = path of a local torchvision "
                             "vgg16 state dict (nothing is downloaded); or set loss.perceptual_weight = 0")
        _number("loss.dead_code_every", self.dead_code_every, integer=True, ge=0)


@dataclass
class TrainConfig:
    job: str = "var"  # tokenizer | var | dd | code_drafter | code_refiner
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    code: dict = field(default_factory=dict)  # [code] of CoDe jobs, validated as samplers.code.training.CoDeTrainConfig

    def __post_init__(self) -> None:
        _text("job", self.job, nonempty=True)
        if not isinstance(self.code, dict):
            raise TypeError(f"[code] must be a table, got {self.code!r}")
        if self.job == "tokenizer" and self.train.mixed_precision == "fp16" and self.loss.gan_weight > 0:
            # accelerate shares one GradScaler between the generator's and the discriminator's optimizer, and
            # each optimizer step updates it: the scale would be updated twice per training step
            raise ValueError("train.mixed_precision = 'fp16' with a GAN (loss.gan_weight > 0) is not supported: "
                             "use 'bf16' (the CUDA default), or train without the discriminator")
        # the dd job reads its own data set ([dd]); for the others a procedural set smaller than one global
        # batch could never fill a step (the Trainer checks the other kinds once they are read)
        if self.job != "dd" and self.data.kind == "procedural" and self.data.num_samples < self.optim.batch_size:
            raise ValueError(f"data.num_samples must be >= optim.batch_size ({self.optim.batch_size}: one global "
                             f"batch), got {self.data.num_samples}")


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

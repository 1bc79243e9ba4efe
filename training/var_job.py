"""VAR training job: teacher forcing on tokens of a frozen tokenizer, uniform per-token cross-entropy.

Two token modes (train.tokens):
* "cache": the tokens of every training image are computed once into a sharded cache (training/token_cache.py),
  each process encoding its own block; the DataLoader then serves token rows. Exact only without
  augmentation (a random crop is another image every epoch), so an augmented data config refuses it.
* "stream": the DataLoader serves transformed images (workers decode and augment) and `prepare_batch`
  encodes each batch on the accelerator inside the step with the frozen tokenizer.
* "auto": cache for unaugmented sets of at most AUTO_CACHE_MAX_ITEMS images, else stream.
Validation images are always streamed (eval transform) and encoded in `prepare_batch`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from training.atomic import file_sha256
from training.checkpoint import check_models_compatible, load_any, load_init_from, save_model
from training.config import DataConfig, TrainConfig
from training.images import grid_image
from training.loader import ImageSamples, collate_images
from training.token_cache import build_token_cache, dataset_fingerprint
from training.job import TrainJob
from training.transforms import VARTransform
from var.config import VARConfig
from var.model import VAR

AUTO_CACHE_MAX_ITEMS = 200_000  # 200k x 680 tokens x 4 B = 0.5 GB in RAM at 256 px: beyond that, stream


def resolve_token_mode(data: DataConfig, tokens: str, num_items: int) -> str:
    """"cache" or "stream" for train.tokens = auto / cache / stream (see the module docstring)."""
    if tokens == "cache" and data.augmented:
        raise ValueError("train.tokens = 'cache' with an augmented data config (data.random_crop or data.hflip): "
                         "tokens of random crops cannot be cached; set train.tokens = 'stream' or 'auto'")
    if tokens == "auto":
        return "cache" if not data.augmented and num_items <= AUTO_CACHE_MAX_ITEMS else "stream"
    return tokens


class TokenRows(Dataset):
    """Cached tokens as a loader dataset: key (index, epoch) -> (tokens_L int32, label); the epoch does not
    matter (cached tokens are unaugmented)."""

    def __init__(self, tokens_NL: torch.Tensor, labels_N: torch.Tensor):
        self.tokens_NL, self.labels_N = tokens_NL, labels_N

    def __len__(self) -> int:
        return len(self.labels_N)

    def __getitem__(self, key: tuple[int, int]):
        index, _epoch = key
        return self.tokens_NL[index], int(self.labels_N[index])


class VARJob(TrainJob):
    export_name = "var"

    def __init__(self, cfg: TrainConfig, var_config: VARConfig, dataset, device: torch.device, main_process: bool,
                 sample_images: Callable | None = None, val_dataset=None):
        # sample_images(model, vae, labels, cfg) -> images in [0, 1]: given by train.py (a sampler), so the
        # training layer never imports the sampling layer above it; None disables the periodic grids.
        self.sample_images = sample_images
        if not cfg.train.tokenizer:
            raise ValueError("VAR training needs train.tokenizer = path of the frozen tokenizer (.safetensors or official .pth)")
        self.cfg, self.dataset, self.val_split = cfg, dataset, val_dataset
        # patch_nums: an official tokenizer file is resolution-agnostic and takes the VAR's scales (d36 at 512 px)
        self.vae = load_any(cfg.train.tokenizer, "vqvae", device=device, patch_nums=var_config.patch_nums)
        self.vae.eval().requires_grad_(False)
        self.model = VAR(var_config)
        check_models_compatible(self.model, self.vae, "the [var] config")
        if cfg.train.init_from:
            load_init_from(self.model, cfg.train.init_from, "var", class_mode=cfg.train.init_class_embedding)
        num_classes = len(getattr(dataset, "classes", [])) or var_config.num_classes
        if num_classes > var_config.num_classes:
            raise ValueError(f"the dataset has {num_classes} classes but var.num_classes = {var_config.num_classes}; "
                             f"remove num_classes from [var] (it defaults to the dataset's) or raise it")
        self.model.to(device)
        self.device = device
        self.patch_nums = self.vae.patch_nums
        self.tokens_per_item = sum(p * p for p in self.patch_nums)  # the trainer's tokens/s
        self.transform = VARTransform.from_config(cfg.data)
        self.token_mode = resolve_token_mode(cfg.data, cfg.train.tokens, len(dataset))
        self.tokens = self._cached_tokens(main_process) if self.token_mode == "cache" else None

    # ---- data: the loader contract (training/trainer.py) --------------------------------------------
    def num_items(self) -> int:
        return len(self.dataset)

    def loader_dataset(self) -> Dataset:
        if self.tokens is not None:
            return TokenRows(*self.tokens)
        return self._samples(self.dataset, train=True)

    def loader_num_workers(self) -> int:
        """DataLoader workers worth starting: none for cached token rows (an index into RAM), data.num_workers
        for streamed images (decoding and augmentation)."""
        return 0 if self.tokens is not None else self.cfg.data.num_workers

    def val_dataset(self) -> Dataset | None:
        if self.val_split is None:
            return None
        return self._samples(self.val_split, train=False)

    def _samples(self, dataset, train: bool) -> ImageSamples:
        return ImageSamples(dataset, self.transform, self.cfg.train.seed, train=train, skip_corrupt=self.cfg.data.skip_corrupt)

    def collate(self, samples: list):
        """Image samples (img, label, bad) -> collate_images' dict; token rows -> (tokens_BL int32, labels_B)."""
        if len(samples[0]) == 3:
            return collate_images(samples)
        tokens, labels = zip(*samples)
        return torch.stack(tokens), torch.tensor(labels, dtype=torch.int64)

    def prepare_batch(self, batch, device: torch.device):
        """-> (flat_BL long, labels_B) on `device`; images are encoded here, without gradients."""
        # non_blocking: the trainer pins loader batches on CUDA; on CPU it is a plain copy
        if isinstance(batch, dict):  # its "skipped" count is the trainer's to log
            images = batch["images"].to(device, non_blocking=True)
            return self.encode(images), batch["labels"].to(device, non_blocking=True)
        tokens_BL, labels_B = batch
        return tokens_BL.to(device, non_blocking=True).long(), labels_B.to(device, non_blocking=True)

    def fetch(self, indices: list[int], device: torch.device):
        """The batch of dataset `indices` (epoch 0), for callers without a DataLoader."""
        if self.tokens is not None:  # the pre-loader path, bitwise: shipped runs stay reproducible
            return self.tokens[0][indices].to(device).long(), self.tokens[1][indices].to(device)
        samples = self.loader_dataset()
        return self.prepare_batch(self.collate([samples[(i, 0)] for i in indices]), device)

    @torch.no_grad()
    def encode(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """(B, L) long tokens of images in [-1, 1] (fp32 even inside an autocast region, as `img_to_tokens`)."""
        return torch.cat(self.vae.img_to_tokens(img_B3HW), dim=1)

    # ---- losses ---------------------------------------------------------------------------------------
    def teacher_forced(self, flat_BL: torch.Tensor, labels_B: torch.Tensor, model=None) -> torch.Tensor:
        """(B, L, V) logits of `model` (the trained one by default) on the teacher-forced input of flat_BL."""
        idx_per_scale = list(flat_BL.split([p * p for p in self.patch_nums], dim=1))
        with torch.no_grad():
            x_tf = self.vae.teacher_forcing_input(idx_per_scale)
        return (model or self.model)(labels_B, x_tf)

    def scale_accuracy(self, logits_BLV: torch.Tensor, flat_BL: torch.Tensor) -> dict:
        correct = (logits_BLV.detach().argmax(-1) == flat_BL).float()
        return {f"acc_s{si}": part.mean() for si, part in enumerate(correct.split([p * p for p in self.patch_nums], dim=1))}

    def loss(self, batch, step: int):
        """Uniform per-token cross-entropy over all scales (spec 6.1: a plain mean, large scales dominate);
        condition dropout happens inside the model's training forward."""
        flat_BL, labels_B = batch
        logits_BLV = self.teacher_forced(flat_BL, labels_B)
        loss = F.cross_entropy(logits_BLV.flatten(0, 1), flat_BL.flatten(), label_smoothing=self.cfg.train.label_smoothing)
        return loss, {"loss": loss.detach(), **self.scale_accuracy(logits_BLV, flat_BL)}

    @torch.no_grad()
    def val_metrics(self, batch) -> dict:
        """Held-out cross-entropy (no label smoothing: the plain likelihood) and per-scale accuracy; the
        trainer puts the model in eval mode (no condition dropout) and logs them as val_*."""
        flat_BL, labels_B = batch
        logits_BLV = self.teacher_forced(flat_BL, labels_B)
        loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), flat_BL.flatten())
        return {"loss": float(loss), **{k: float(v) for k, v in self.scale_accuracy(logits_BLV, flat_BL).items()}}

    def after_step(self, extra_optimizers, step, micro, acc) -> dict:
        return {}

    @torch.no_grad()
    def sample_grid(self, model: VAR):
        """One row per class (first 10 classes), a fixed seed: comparable over steps."""
        if self.sample_images is None:
            return None
        was_training = model.training
        model.eval()
        per_class = self.cfg.train.samples_per_class
        labels = torch.arange(min(model.num_classes, 10), device=self.vae.post_quant_conv.weight.device)
        images = self.sample_images(model, self.vae, labels.repeat_interleave(per_class), self.cfg.train.sample_cfg)
        model.train(was_training)
        return grid_image(images, nrow=per_class)

    def export(self, path: Path, model: VAR) -> None:
        extra = {"classes": list(getattr(self.dataset, "classes", [])), "tokenizer": str(self.cfg.train.tokenizer),
                 "tokenizer_sha256": file_sha256(self.cfg.train.tokenizer)}
        save_model(path, model, extra=extra)

    # ---- token cache ----------------------------------------------------------------------------------
    def cache_identity(self) -> tuple[dict, dict | None]:
        """(identity of the sharded cache, identity of an old single-file cache or None when such a cache
        cannot hold these images: it predates the VAR transform, so only its unaugmented default matches)."""
        d, t = self.cfg.data, self.transform
        num_tokens = self.tokens_per_item
        tokenizer_sha256 = file_sha256(self.cfg.train.tokenizer)
        settings = {"kind": d.kind, "root": d.root, "split": d.split, "image_size": d.image_size,
                    "num_samples": d.num_samples, "num_classes": d.num_classes, "seed": self.cfg.train.seed}
        identity = {"tokenizer_sha256": tokenizer_sha256, "dataset": dataset_fingerprint(self.dataset, settings),
                    **t.describe(), "num_tokens": num_tokens}
        legacy = None
        if t.legacy and not t.hflip:
            legacy = {"tokenizer_sha256": tokenizer_sha256, "num_items": len(self.dataset), **settings,
                      "num_tokens": num_tokens}
        return identity, legacy

    def _cached_tokens(self, main_process: bool):
        """Tokens of every training image (epoch 0 of the unaugmented train transform, the images the stream
        mode encodes), from the cache or built now, each process encoding its own block."""
        from accelerate import PartialState

        state = PartialState()
        cache = Path(self.cfg.train.token_cache or Path(self.cfg.train.out_dir) / "token_cache.safetensors")
        samples = self._samples(self.dataset, train=True)

        def encode_fn(indices: list[int]):
            batch = collate_images([samples[(i, 0)] for i in indices])
            return self.encode(batch["images"].to(self.device)).to(torch.int32).cpu(), batch["labels"]

        identity, legacy = self.cache_identity()
        return build_token_cache(cache, identity, len(self.dataset), encode_fn, state.process_index,
                                 state.num_processes, state.wait_for_everyone, main_process, legacy_identity=legacy)

"""VAR training job: teacher forcing on tokens of a frozen tokenizer, uniform per-token cross-entropy."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from training.atomic import atomic_write, atomic_write_json, file_sha256
from training.checkpoint import check_models_compatible, load_any, load_state_dict_checked, save_model
from var.config import VARConfig
from training.images import grid_image
from var.model import VAR
from training.config import TrainConfig
from training.trainer import TrainJob


class VARJob(TrainJob):
    export_name = "var"

    def __init__(self, cfg: TrainConfig, var_config: VARConfig, dataset, device: torch.device, main_process: bool,
                 sample_images: Callable | None = None):
        # sample_images(model, vae, labels, cfg) -> images in [0, 1]: given by train.py (a sampler), so the
        # training layer never imports the sampling layer above it; None disables the periodic grids.
        self.sample_images = sample_images
        if not cfg.train.tokenizer:
            raise ValueError("VAR training needs train.tokenizer = path of the frozen tokenizer (.safetensors or official .pth)")
        self.cfg, self.dataset = cfg, dataset
        self.vae = load_any(cfg.train.tokenizer, "vqvae", device=device).eval().requires_grad_(False)
        self.model = VAR(var_config)
        check_models_compatible(self.model, self.vae, "the [var] config")
        if cfg.train.init_from:
            load_state_dict_checked(self.model, load_any(cfg.train.init_from, "var").state_dict(), cfg.train.init_from)
        num_classes = len(getattr(dataset, "classes", [])) or var_config.num_classes
        if num_classes > var_config.num_classes:
            raise ValueError(f"the dataset has {num_classes} classes but var.num_classes = {var_config.num_classes}; "
                             f"remove num_classes from [var] (it defaults to the dataset's) or raise it")
        self.model.to(device)
        self.patch_nums = self.vae.patch_nums
        self.tokens = self._tokenise_dataset(device, main_process) if cfg.train.tokens != "stream" else None

    # ---- job interface ----------------------------------------------------------------------------
    def num_items(self) -> int:
        return len(self.dataset)

    def fetch(self, indices: list[int], device: torch.device):
        if self.tokens is not None:
            flat, labels = self.tokens[0][indices].to(device).long(), self.tokens[1][indices].to(device)
        else:
            imgs, labels = zip(*(self.dataset[i] for i in indices))
            with torch.no_grad():
                flat = torch.cat(self.vae.img_to_tokens(torch.stack(imgs).to(device)), dim=1)
            labels = torch.tensor(labels, device=device)
        return flat, labels

    def loss(self, batch, step: int):
        """Uniform per-token cross-entropy over all scales (spec 6.1: a plain mean, large scales dominate);
        condition dropout happens inside the model's training forward."""
        flat_BL, labels_B = batch
        idx_per_scale = list(flat_BL.split([p * p for p in self.patch_nums], dim=1))
        with torch.no_grad():
            x_tf = self.vae.teacher_forcing_input(idx_per_scale)
        logits_BLV = self.model(labels_B, x_tf)
        loss = F.cross_entropy(logits_BLV.flatten(0, 1), flat_BL.flatten(), label_smoothing=self.cfg.train.label_smoothing)
        metrics = {"loss": loss.detach()}
        with torch.no_grad():
            correct = (logits_BLV.argmax(-1) == flat_BL).float()
            for si, part in enumerate(correct.split([p * p for p in self.patch_nums], dim=1)):
                metrics[f"acc_s{si}"] = part.mean()
        return loss, metrics

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

    # ---- token cache --------------------------------------------------------------------------------
    @torch.no_grad()
    def _tokenise_dataset(self, device, main_process: bool, batch_size: int = 256):
        """Tokens of every image, once (exact: the data pipeline has no random augmentation). Cached
        pickle-free (see TOKEN_CACHE_FORMAT); a corrupt or stale cache is rebuilt with a warning."""
        cache = Path(self.cfg.train.token_cache or Path(self.cfg.train.out_dir) / "token_cache.safetensors")
        d = self.cfg.data
        identity = {"tokenizer_sha256": file_sha256(self.cfg.train.tokenizer), "num_items": len(self.dataset),
                    "kind": d.kind, "root": d.root, "split": d.split, "image_size": d.image_size,
                    "num_samples": d.num_samples, "num_classes": d.num_classes, "seed": self.cfg.train.seed,
                    "num_tokens": sum(p * p for p in self.patch_nums)}
        cached, problem = read_token_cache(cache, identity)
        if cached is not None:
            return cached
        if problem is not None and main_process:
            warnings.warn(f"token cache {cache}: {problem}; rebuilding it", stacklevel=2)
        tokens, labels = [], []
        for start in tqdm(range(0, len(self.dataset), batch_size), desc="tokenise", disable=not main_process):
            imgs, labs = zip(*(self.dataset[i] for i in range(start, min(start + batch_size, len(self.dataset)))))
            tokens.append(torch.cat(self.vae.img_to_tokens(torch.stack(imgs).to(device)), dim=1).to(torch.int32).cpu())
            labels.append(torch.tensor(labs))
        result = torch.cat(tokens), torch.cat(labels)
        if main_process:
            write_token_cache(cache, identity, *result)
        return result


# Token cache format: `<cache>` is a safetensors file (tokens_NL int32, labels_N int64) and `<cache>.json` its
# manifest (written after it): the identity it was built for (tokenizer weights sha256, dataset settings and
# size, seed, tokens per image) and the data file's sha256.
TOKEN_CACHE_FORMAT = "var-toolkit-token-cache"


def token_cache_manifest(cache: Path) -> Path:
    return cache.with_name(cache.name + ".json")


def read_token_cache(cache: Path, identity: dict) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str | None]:
    """((tokens, labels), None) when `cache` is intact and built for `identity`, else (None, why not; None
    when there simply is no cache yet). Never unpickles: an old torch.save cache is just rebuilt."""
    if not cache.exists():
        return None, None
    manifest = token_cache_manifest(cache)
    try:
        doc = json.loads(manifest.read_text())
        if not isinstance(doc, dict) or doc.get("format") != TOKEN_CACHE_FORMAT:
            raise ValueError(f"not a {TOKEN_CACHE_FORMAT} manifest")
    except FileNotFoundError:
        return None, f"no manifest {manifest.name} beside it (an old-format or interrupted cache)"
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"its manifest {manifest.name} is unreadable ({err})"
    stale = [k for k in identity if doc.get(k) != identity[k]]
    if stale:
        return None, f"stale (built for other {', '.join(stale)})"
    if file_sha256(cache) != doc.get("sha256"):
        return None, f"corrupt (its sha256 does not match {manifest.name})"
    try:
        saved = load_file(cache)
        tokens, labels = saved["tokens_NL"], saved["labels_N"]
    except Exception as err:  # safetensors raises its own error type for malformed files
        return None, f"corrupt ({err})"
    n, num_tokens = identity["num_items"], identity["num_tokens"]
    if tokens.shape != (n, num_tokens) or tokens.dtype != torch.int32 or labels.shape != (n,):
        return None, f"corrupt (tokens {tuple(tokens.shape)} {tokens.dtype}, labels {tuple(labels.shape)})"
    return (tokens, labels), None


def write_token_cache(cache: Path, identity: dict, tokens_NL: torch.Tensor, labels_N: torch.Tensor) -> None:
    """Data first, manifest last: a kill in between leaves a cache whose manifest does not match (rebuilt)."""
    atomic_write(cache, lambda tmp: save_file({"tokens_NL": tokens_NL.contiguous(), "labels_N": labels_N.contiguous()}, tmp))
    atomic_write_json(token_cache_manifest(cache), {"format": TOKEN_CACHE_FORMAT, "version": 1, **identity,
                                                   "sha256": file_sha256(cache)})

"""The sampler interface shared by the default sampler and every accelerator, plus the name registry.

A sampler owns its models (a VAR and the tokenizer, or more for accelerators) and implements
`_generate`; `sample()` validates inputs, prepares labels/generator, times the run and decodes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from einops import rearrange

from samplers.logits_processing import (apply_temperature, cfg_strength, check_sampling_args, guide,
                                        gumbel_soft_codes, sample_from_logits, temperature_at,
                                        top_k_top_p_filter_)
from tokenizers import VQVAE
from training.checkpoint import check_models_compatible
from var import VAR, KVCache

_REGISTRY: dict[str, type["Sampler"]] = {}


def register_sampler(name: str) -> Callable[[type["Sampler"]], type["Sampler"]]:
    def wrap(cls: type["Sampler"]) -> type["Sampler"]:
        if name in _REGISTRY:
            raise KeyError(f"sampler name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def available_samplers() -> list[str]:
    return sorted(_REGISTRY)


def sampler_class(name: str) -> type["Sampler"]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown sampler {name!r}; available: {', '.join(available_samplers())}")
    return _REGISTRY[name]


def build_sampler(name: str, **kwargs) -> "Sampler":
    return sampler_class(name)(**kwargs)


@dataclass
class SamplerStats:
    """Counters taken while sampling (never estimated): one entry per model name where relevant."""
    forwards: dict[str, int] = field(default_factory=dict)  # transformer forward passes
    tokens_processed: dict[str, int] = field(default_factory=dict)  # rows x positions fed through the blocks
    kv_bytes_per_scale: list[int] = field(default_factory=list)  # KV bytes held after each scale
    kv_bytes_peak: int = 0
    wall_time_s: float = 0.0
    cuda_max_memory_allocated: int | None = None
    extra: dict = field(default_factory=dict)

    def count_forward(self, model_name: str, x_BLC: torch.Tensor) -> None:
        self.forwards[model_name] = self.forwards.get(model_name, 0) + 1
        self.tokens_processed[model_name] = self.tokens_processed.get(model_name, 0) + x_BLC.shape[0] * x_BLC.shape[1]

    def record_kv(self, *caches: KVCache) -> None:
        held = sum(c.nbytes() for c in caches)
        self.kv_bytes_per_scale.append(held)
        self.kv_bytes_peak = max(self.kv_bytes_peak, held)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class SampleOutput:
    images: torch.Tensor | None  # (B, 3, H, W) in [0, 1]; None when decoding was skipped
    tokens: list[torch.Tensor]  # per scale, (B, pn*pn) int64
    labels: torch.Tensor  # (B,)
    f_hat: torch.Tensor  # (B, Cvae, h, w) accumulated latent
    stats: SamplerStats
    # With sample(keep_logits=True): per scale, the raw (unguided) logits (2B, pn*pn, V) of the model that
    # produced the scale, conditional rows first. For checking, never needed to sample.
    raw_logits: list[torch.Tensor] | None = None


class Sampler(nn.Module):
    """Base class: subclasses implement `_generate(labels_B, generator, **args) -> (tokens, f_hat)`."""
    name: ClassVar[str] = ""
    # Extra checkpoints sample.py must load and pass as keyword args (e.g. ("refiner",) for CoDe).
    extra_models: ClassVar[tuple[str, ...]] = ()
    # Extra checkpoints the sampler can use when given (e.g. ("draft_model",) for Block-SJD's VAR drafts).
    optional_models: ClassVar[tuple[str, ...]] = ()
    # The sampler's own options and their types, parsed by sample.py from `--sampler-arg name=value`.
    options: ClassVar[dict[str, type]] = {}

    def __init__(self, var: VAR, vae: VQVAE):
        super().__init__()
        check_models_compatible(var, vae)
        self.var, self.vae = var, vae
        self._kept_logits: list[torch.Tensor] | None = None  # filled during sample(keep_logits=True)

    @property
    def device(self) -> torch.device:
        return self.var.class_emb.weight.device

    @property
    def num_scales(self) -> int:
        return self.var.num_scales

    def resolve_labels(self, labels, batch_size: int | None, generator: torch.Generator | None) -> torch.Tensor:
        num_classes = self.var.num_classes
        if labels is None:
            if batch_size is None or batch_size < 1:
                raise ValueError("give labels, or batch_size >= 1 to draw labels uniformly")
            uniform = torch.full((1, num_classes), 1.0 / num_classes, device=self.device)
            return torch.multinomial(uniform, batch_size, replacement=True, generator=generator).view(batch_size)
        if isinstance(labels, int):
            if batch_size is None:
                raise ValueError("an integer label needs batch_size")
            return torch.full((batch_size,), num_classes if labels < 0 else labels, device=self.device, dtype=torch.long)
        labels = torch.as_tensor(labels, device=self.device)
        if labels.ndim != 1 or labels.is_floating_point() or labels.numel() == 0:
            raise ValueError(f"labels must be a non-empty 1-D integer tensor, got shape {tuple(labels.shape)} dtype {labels.dtype}")
        if batch_size is not None and batch_size != labels.numel():
            raise ValueError(f"batch_size {batch_size} does not match {labels.numel()} labels")
        if labels.min() < 0 or labels.max() > num_classes:
            raise ValueError(f"labels must be in [0, {num_classes - 1}] or {num_classes} (null class), "
                             f"got values in [{labels.min().item()}, {labels.max().item()}]")
        return labels.long()

    def make_generator(self, generator, seed):
        """One generator from `seed`, or the given generator(s). A list of per-row generators (or of per-row
        seeds) makes every image independent of the batch it is generated in."""
        if generator is not None and seed is not None:
            raise ValueError("give either generator or seed, not both")
        if isinstance(seed, (list, tuple)):
            return [self.make_generator(None, s) for s in seed]
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed))
        return generator

    @torch.no_grad()
    def sample(self, labels=None, *, batch_size: int | None = None, cfg: float = 1.5, top_k: int = 0,
               top_p: float = 0.0, temperature: float | list[float] = 1.0, more_smooth: bool = False,
               generator: torch.Generator | list[torch.Generator] | None = None,
               seed: int | list[int] | None = None,
               decode: bool = True, keep_logits: bool = False) -> SampleOutput:
        """Generate class-conditional images.

        labels: tensor of B class ids; an int for B copies (negative: null class, needs batch_size);
        None draws B labels uniformly with the generator. cfg: guidance strength, ramped over scales.
        top_k / top_p: 0 disables. temperature: a float or one value per scale, applied after filtering.
        generator / seed: one for the batch, or one per row (then row b never depends on other rows).
        keep_logits: also return every scale's raw logits (memory: B x L x V floats).
        """
        check_sampling_args(cfg, top_k, top_p, temperature, self.var.config.vocab_size, self.num_scales)
        generator = self.make_generator(generator, seed)
        if isinstance(generator, list):
            if labels is None or isinstance(labels, int):
                raise ValueError("per-row generators/seeds need an explicit label tensor")
            if len(generator) != len(labels):
                raise ValueError(f"{len(generator)} per-row generators/seeds for {len(labels)} labels")
        labels_B = self.resolve_labels(labels, batch_size, generator)
        stats = SamplerStats()
        self._kept_logits = [] if keep_logits else None
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        tokens, f_hat = self._generate(labels_B, generator, stats, cfg=cfg, top_k=top_k, top_p=top_p,
                                       temperature=temperature, more_smooth=more_smooth)
        images = self.decode(f_hat) if decode else None
        if on_cuda:
            torch.cuda.synchronize(self.device)
            stats.cuda_max_memory_allocated = torch.cuda.max_memory_allocated(self.device)
        stats.wall_time_s = time.perf_counter() - start
        kept, self._kept_logits = self._kept_logits, None
        return SampleOutput(images, tokens, labels_B, f_hat, stats, kept)

    # ---- per-scale helpers shared by all samplers --------------------------------------------------
    def conditions(self, labels_B: torch.Tensor) -> torch.Tensor:
        """(2B, C) class vectors: the requested labels, then the null class for the CFG half."""
        null = torch.full_like(labels_B, self.var.num_classes)
        return self.var.condition(torch.cat((labels_B, null)))

    def process_logits(self, logits_2BlV: torch.Tensor, si: int, cfg: float, top_k: int, top_p: float,
                       temperature) -> torch.Tensor:
        """The processed logits of scale si (B, l, V): guidance ramp, top-k, top-p, temperature."""
        if self._kept_logits is not None:
            self._kept_logits.append(logits_2BlV.detach().clone())
        guided = guide(logits_2BlV, cfg_strength(cfg, si, self.num_scales))
        return apply_temperature(top_k_top_p_filter_(guided, top_k, top_p), temperature_at(temperature, si))

    def pick_tokens(self, processed_BlV: torch.Tensor, si: int, generator, more_smooth: bool):
        """Draw scale si's tokens; return (idx (B, l), code map (B, Cvae, pn, pn)) for the f_hat update."""
        pn = self.var.patch_nums[si]
        idx_Bl = sample_from_logits(processed_BlV, generator)
        if more_smooth:
            ratio = si / (self.num_scales - 1)
            codes_BlC = gumbel_soft_codes(processed_BlV, ratio, self.vae.quantize.embedding.weight, generator)
        else:
            codes_BlC = self.vae.quantize.embedding(idx_Bl)
        return idx_Bl, rearrange(codes_BlC, "b (h w) c -> b c h w", h=pn, w=pn)

    def empty_fhat(self, batch: int) -> torch.Tensor:
        side = self.var.patch_nums[-1]
        return torch.zeros(batch, self.var.config.z_channels, side, side, device=self.device)

    def next_scale_tokens(self, cond_2BD: torch.Tensor, next_map_BChw: torch.Tensor, si_next: int) -> torch.Tensor:
        """Embedded input of scale si_next from its map, identical for the conditional and CFG halves."""
        x_BlCv = rearrange(next_map_BChw, "b c h w -> b (h w) c").repeat(2, 1, 1)
        return self.var.embed(cond_2BD, x_BlCv, si_next, si_next + 1)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.vae.fhat_to_img(f_hat.float()).add_(1).mul_(0.5)

    def _generate(self, labels_B, generator, stats, **args):
        raise NotImplementedError(f"{type(self).__name__} must implement _generate")

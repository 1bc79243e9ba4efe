"""What a sampling call returns: the images/tokens (`SampleOutput`) and real counters (`SamplerStats`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from var import KVCache


@dataclass
class SamplerStats:
    """Counters taken while sampling (never estimated): one entry per model (stage) name where relevant."""
    forwards: dict[str, int] = field(default_factory=dict)  # transformer forward passes
    tokens_processed: dict[str, int] = field(default_factory=dict)  # rows x positions fed through the blocks
    kv_bytes_per_scale: list[int] = field(default_factory=list)  # KV bytes held during each forward
    kv_bytes_peak: int = 0
    wall_time_s: float = 0.0
    cuda_max_memory_allocated: int | None = None
    extra: dict = field(default_factory=dict)
    _peak_before: int = field(default=0, repr=False)  # the peak of the stages before the running one

    def count_forward(self, model_name: str, x_BLC: torch.Tensor) -> None:
        self.forwards[model_name] = self.forwards.get(model_name, 0) + 1
        self.tokens_processed[model_name] = self.tokens_processed.get(model_name, 0) + x_BLC.shape[0] * x_BLC.shape[1]

    def count_tokens(self, model_name: str, rows: int, positions: int) -> None:
        """A forward of a model without a KV cache (e.g. the distilled student) over rows x positions."""
        self.forwards[model_name] = self.forwards.get(model_name, 0) + 1
        self.tokens_processed[model_name] = self.tokens_processed.get(model_name, 0) + rows * positions

    def record_kv(self, *caches: KVCache) -> None:
        held = sum(c.nbytes() for c in caches)
        self.kv_bytes_per_scale.append(held)
        self.kv_bytes_peak = max(self.kv_bytes_peak, held)

    # Models run one after another (CoDe's drafter, then its refiner): each one's cache is freed before the
    # next starts, so the peak is the max over stages, each recorded as extra["kv_bytes_peak_<name>"].
    def kv_stage_begin(self, name: str) -> None:
        self._peak_before = self.kv_bytes_peak
        self.kv_bytes_peak = 0

    def kv_stage_end(self, name: str) -> None:
        self.extra[f"kv_bytes_peak_{name}"] = self.kv_bytes_peak
        self.kv_bytes_peak = max(self._peak_before, self.kv_bytes_peak)

    def record_compression(self, model_name: str, cache: KVCache, record) -> None:
        if record is None:
            return
        entry = {"model": model_name, "scale": record.scale, "before": record.before, "after": record.after}
        self.extra.setdefault("kv_len_per_layer", []).append(entry)
        self.extra.setdefault("kv_bytes_after_compression", []).append(cache.nbytes())

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


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

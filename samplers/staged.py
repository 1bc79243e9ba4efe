"""Run a range of scales with one VAR model and its own KV cache: the loop CoDe and ScaleKV share.

The state that moves between models is model-independent: the accumulated f_hat, the tokens, and
the per-scale transformer *inputs* (area-downsampled f_hat, i.e. the teacher-forcing inputs). A model
can therefore take over at any scale by prefilling its cache from the stored inputs in one forward.
With one model, no prefill and no policy, `run_scales` performs exactly the operations of
`DefaultSampler`, in the same order, so the tokens are bitwise equal for a fixed seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange

from samplers.base import Sampler, SamplerStats
from samplers.scalekv.policies import KVPolicy
from var import VAR, KVCache


@dataclass
class GenerationState:
    f_hat: torch.Tensor  # (B, Cvae, h, w) accumulated latent
    tokens: list[torch.Tensor] = field(default_factory=list)  # per generated scale, (B, pn*pn)
    # inputs[si]: (B, pn_si^2, Cvae) input map of scale si, for si >= 1 (index 0 unused: the start token)
    inputs: list[torch.Tensor | None] = field(default_factory=lambda: [None])


def conditions_for(model: VAR, labels_B: torch.Tensor) -> torch.Tensor:
    """(2B, C): the requested labels, then the null class for the CFG half (as Sampler.conditions)."""
    null = torch.full_like(labels_B, model.num_classes)
    return model.condition(torch.cat((labels_B, null)))


def embed_scales(model: VAR, cond_2BD: torch.Tensor, state: GenerationState, first: int, end: int) -> torch.Tensor:
    """Embedded input tokens of scales [first, end) for both CFG halves, from the stored inputs."""
    if first == 0 and end == 1:
        return model.embed(cond_2BD, None, 0, 1)
    maps = [state.inputs[si] for si in range(max(first, 1), end)]
    x_BlCv = (maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)).repeat(2, 1, 1)
    return model.embed(cond_2BD, x_BlCv, first, end)


def record_compression(stats: SamplerStats, cache: KVCache, record, model_name: str) -> None:
    entry = {"model": model_name, "scale": record.scale, "before": record.before, "after": record.after}
    stats.extra.setdefault("kv_len_per_layer", []).append(entry)
    stats.extra.setdefault("kv_bytes_after_compression", []).append(cache.nbytes())


def run_scales(sampler: Sampler, model: VAR, name: str, labels_B: torch.Tensor, cache: KVCache,
               state: GenerationState, si_begin: int, si_end: int, generator, stats: SamplerStats, *,
               sampling: dict, policy: KVPolicy | None = None, prefill_from: int | None = None) -> None:
    """Generate scales si_begin..si_end-1 with `model`, updating `state` in place.

    prefill_from: the first forward covers scales prefill_from..si_begin (block-causal among them) and
    fills `cache` with all of them; only the logits of scale si_begin are computed and sampled.
    sampling: cfg, top_k, top_p, temperature, more_smooth (the CFG ramp uses the global scale index).
    """
    K = model.num_scales
    cond_2BD = conditions_for(model, labels_B)
    more_smooth = sampling["more_smooth"]
    for si in range(si_begin, si_end):
        first = prefill_from if (si == si_begin and prefill_from is not None) else si
        x_BlC = embed_scales(model, cond_2BD, state, first, si + 1)
        stats.count_forward(name, x_BlC)
        hidden = model.run_blocks(x_BlC, cond_2BD, cache, scale_begin=first)
        stats.record_kv(cache)  # held during this forward: kept history + the full current map
        if policy is not None:
            record_compression(stats, cache, policy.compress(cache, model, si), name)
        if first != si:  # prefill: only the block of scale si is sampled
            hidden = hidden[:, hidden.shape[1] - model.patch_nums[si] ** 2:]
        processed = sampler.process_logits(model.logits(hidden, cond_2BD), si, sampling["cfg"], sampling["top_k"],
                                           sampling["top_p"], sampling["temperature"])
        idx_Bl, codes_BChw = sampler.pick_tokens(processed, si, generator, more_smooth)
        state.tokens.append(idx_Bl)
        state.f_hat, next_map = sampler.vae.quantize.next_input(si, state.f_hat, codes_BChw)
        if si + 1 < K:
            state.inputs.append(rearrange(next_map, "b c h w -> b (h w) c"))


def new_state(sampler: Sampler, batch: int) -> GenerationState:
    return GenerationState(f_hat=sampler.empty_fhat(batch))

"""The reference VAR sampler: one cached transformer forward per scale, coarse to fine."""
from __future__ import annotations

import torch

from samplers.base import Sampler, SamplerStats, register_sampler


@register_sampler("default")
class DefaultSampler(Sampler):
    """Classifier-free guided next-scale sampling with a KV cache.

    The conditional and unconditional halves share one token history: the unconditional rows are
    fed the tokens drawn from the guided distribution, as in the reference.
    """

    def _generate(self, labels_B: torch.Tensor, generator: torch.Generator | None, stats: SamplerStats, *,
                  cfg, top_k, top_p, temperature, more_smooth):
        var = self.var
        cond_2BD = self.conditions(labels_B)
        cache = var.new_cache()
        f_hat = self.empty_fhat(labels_B.shape[0])
        x_BlC = var.embed(cond_2BD, None, 0, 1)
        tokens = []
        for si in range(self.num_scales):
            stats.count_forward("var", x_BlC)
            hidden = var.run_blocks(x_BlC, cond_2BD, cache, scale_begin=si)
            stats.record_kv(cache)
            processed = self.process_logits(var.logits(hidden, cond_2BD), si, cfg, top_k, top_p, temperature)
            idx_Bl, codes_BChw = self.pick_tokens(processed, si, generator, more_smooth)
            tokens.append(idx_Bl)
            f_hat, next_map = self.vae.quantize.next_input(si, f_hat, codes_BChw)
            if si + 1 < self.num_scales:
                x_BlC = self.next_scale_tokens(cond_2BD, next_map, si + 1)
        return tokens, f_hat

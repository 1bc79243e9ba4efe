"""The ordinary token rule: a categorical draw from the processed distribution (CFG, top-k, top-p, temperature).

`law` gives the processed probabilities over the whole vocabulary (what verification needs); `choose` draws
from that law. rng="reference" runs the public loop's operations (filter the full vocabulary, softmax,
one multinomial call), so its random draws are reproduced bitwise; rng="fast" draws from the same law on
the top-k candidates only. `more_smooth` (a visualisation path) always uses the reference operations and
returns Gumbel-softmax mixtures of codes as the vectors that enter f_hat.
"""
from __future__ import annotations

import torch

from samplers.engine import Engine, TokenRule
from samplers.logits_processing import (apply_temperature, draw_tokens, gumbel_soft_codes, sample_from_logits,
                                        temperature_at, top_k_top_p_filter_)


class CategoricalDraw(TokenRule):
    name = "draw"

    def law(self, engine: Engine, guided_BlV: torch.Tensor, si: int) -> torch.Tensor:
        s = engine.sampling
        processed = top_k_top_p_filter_(guided_BlV.clone(), s.top_k, s.top_p)
        return apply_temperature(processed, temperature_at(s.temperature, si)).softmax(dim=-1)

    def choose(self, engine: Engine, guided_BlV: torch.Tensor, si: int):
        s = engine.sampling
        t = temperature_at(s.temperature, si)
        if not s.more_smooth:
            return draw_tokens(guided_BlV, s.top_k, s.top_p, t, engine.generator, rng=s.rng), None
        processed = apply_temperature(top_k_top_p_filter_(guided_BlV, s.top_k, s.top_p), t)
        idx_Bl = sample_from_logits(processed, engine.generator)
        ratio = si / (engine.num_scales - 1)
        return idx_Bl, gumbel_soft_codes(processed, ratio, engine.vae.quantize.embedding.weight, engine.generator)

"""Block-SJD sampler for next-scale VAR (spec accelerators.md 3.6): scale = block.

`VARTarget` adapts a VAR + tokenizer to `samplers.sjd.loop.BlockTarget`: the window's inputs are the
committed f_hat for the first scale and f_hat accumulated with the drafted token maps for the next ones
(phi / bicubic upsample / area downsample, as in plain sampling); one `run_blocks` call with the KV cache
prefills them with the block-causal mask among the new scales. Probabilities come from
`Sampler.process_logits` with the global scale index, i.e. exactly what the default sampler draws from.
"""
from __future__ import annotations

import torch
from einops import rearrange

from samplers.sjd import drafts as draft_sources
from samplers.base import Sampler, SamplerStats, check_models_compatible, register_sampler
from samplers.sjd.loop import BlockSJD, BlockTarget, DraftSource, SJDSettings
from samplers.sjd.verify import AcceptRule, derive_generator
from tokenizers import VQVAE
from var import VAR


class VARTarget(BlockTarget):
    def __init__(self, sampler: Sampler, labels_B: torch.Tensor, sampling: dict, stats: SamplerStats,
                 model_name: str = "var"):
        self.sampler, self.var, self.vae = sampler, sampler.var, sampler.vae
        self.labels_B, self.sampling, self.stats, self.model_name = labels_B, sampling, stats, model_name
        self.block_sizes = tuple(p * p for p in self.var.patch_nums)
        self.vocab_size = self.var.config.vocab_size
        self.cond_2BD = sampler.conditions(labels_B)
        self.cache = self.var.new_cache()
        self.f_hat = sampler.empty_fhat(labels_B.shape[0])  # f_hat of the committed scales
        self.inputs: list[torch.Tensor | None] = [None]  # committed input maps (B, n_si, Cvae), si >= 1
        self.tokens: list[torch.Tensor] = []  # committed token maps

    def processed_probs(self, logits_2BlV: torch.Tensor, si: int) -> torch.Tensor:
        s = self.sampling
        processed = self.sampler.process_logits(logits_2BlV, si, s["cfg"], s["top_k"], s["top_p"], s["temperature"])
        return processed.softmax(dim=-1)  # the same softmax sample_from_logits draws from

    def _input_maps(self, a: int, input_tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = [self.inputs[a]] if a >= 1 else []
        f_hat = self.f_hat
        q = self.vae.quantize
        for i, tok in enumerate(input_tokens):
            si = a + i
            f_hat, nxt = q.next_input(si, f_hat, q.lookup(tok, self.var.patch_nums[si]))
            maps.append(rearrange(nxt, "b c h w -> b (h w) c"))
        return maps

    def window(self, a, input_tokens):
        var, e = self.var, a + len(input_tokens) + 1
        maps = self._input_maps(a, input_tokens)
        x_in = torch.cat(maps, dim=1).repeat(2, 1, 1) if maps else None
        x = var.embed(self.cond_2BD, x_in, a, e)
        self.stats.count_forward(self.model_name, x)
        hidden = var.run_blocks(x, self.cond_2BD, self.cache, scale_begin=a)
        self.stats.record_kv(self.cache)  # held during the pass, speculative scales included
        logits = var.logits(hidden, self.cond_2BD)
        out, start = [], 0
        for si in range(a, e):
            n = self.block_sizes[si]
            out.append(self.processed_probs(logits[:, start:start + n], si))
            start += n
        return out

    def commit(self, a, c, tokens):
        var, q = self.var, self.vae.quantize
        self.cache.truncate(var.begin_ends[c - 1][1])  # rollback of every speculative scale >= c
        for si, tok in zip(range(a, c), tokens):
            self.f_hat, nxt = q.next_input(si, self.f_hat, q.lookup(tok, var.patch_nums[si]))
            self.tokens.append(tok)
            if si + 1 < var.num_scales:
                self.inputs.append(rearrange(nxt, "b c h w -> b (h w) c"))
        self.stats.extra.setdefault("kv_after_pass", []).append(
            {"committed_scales": c, "seq_len": self.cache.seq_len,
             "layer_lens": [self.cache.layer_len(i) for i in range(self.cache.num_layers)]})


@register_sampler("sjd")
class BlockSJDSampler(Sampler):
    """Block-SJD. Options:
    draft: draft source name (jacobi | random | var | any registered one); draft_init: random | repeat
    (drafts of scales never seen by the target); window_scales: W (1 = plain sampling);
    max_spec_tokens: only scales with at most this many tokens are computed on drafted inputs;
    accept_mode: exact (default) | lenient | topk, with lenient_ratio / accept_top_k, and stale_tolerance
    (relaxed modes are biased; stats.extra["exact"] is then False).
    Extra models (keyword args, all optional): draft_model (a VAR sharing the tokenizer, for draft='var'),
    student (for a registered distilled-decoding source). Python callers may pass a ready `draft_source`.
    Randomness: drafts and direct draws use the caller's generator(s) in the default sampler's order;
    acceptance uniforms and residual draws use a stream derived from it (speculative.derive_generator).
    With per-row seeds every image has the exact law, but its realisation depends on the batch (the
    commit point, hence the window, is shared by the rows). stats.kv_bytes_per_scale holds one entry
    per target pass (KV held during that forward, speculative scales included).
    """
    optional_models = ("draft_model", "student")
    options = {"draft": str, "draft_init": str, "window_scales": int, "max_spec_tokens": int, "accept_mode": str,
               "lenient_ratio": float, "accept_top_k": int, "stale_tolerance": float}

    def __init__(self, var: VAR, vae: VQVAE, *, draft_model: VAR | None = None, student=None, draft: str = "jacobi",
                 draft_init: str = "random", window_scales: int = 2, max_spec_tokens: int = 25,
                 accept_mode: str = "exact", lenient_ratio: float = 1.0, accept_top_k: int = 0,
                 stale_tolerance: float = 0.0, draft_source: DraftSource | None = None):
        super().__init__(var, vae)
        if draft_model is not None:
            check_models_compatible(draft_model, vae, "draft_model")
            if draft_model.num_classes != var.num_classes:
                raise ValueError(f"draft_model has {draft_model.num_classes} classes but the target {var.num_classes}; "
                                 f"the drafter must be trained on the same label set")
        self.draft_models = {"draft_model": draft_model, "student": student}
        if draft_model is not None:
            self.draft_model = draft_model  # registered as a submodule: moves with .to(device)
        self.draft_init = draft_init
        self.settings = SJDSettings(window_scales, max_spec_tokens,
                                    AcceptRule(accept_mode, lenient_ratio, accept_top_k, stale_tolerance))
        self.source = draft_source if draft_source is not None else draft_sources.build_draft_source(draft, self)
        self.engine: BlockSJD | None = None  # the last run's engine (counters), for inspection

    def _generate(self, labels_B, generator, stats: SamplerStats, *, cfg, top_k, top_p, temperature, more_smooth):
        if more_smooth:
            raise ValueError("more_smooth is a visualisation path with soft codes; it has no token law to verify. "
                             "Use the default sampler for it, or more_smooth=False with sjd")
        sampling = dict(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
        target = VARTarget(self, labels_B, sampling, stats)
        self.engine = BlockSJD(target, self.source, self.settings, generator, derive_generator(generator))
        tokens = self.engine.run(labels_B.shape[0], self.device)
        summary = self.engine.summary()
        rule = self.settings.rule
        stats.extra.update(summary)
        stats.extra.update({"exact": rule.exact, "accept_rule": rule.describe(), "draft_source": self.source.name,
                            "window_scales": self.settings.window, "max_spec_tokens": self.settings.max_spec_tokens})
        return tokens, target.f_hat

"""CoDe: collaborative decoding (Chen et al., CVPR 2025) with a large drafter and a small refiner.

1. The drafter (the sampler's `var`) samples scales 0..N-1 with its KV cache; the per-scale inputs
   (area-downsampled f_hat) are kept, model-independent.
2. The drafter's cache is freed: peak KV is max(drafter phase, refiner phase), not the sum.
3. The refiner prefills scales 0..N from those inputs in ONE forward (block-causal among them,
   equivalent to teacher forcing on the drafter's tokens) and samples scale N from its last block.
4. The refiner continues ordinary cached sampling for N+1..K-1 on the same f_hat.
The CFG ramp and the per-scale temperature use the global scale index in both models.

Both models can have a KV-compression policy (e.g. ScaleKV calibrated for each model), applied to
their own cache after each scale: CoDe x ScaleKV is a configuration of this sampler.
"""
from __future__ import annotations

import torch

from samplers.base import Sampler, SamplerStats, check_models_compatible, register_sampler
from samplers.scalekv.policies import KVPolicy
from samplers.scalekv.sampler import build_policy
from samplers.staged import new_state, run_scales
from tokenizers import VQVAE
from var import VAR


@register_sampler("code")
class CoDeSampler(Sampler):
    """`var` is the drafter, `refiner` the small model; draft_scales = N scales drafted (0..K).

    kv_policy / kv_budget_frac / drafter_calibration / refiner_calibration: optional KV compression of
    both caches (policy names as in samplers.scalekv.sampler: none, scalekv, snapkv, window); ScaleKV needs one
    calibration file per model. Python callers may pass ready `drafter_kv` / `refiner_kv` policy objects.
    """
    extra_models = ("refiner",)
    options = {"draft_scales": int, "kv_policy": str, "kv_budget_frac": float, "drafter_calibration": str,
               "refiner_calibration": str}

    def __init__(self, var: VAR, vae: VQVAE, *, refiner: VAR, draft_scales: int = 6, kv_policy: str = "none",
                 kv_budget_frac: float = 0.35, drafter_calibration: str = "", refiner_calibration: str = "",
                 drafter_kv: KVPolicy | None = None, refiner_kv: KVPolicy | None = None):
        super().__init__(var, vae)
        if refiner is None:
            raise ValueError("CoDe needs a refiner model (sample.py: --refiner PATH)")
        check_models_compatible(refiner, vae, "refiner")
        if refiner.num_classes != var.num_classes:
            raise ValueError(f"drafter has {var.num_classes} classes but refiner {refiner.num_classes}; "
                             f"the pair must be trained on the same label set")
        K = var.num_scales
        if not isinstance(draft_scales, int) or not 0 <= draft_scales <= K:
            raise ValueError(f"draft_scales must be an integer in [0, {K}] (scales drafted by the large model), "
                             f"got {draft_scales!r}")
        self.refiner, self.draft_scales = refiner, draft_scales
        self.drafter_kv = drafter_kv if drafter_kv is not None else build_policy(
            kv_policy, var, kv_budget_frac, drafter_calibration or None)
        self.refiner_kv = refiner_kv if refiner_kv is not None else build_policy(
            kv_policy, refiner, kv_budget_frac, refiner_calibration or None)

    def _generate(self, labels_B: torch.Tensor, generator, stats: SamplerStats, *, cfg, top_k, top_p, temperature,
                  more_smooth):
        sampling = dict(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, more_smooth=more_smooth)
        K, N = self.num_scales, self.draft_scales
        state = new_state(self, labels_B.shape[0])
        if N > 0:
            cache = self.var.new_cache(record_queries=bool(self.drafter_kv and self.drafter_kv.needs_queries))
            run_scales(self, self.var, "drafter", labels_B, cache, state, 0, N, generator, stats,
                       sampling=sampling, policy=self.drafter_kv)
            stats.extra["kv_bytes_peak_drafter"] = stats.kv_bytes_peak
            cache.clear()  # the refiner cannot reuse it (other width); free it before the refiner runs
            del cache
        if N < K:
            peak_before = stats.kv_bytes_peak
            stats.kv_bytes_peak = 0
            cache = self.refiner.new_cache(record_queries=bool(self.refiner_kv and self.refiner_kv.needs_queries))
            run_scales(self, self.refiner, "refiner", labels_B, cache, state, N, K, generator, stats,
                       sampling=sampling, policy=self.refiner_kv, prefill_from=0)
            stats.extra["kv_bytes_peak_refiner"] = stats.kv_bytes_peak
            stats.kv_bytes_peak = max(peak_before, stats.kv_bytes_peak)
        stats.extra["draft_scales"] = N
        return state.tokens, state.f_hat

"""CoDe: collaborative decoding (Chen et al., CVPR 2025) with a large drafter and a small refiner.

A stage configuration of the engine:
1. the drafter (the sampler's `var`) samples scales 0..N-1 with its KV cache; the per-scale inputs
   (area-downsampled f_hat) are kept, model-independent;
2. the drafter's cache is freed: peak KV is max(drafter phase, refiner phase), not the sum;
3. the refiner prefills scales 0..N from those inputs in ONE forward (block-causal among them,
   equivalent to teacher forcing on the drafter's tokens) and samples scale N from its last block;
4. the refiner continues ordinary cached sampling for N+1..K-1 on the same f_hat.
The CFG ramp and the per-scale temperature use the global scale index in both models.

Stacks with every other accelerator: code+scalekv compresses both caches (one calibration per model),
code+sjd verifies speculative windows inside each stage (never across the hand-over), code+edit and
code+flow change how tokens are chosen in both stages. The default N is the authors' fraction, 8 of 10
scales (round(0.8 K) for other schedules).
"""
from __future__ import annotations

from samplers.base import Accelerator, register_sampler, sampler_class
from samplers.engine import Plan, VARStage
from samplers.scalekv.sampler import build_policy
from training.checkpoint import check_models_compatible
from var import VAR


def default_draft_scales(num_scales: int) -> int:
    """The CoDe paper drafts 8 of the 10 ImageNet scales; other schedules keep that fraction."""
    return round(0.8 * num_scales)


@register_sampler("code")
class CoDe(Accelerator):
    """`var` is the drafter, `refiner` the small model; draft_scales = N scales drafted (0..K; -1: round(0.8 K)).

    kv_policy / kv_budget_frac / drafter_calibration / refiner_calibration: optional KV compression of both
    caches (none, scalekv, snapkv, window; ScaleKV needs one calibration file per model) — the same as
    stacking `code+scalekv`. Python callers may pass ready `drafter_kv` / `refiner_kv` policy objects.
    """
    extra_models = ("refiner",)

    def __init__(self, *, refiner: VAR | None = None, draft_scales: int = -1, kv_policy: str = "none",
                 kv_budget_frac: float = 0.35, drafter_calibration: str = "", refiner_calibration: str = "",
                 drafter_kv=None, refiner_kv=None):
        if refiner is None:
            raise ValueError("CoDe needs a refiner model (sample.py: --model refiner=PATH)")
        self.refiner, self.draft_scales_option = refiner, draft_scales
        self.kv_policy, self.kv_budget_frac = kv_policy, kv_budget_frac
        self.drafter_calibration, self.refiner_calibration = drafter_calibration, refiner_calibration
        self.drafter_kv, self.refiner_kv = drafter_kv, refiner_kv

    def owned_slots(self):
        own_kv = self.kv_policy != "none" or self.drafter_kv is not None or self.refiner_kv is not None
        return ("stages", "kv") if own_kv else ("stages",)

    def check(self, sampler, others) -> None:
        var, vae = sampler.var, sampler.vae
        check_models_compatible(self.refiner, vae, "refiner", main=var, main_what="the drafter",
                                fix="the pair must be trained on the same label set")
        K, N = var.num_scales, self.draft_scales_option
        if N == -1:
            N = default_draft_scales(K)
        if not isinstance(N, int) or not 0 <= N <= K:
            raise ValueError(f"draft_scales must be an integer in [0, {K}] (scales drafted by the large model; "
                             f"-1 = round(0.8 K)), got {self.draft_scales_option!r}")
        self.draft_scales = N
        if self.drafter_kv is None:
            self.drafter_kv = build_policy(self.kv_policy, var, self.kv_budget_frac, self.drafter_calibration or None)
        if self.refiner_kv is None:
            self.refiner_kv = build_policy(self.kv_policy, self.refiner, self.kv_budget_frac,
                                           self.refiner_calibration or None)

    def configure(self, plan: Plan, sampler) -> None:
        K, N = sampler.num_scales, self.draft_scales
        plan.stages = ([VARStage("drafter", sampler.var, 0, N)] if N > 0 else []) + \
                      ([VARStage("refiner", self.refiner, N, K)] if N < K else [])
        for name, policy in (("drafter", self.drafter_kv), ("refiner", self.refiner_kv)):
            if policy is not None:
                plan.kv_policies[name] = policy

    def after_run(self, stats) -> None:
        stats.extra["draft_scales"] = self.draft_scales


CoDeSampler = sampler_class("code")

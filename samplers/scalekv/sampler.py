"""ScaleKV: scale-aware KV-cache compression (Li et al., NeurIPS 2025), and its equal-budget baselines.

Budget allocation (spec 2.3): at every compressed scale the kept length averaged over layers equals
the uniform budget B; refiner layers get B * (refiner_start - refiner_decay * j) at the j-th
compressed scale (never less than the observation window, or B if that is smaller), drafter layers (from the ASI calibration,
`samplers/scalekv/calibration.py`) share the remainder, capped at what they hold; what a cap leaves over goes
back to the refiners. A scale is compressed once the uncompressed cache would exceed B.

`build_policy` makes any of {scalekv, snapkv, window} for any model. As an accelerator it owns the engine's
"kv" slot: it gives every VAR stage of the plan its policy, so `scalekv` alone compresses the one model,
`code+scalekv` both CoDe models (calibration / refiner_calibration), `sjd+scalekv` compresses at every commit
of a speculative pass (the entries of the scales inside one window stay uncompressed until committed, so
with window_scales=1 it is exactly `scalekv`).
"""
from __future__ import annotations

from samplers.base import Accelerator, register_sampler, sampler_class
from samplers.engine import Plan, VARStage
from samplers.scalekv.calibration_file import load_calibration
from samplers.scalekv.policies import (KVPolicy, SelectionPolicy, WindowPolicy, budget_tokens, scale_lengths,
                                     uniform_budget, window_size)
from var import VAR

POLICIES = ("none", "scalekv", "snapkv", "window")


def even_fill(amount: int, caps: list[int]) -> tuple[list[int], int]:
    """Split `amount` integer units as evenly as possible under per-slot caps; return (shares, left over)."""
    out, left = [0] * len(caps), amount
    order = sorted(range(len(caps)), key=lambda i: caps[i])
    for pos, i in enumerate(order):
        share = -(-left // (len(order) - pos))  # ceil: small caps first, so the rest absorb their slack
        out[i] = max(0, min(caps[i], share))
        left -= out[i]
    return out, left


def allocate_scale(lens: list[int], drafter: list[bool], budget: int, refiner_frac: float, floor: int) -> list[int]:
    """Per-layer budgets of one compressed scale with mean exactly `budget` (when the layers hold that much)."""
    D = len(lens)
    total = min(D * budget, sum(lens))
    refiners = [i for i in range(D) if not drafter[i]]
    drafters = [i for i in range(D) if drafter[i]]
    if not drafters or not refiners:
        shares, _ = even_fill(total, lens)
        return shares
    out = [0] * D
    r_budget = max(floor, int(budget * refiner_frac))
    for i in refiners:
        out[i] = min(lens[i], r_budget)
    d_shares, left = even_fill(total - sum(out), [lens[i] for i in drafters])
    for i, s in zip(drafters, d_shares):
        out[i] = s
    if left > 0:  # drafters hold less than their share: the rest goes back to the refiners
        extra, _ = even_fill(left, [lens[i] - out[i] for i in refiners])
        for i, s in zip(refiners, extra):
            out[i] += s
    return out


def scalekv_budget(drafter_LK: list[list[bool]], budget: int, refiner_start: float = 0.9, refiner_decay: float = 0.1):
    """Budget function for `SelectionPolicy`: drafter/refiner split per (layer, scale), mean = budget."""
    if not 0.0 < refiner_start <= 1.0 or refiner_decay < 0:
        raise ValueError(f"need 0 < refiner_start <= 1 and refiner_decay >= 0, got {refiner_start}, {refiner_decay}")

    def fn(num_layers, patch_nums, si, lens):
        if len(drafter_LK) != num_layers:
            raise ValueError(f"the calibration describes {len(drafter_LK)} layers, the model has {num_layers}")
        cum = scale_lengths(patch_nums)
        if cum[si] <= budget:
            return None
        j = si - next(k for k in range(len(cum)) if cum[k] > budget)
        frac = max(0.0, refiner_start - refiner_decay * j)
        return allocate_scale(lens, [drafter_LK[l][si] for l in range(num_layers)], budget, frac,
                              min(window_size(patch_nums[si]), budget))
    return fn


def build_policy(kind: str, model: VAR, budget_frac: float, calibration: str | None = None, *,
                 score: str = "logits", pooling: str = "max", per_head: bool = True,
                 refiner_start: float = 0.9, refiner_decay: float = 0.1) -> KVPolicy | None:
    """A KV policy for `model` at `budget_frac` of its peak cache; 'scalekv' needs the model's calibration."""
    if kind not in POLICIES:
        raise ValueError(f"unknown KV policy {kind!r}; choose one of {', '.join(POLICIES)}")
    if kind == "none":
        return None
    budget = budget_tokens(budget_frac, model.patch_nums)
    if kind == "window":
        return WindowPolicy(budget)
    if kind == "snapkv":
        return SelectionPolicy(uniform_budget(budget), "snapkv", score, pooling, per_head=per_head)
    if not calibration:
        raise ValueError("the 'scalekv' policy needs a calibration file for this model (see "
                         "`python -m samplers.scalekv.calibration --help`); use 'snapkv' for uniform budgets without one")
    drafters = load_calibration(calibration, model)["drafter_mask"]
    return SelectionPolicy(scalekv_budget(drafters, budget, refiner_start, refiner_decay), "scalekv", score,
                           pooling, per_head=per_head)


@register_sampler("scalekv")
class ScaleKV(Accelerator):
    """KV-cache compression after every committed scale, for every VAR stage of the plan.

    policy: scalekv (needs `calibration`), snapkv (uniform per-head selection), window (recency), none; or a
    ready KVPolicy object (Python). budget_frac: kept cache entries per layer as a fraction of the peak cache
    (entries before the last map). calibration: the main model's file; refiner_calibration: CoDe's refiner's.
    """
    slots = ("kv",)

    def __init__(self, *, policy: str | None = "scalekv", budget_frac: float = 0.35, calibration: str = "",
                 refiner_calibration: str = "", score: str = "logits", pooling: str = "max", per_head: bool = True,
                 refiner_start: float = 0.9, refiner_decay: float = 0.1):
        self.policy_spec, self.budget_frac = policy, budget_frac
        self.calibrations = {"main": calibration, "refiner": refiner_calibration}
        self.settings = dict(score=score, pooling=pooling, per_head=per_head, refiner_start=refiner_start,
                             refiner_decay=refiner_decay)
        self._built: dict[int, KVPolicy | None] = {}

    def policy_for(self, model: VAR, calibration: str) -> KVPolicy | None:
        if isinstance(self.policy_spec, KVPolicy) or self.policy_spec is None:
            return self.policy_spec
        key = id(model)
        if key not in self._built:
            self._built[key] = build_policy(self.policy_spec, model, self.budget_frac, calibration or None,
                                            **self.settings)
        return self._built[key]

    def configure(self, plan: Plan, sampler) -> None:
        for stage in plan.stages:
            if isinstance(stage, VARStage):
                cal = self.calibrations["refiner"] if stage.name == "refiner" else self.calibrations["main"]
                policy = self.policy_for(stage.model, cal)
                if policy is not None:
                    plan.kv_policies[stage.name] = policy

    @property
    def policy(self) -> KVPolicy | None:
        """The main model's policy (what `scalekv` alone applies)."""
        return self.policy_for(self.sampler.var, self.calibrations["main"])


ScaleKVSampler = sampler_class("scalekv")

"""Block-SJD (spec accelerators.md 3.6) as an accelerator: the engine's "speculation" slot.

Options: draft (jacobi | random | var | dd | any registered source); draft_init: random | repeat (drafts of
scales never seen by the target); window_scales: W (1 = plain sampling); max_spec_tokens: only scales
with at most this many tokens are computed on drafted inputs; window_policy: fixed (default) | adaptive
(windows cut where the all-rows acceptance seen so far makes a multi-scale commit unlikely, min_commit_prob;
samplers/sjd/speculation.py); accept_mode: exact (default) | lenient |
topk, with lenient_ratio / accept_top_k, and stale_tolerance (relaxed modes are biased; stats.extra["exact"]
is then False); stage: verify only that stage ("refiner" with code; default: every VAR stage).
Extra models (all optional): draft_model (a VAR sharing the tokenizer, for draft='var'), student (for
draft='dd'). Python callers may pass a ready `draft_source`.
Randomness: drafts and direct draws use the caller's generator(s) in the default sampler's order;
acceptance uniforms and residual draws use a stream derived from it (verify.derive_generator). With per-row
seeds every image has the exact law, but its realisation depends on the batch (the commit point, hence the
window, is shared by the rows). stats.kv_bytes_per_scale holds one entry per target pass.
"""
from __future__ import annotations

from samplers.base import Accelerator, register_sampler, sampler_class
from samplers.engine import Plan, VARStage
from samplers.sjd import drafts as draft_sources
from samplers.sjd.speculation import AcceptanceHistory, BlockSpeculation, DraftSource, SJDSettings
from samplers.sjd.verify import AcceptRule
from training.checkpoint import check_models_compatible
from var import VAR


@register_sampler("sjd")
class BlockSJD(Accelerator):
    slots = ("speculation",)
    optional_models = ("draft_model", "student")

    def __init__(self, *, draft_model: VAR | None = None, student=None, draft: str = "jacobi",
                 draft_init: str = "random", window_scales: int = 2, max_spec_tokens: int = 25,
                 accept_mode: str = "exact", lenient_ratio: float = 1.0, accept_top_k: int = 0,
                 stale_tolerance: float = 0.0, stage: str = "", window_policy: str = "fixed",
                 min_commit_prob: float = 0.25, draft_source: DraftSource | None = None):
        self.draft_model, self.student = draft_model, student
        self.draft_models = {"draft_model": draft_model, "student": student}
        self.draft, self.draft_init, self.stage = draft, draft_init, stage
        self.settings = SJDSettings(window_scales, max_spec_tokens,
                                    AcceptRule(accept_mode, lenient_ratio, accept_top_k, stale_tolerance),
                                    window_policy, min_commit_prob)
        self.history = AcceptanceHistory()  # shared by every run of this accelerator (the adaptive windows)
        self.source = draft_source if draft_source is not None else draft_sources.build_draft_source(draft, self)
        self.speculation: BlockSpeculation | None = None  # the last run's (counters), for inspection

    def check(self, sampler, others) -> None:
        var = sampler.var
        if self.draft_model is not None:
            check_models_compatible(self.draft_model, sampler.vae, "draft_model", main=var, main_what="the target",
                                    fix="the drafter must be trained on the same label set")
        if any(o.name == "flow" for o in others):
            raise ValueError("sjd+flow has no defined meaning: the flow rule makes every token a deterministic "
                             "function of its own Gaussian noise (the pairs DD distils), while Block-SJD decides "
                             "tokens by random acceptance tests and residual draws that are not functions of that "
                             "noise, so the result would be neither a flow sample nor anything faster; use one of them")
        if any(o.name == "dd" for o in others):
            raise ValueError("sjd+dd: the DD sampler's student emits scales in one forward, with nothing to verify; "
                             "use the student as Block-SJD's draft source instead (sjd with draft=dd, --model student=PATH)")

    def configure(self, plan: Plan, sampler) -> None:
        if plan.token_rule.name == "flow" or not plan.token_rule.verifiable:
            raise ValueError("Block-SJD needs a token rule with a law to verify against; the flow rule has none")
        names = [stage.name for stage in plan.stages if isinstance(stage, VARStage)]
        if self.stage and self.stage not in names:  # else speculation would silently never run
            raise ValueError(f"sjd stage={self.stage!r} names no VAR stage of this sampler (its VAR stages: "
                             f"{', '.join(names) or 'none'}); leave stage empty to speculate in every stage")
        self.speculation = BlockSpeculation(self.source, self.settings, self.stage, self.history)
        plan.speculation = self.speculation

    @property
    def engine(self) -> BlockSpeculation | None:
        return self.speculation

    def after_run(self, stats) -> None:
        rule = self.settings.rule
        stats.extra.update(self.speculation.summary())
        stats.extra.update({"exact": rule.exact, "accept_rule": rule.describe(), "draft_source": self.source.name,
                            "window_scales": self.settings.window, "max_spec_tokens": self.settings.max_spec_tokens,
                            "window_policy": self.settings.window_policy})


BlockSJDSampler = sampler_class("sjd")

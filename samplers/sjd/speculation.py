"""Block-SJD as the engine's speculation policy: speculative Jacobi decoding over blocks (spec accelerators.md 3.6).

For VAR a block is a scale. Per pass, with scales [0, a) committed, the engine:
  1. asks `window_end` for the window a..e-1 (at most `window` scales, never past the stage's end; scales
     computed on drafted inputs, a+1..e-1, have at most `max_spec_tokens` tokens), and the draft source for
     drafts of a..e-2;
  2. runs ONE target forward over the window (committed cache + block-causal mask among the new scales);
  3. per row, verifies scales left to right while the row's context is exact (`verify`: every token by
     `verify.verify_block`, independent uniforms from a derived stream, residual draw on rejection). A scale
     with a replaced token is an exact sample but makes later scales' p stale for that row. The last window
     scale is drawn directly by the token rule (it is no input inside this window);
  4. commits c = the first scale not final in every row (rows advance independently, the KV cache is shared):
     keeps KV of [0, c) and rolls back the rest. Tokens a row finalised beyond c are never re-tested
     (re-testing would bias the law, spec 3.8); they are fed as inputs and skipped by verification;
  5. lets the draft source observe the pass (Jacobi refresh, drafter cache rollback).
Every pass finalises at least scale a for every row, so passes <= number of scales. With window 1 there is
no draft and no test: the plain loop.

Window policy. "fixed" (the spec's Block-SJD): every pass asks for the whole window. "adaptive": a pass only
pays when every row of the batch accepts the drafted scales (the commit point is shared), so the window is
cut before the first scale where the estimated probability that all B rows accept every drafted scale so far,
prod_b r_b^B, falls below `min_commit_prob`; r_b is the rate of rows whose whole scale b was accepted, over
every earlier pass of this accelerator (`AcceptanceHistory`, kept across calls), with one optimistic pseudo-row
so that an untried scale is tried. Exactness is
untouched: the window is chosen from the past only, and any draft/window gives exact tokens. At batch 16
with per-row block acceptance <= 0.75 (the shipped 64 px drafter) no pass can commit two scales, so the
adaptive window settles on plain passes instead of paying for drafts that are never kept.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from samplers.engine import Speculation
from samplers.sjd.verify import AcceptRule, Generators, derive_generator, verify_block


@dataclass
class Draft:
    tokens: torch.Tensor  # (B, n) drafted token ids
    q: torch.Tensor | None  # (B, n, V) the law the tokens were drawn from; None = one-hot at the tokens


class DraftSource(ABC):
    """Proposes drafts for future scales. Exactness needs only that each Draft's q is the law its tokens were
    drawn from (or q = None), and that drafts never use the verification stream. `target` is the engine:
    block_sizes, vocab_size, labels_B, committed f_hat / inputs / tokens, stats, vae, and
    `draw_with_law(logits_2BlV, si)` (the engine's own token rule and processed law).

    A new source subclasses this and is registered with `samplers.sjd.drafts.register_draft_source`."""
    name: str = ""

    def start(self, target, batch: int, generator: Generators) -> None:
        self.target, self.batch, self.generator = target, batch, generator

    @abstractmethod
    def propose(self, a: int, end: int, tokens: list[torch.Tensor | None], final: list[torch.Tensor]) -> list[Draft]:
        """Drafts for scales a..end-1. tokens/final (whole sequence, per scale) tell which rows already hold
        final tokens; a source that drafts autoregressively should condition on those."""

    def observe(self, a: int, c: int, probs: list[torch.Tensor], tokens: list[torch.Tensor | None],
                final: list[torch.Tensor]) -> None:
        """After a pass over scales a..a+len(probs)-1 that committed [a, c). Default: nothing."""


WINDOW_POLICIES = ("fixed", "adaptive")


@dataclass
class SJDSettings:
    window: int = 2  # W, in scales
    max_spec_tokens: int = 25  # scales computed on drafted inputs have at most this many tokens
    rule: AcceptRule = AcceptRule()
    window_policy: str = "fixed"  # fixed | adaptive (see the module docstring)
    min_commit_prob: float = 0.25  # adaptive: the least estimated chance that a longer window commits in every row

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window_scales must be an integer >= 1 (1 = no speculation), got {self.window!r}")
        if not isinstance(self.max_spec_tokens, int) or self.max_spec_tokens < 0:
            raise ValueError(f"max_spec_tokens must be an integer >= 0, got {self.max_spec_tokens!r}")
        if self.window_policy not in WINDOW_POLICIES:
            raise ValueError(f"window_policy must be one of {WINDOW_POLICIES}, got {self.window_policy!r}")
        if not 0.0 <= self.min_commit_prob <= 1.0:
            raise ValueError(f"min_commit_prob must be in [0, 1], got {self.min_commit_prob!r}")


@dataclass
class AcceptanceHistory:
    """Per scale: rows tested, and rows whose whole scale was accepted, over every pass so far."""
    rows_tested: dict[int, int] = field(default_factory=dict)
    rows_accepted: dict[int, int] = field(default_factory=dict)

    def add(self, b: int, tested: int, accepted: int) -> None:
        self.rows_tested[b] = self.rows_tested.get(b, 0) + tested
        self.rows_accepted[b] = self.rows_accepted.get(b, 0) + accepted

    def rate(self, b: int) -> float:
        """The chance that one row accepts all of scale b, with one optimistic pseudo-row: 1 before any test,
        so every scale is tried once before the evidence can switch it off."""
        return (self.rows_accepted.get(b, 0) + 1) / (self.rows_tested.get(b, 0) + 1)


def window_end(a: int, sizes: tuple[int, ...], settings: SJDSettings, limit: int | None = None) -> int:
    e, limit = a + 1, len(sizes) if limit is None else limit
    while e < min(a + settings.window, limit) and sizes[e] <= settings.max_spec_tokens:
        e += 1
    return e


class BlockSpeculation(Speculation):
    """The per-run state of Block-SJD; `counters` holds real per-scale acceptance statistics, `history` the
    acceptance over every run that shares it (the adaptive window's estimate)."""

    def __init__(self, source: DraftSource, settings: SJDSettings, stage: str = "",
                 history: AcceptanceHistory | None = None):
        self.source, self.settings, self.stage = source, settings, stage
        self.history = AcceptanceHistory() if history is None else history

    def applies_to(self, stage) -> bool:
        return not self.stage or stage.name == self.stage

    def start(self, engine, batch: int) -> None:
        self.reset(engine.block_sizes, derive_generator(engine.generator, engine.labels_B.device), batch)
        self.source.start(engine, batch, engine.generator)

    def reset(self, block_sizes: tuple[int, ...], verify_generator: Generators, batch: int) -> None:
        self.sizes, self.verify_gen, self.batch = block_sizes, verify_generator, batch
        K = len(self.sizes)
        self.counters = {"passes": 0, "tokens_tested": [0] * K, "tokens_accepted": [0] * K,
                         "rows_tested": [0] * K, "rows_block_accepted": [0] * K, "blocks_per_pass": [],
                         "pass_wall_s": []}
        self._t0 = time.perf_counter()

    def window_end(self, a: int, stage_end: int) -> int:
        self._t0 = time.perf_counter()
        e = window_end(a, self.sizes, self.settings, stage_end)
        if self.settings.window_policy == "fixed":
            return e
        cut, commit_prob = a + 1, 1.0
        while cut < e:  # scale cut - 1 would be drafted: worth it only if every row likely accepts it
            commit_prob *= self.history.rate(cut - 1) ** self.batch
            if commit_prob < self.settings.min_commit_prob:
                break
            cut += 1
        return cut

    def propose(self, a, end, tokens, final):
        drafts = self.source.propose(a, end, tokens, final)
        if len(drafts) != end - a:
            raise RuntimeError(f"draft source {self.source.name!r} returned {len(drafts)} drafts for blocks "
                               f"{a}..{end - 1}")
        return drafts

    def verify(self, b: int, p_BlV, draft: Draft, tokens, final, exact_B, forced_Bl, constrain):
        verdict = verify_block(p_BlV, draft.tokens, draft.q, self.settings.rule, self.verify_gen)
        drawn, accepted = verdict.tokens, verdict.accepted
        if forced_Bl is not None:  # known (teacher-forced) positions are final whatever the test said
            drawn, accepted = constrain(b, drawn)[0], accepted | forced_Bl
        tested = exact_B & ~final[b]
        take = exact_B & ~final[b]
        tokens[b] = drawn if tokens[b] is None else torch.where(take[:, None], drawn, tokens[b])
        final[b] = final[b] | exact_B
        replaced_frac = (~accepted).float().mean(dim=1)
        n = p_BlV.shape[1]
        cnt = self.counters
        cnt["tokens_tested"][b] += int(tested.sum()) * n
        cnt["tokens_accepted"][b] += int((accepted & tested[:, None]).sum())
        cnt["rows_tested"][b] += int(tested.sum())
        cnt["rows_block_accepted"][b] += int((tested & (replaced_frac == 0)).sum())
        self.history.add(b, int(tested.sum()), int((tested & (replaced_frac == 0)).sum()))
        # A row keeps an exact context for scale b+1 only if its scale-b input was the final token map:
        # already final before (its input was the final map) or tested with nothing replaced.
        keeps = ~tested | (replaced_frac <= self.settings.rule.stale_tolerance)
        return exact_B & keeps

    def observe(self, a, c, probs, tokens, final):
        self.source.observe(a, c, probs, tokens, final)
        self.counters["passes"] += 1
        self.counters["blocks_per_pass"].append(c - a)
        self.counters["pass_wall_s"].append(time.perf_counter() - self._t0)

    def summary(self) -> dict:
        cnt = self.counters
        tok_rate = [acc / t if t else None for acc, t in zip(cnt["tokens_accepted"], cnt["tokens_tested"])]
        blk_rate = [acc / r if r else None for acc, r in zip(cnt["rows_block_accepted"], cnt["rows_tested"])]
        return {"passes": cnt["passes"], "blocks_per_pass": cnt["blocks_per_pass"],
                "token_acceptance_per_scale": tok_rate, "block_acceptance_per_scale": blk_rate,
                "tokens_tested_per_scale": cnt["tokens_tested"], "tokens_accepted_per_scale": cnt["tokens_accepted"],
                "rows_tested_per_scale": cnt["rows_tested"], "rows_block_accepted_per_scale": cnt["rows_block_accepted"],
                "pass_wall_s": cnt["pass_wall_s"]}

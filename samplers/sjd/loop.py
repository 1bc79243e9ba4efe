"""Block-SJD: speculative Jacobi decoding over blocks (spec accelerators.md 3.6), model-agnostic.

A block-autoregressive model (VAR: block = scale) is wrapped as a `BlockTarget`; drafts come from a
`DraftSource`. Per iteration, with blocks [0, a) committed:
  1. the window is blocks a..e-1 (at most `window` blocks; blocks computed on drafted inputs, a+1..e-1,
     must have at most `max_spec_tokens` tokens); the source drafts blocks a..e-2;
  2. ONE target forward over the window (committed cache + block-causal mask among the new blocks)
     gives the processed p of every window block;
  3. per row, blocks are verified left to right while the row's context is exact: every token by
     `speculative.verify_block` (independent uniforms, residual draw on rejection). A block with any
     replaced token is an exact sample but makes every later block's p stale for that row. The last
     window block is sampled from p directly (it is not used as an input inside this window);
  4. rows advance independently ("final" tokens per row), but the KV cache is shared by all rows, so
     the commit point c is the first block not final in every row; the target keeps KV of [0, c) and
     rolls back the rest. Tokens a row has already finalised beyond c are never re-tested (re-testing
     would bias the law, spec 3.8); they are fed as inputs and skipped by verification;
  5. the source observes the pass (Jacobi refresh, drafter cache rollback).
Every pass finalises at least block a for every row, so passes <= number of blocks.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from samplers.sjd.verify import AcceptRule, Generators, multinomial_rows, verify_block


@dataclass
class Draft:
    tokens: torch.Tensor  # (B, n) drafted token ids
    q: torch.Tensor | None  # (B, n, V) the law the tokens were drawn from; None = one-hot at the tokens


class BlockTarget(ABC):
    """The model being accelerated, seen as blocks of conditionally independent tokens."""
    block_sizes: tuple[int, ...]
    vocab_size: int

    @abstractmethod
    def window(self, a: int, input_tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """One forward over blocks a..a+len(input_tokens), where input_tokens[i] (B, n) are the (drafted
        or final) tokens of block a+i used to build later inputs. Returns the processed probabilities
        (B, n_b, V) of each of those blocks, from exactly the distribution the plain sampler uses."""

    @abstractmethod
    def commit(self, a: int, c: int, tokens: list[torch.Tensor]) -> None:
        """Blocks a..c-1 are final for every row with `tokens`; keep their KV, roll back the rest."""


class DraftSource(ABC):
    """Proposes drafts for future blocks. Exactness needs only that each Draft's q is the law its tokens
    were drawn from (or q = None), and that drafts never use the verification stream.

    A new source (e.g. a distilled one-step student) subclasses this and is registered with
    `samplers.sjd.drafts.register_draft_source`; deterministic drafts simply return q = None."""
    name: str = ""

    def start(self, target: BlockTarget, batch: int, generator: Generators) -> None:
        self.target, self.batch, self.generator = target, batch, generator

    @abstractmethod
    def propose(self, a: int, end: int, tokens: list[torch.Tensor | None], final: list[torch.Tensor]) -> list[Draft]:
        """Drafts for blocks a..end-1. tokens/final (whole sequence, per block) tell which rows already
        hold final tokens; a source that drafts autoregressively should condition on those."""

    def observe(self, a: int, c: int, probs: list[torch.Tensor], tokens: list[torch.Tensor | None],
                final: list[torch.Tensor]) -> None:
        """After a pass over blocks a..a+len(probs)-1 that committed [a, c). Default: nothing."""


@dataclass
class SJDSettings:
    window: int = 2  # W, in blocks
    max_spec_tokens: int = 25  # blocks computed on drafted inputs have at most this many tokens
    rule: AcceptRule = AcceptRule()

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window_scales must be an integer >= 1 (1 = no speculation), got {self.window!r}")
        if not isinstance(self.max_spec_tokens, int) or self.max_spec_tokens < 0:
            raise ValueError(f"max_spec_tokens must be an integer >= 0, got {self.max_spec_tokens!r}")


def window_end(a: int, sizes: tuple[int, ...], settings: SJDSettings) -> int:
    e = a + 1
    while e < min(a + settings.window, len(sizes)) and sizes[e] <= settings.max_spec_tokens:
        e += 1
    return e


class BlockSJD:
    """Runs the loop; `counters` holds real per-block acceptance statistics and per-pass records."""

    def __init__(self, target: BlockTarget, source: DraftSource, settings: SJDSettings,
                 draft_generator: Generators, verify_generator: Generators):
        self.target, self.source, self.settings = target, source, settings
        self.draft_gen, self.verify_gen = draft_generator, verify_generator
        K = len(target.block_sizes)
        self.counters = {"passes": 0, "tokens_tested": [0] * K, "tokens_accepted": [0] * K,
                         "rows_tested": [0] * K, "rows_block_accepted": [0] * K, "blocks_per_pass": [],
                         "pass_wall_s": []}

    @torch.no_grad()
    def run(self, batch: int, device: torch.device) -> list[torch.Tensor]:
        target, sizes, st = self.target, self.target.block_sizes, self.settings
        K = len(sizes)
        tokens: list[torch.Tensor | None] = [None] * K
        final = [torch.zeros(batch, dtype=torch.bool, device=device) for _ in range(K)]
        self.source.start(target, batch, self.draft_gen)
        a = 0
        while a < K:
            t0 = time.perf_counter()
            e = window_end(a, sizes, st)
            drafts = self.source.propose(a, e - 1, tokens, final) if e - 1 > a else []
            if len(drafts) != e - 1 - a:
                raise RuntimeError(f"draft source {self.source.name!r} returned {len(drafts)} drafts for blocks "
                                   f"{a}..{e - 2}")
            inputs = [d.tokens if tokens[b] is None else torch.where(final[b][:, None], tokens[b], d.tokens)
                      for b, d in zip(range(a, e - 1), drafts)]
            probs = target.window(a, inputs)
            exact_ctx = torch.ones(batch, dtype=torch.bool, device=device)  # rows whose p is exact here
            for b in range(a, e):
                p = probs[b - a]
                if b < e - 1:
                    exact_ctx = self._verify(b, p, drafts[b - a], tokens, final, exact_ctx)
                else:  # last block of the window: a direct draw from p where p is exact
                    drawn = multinomial_rows(p, self.draft_gen)
                    self._finalise(b, drawn, exact_ctx, tokens, final)
            c = a
            while c < K and bool(final[c].all()):
                c += 1
            target.commit(a, c, tokens[a:c])
            self.source.observe(a, c, probs, tokens, final)
            self.counters["passes"] += 1
            self.counters["blocks_per_pass"].append(c - a)
            self.counters["pass_wall_s"].append(time.perf_counter() - t0)
            a = c
        return tokens

    def _finalise(self, b: int, drawn: torch.Tensor, rows: torch.Tensor, tokens, final) -> None:
        take = rows & ~final[b]
        tokens[b] = drawn if tokens[b] is None else torch.where(take[:, None], drawn, tokens[b])
        final[b] = final[b] | rows

    def _verify(self, b: int, p: torch.Tensor, draft: Draft, tokens, final, exact_ctx: torch.Tensor) -> torch.Tensor:
        verdict = verify_block(p, draft.tokens, draft.q, self.settings.rule, self.verify_gen)
        tested = exact_ctx & ~final[b]
        self._finalise(b, verdict.tokens, exact_ctx, tokens, final)
        replaced_frac = (~verdict.accepted).float().mean(dim=1)
        n = p.shape[1]
        cnt = self.counters
        cnt["tokens_tested"][b] += int(tested.sum()) * n
        cnt["tokens_accepted"][b] += int((verdict.accepted & tested[:, None]).sum())
        cnt["rows_tested"][b] += int(tested.sum())
        cnt["rows_block_accepted"][b] += int((tested & (replaced_frac == 0)).sum())
        # A row keeps an exact context for block b+1 only if its block-b input was the final token map:
        # already final before (its input was the final map) or tested with nothing replaced.
        keeps = ~tested | (replaced_frac <= self.settings.rule.stale_tolerance)
        return exact_ctx & keeps

    def summary(self) -> dict:
        cnt = self.counters
        tok_rate = [acc / t if t else None for acc, t in zip(cnt["tokens_accepted"], cnt["tokens_tested"])]
        blk_rate = [acc / r if r else None for acc, r in zip(cnt["rows_block_accepted"], cnt["rows_tested"])]
        return {"passes": cnt["passes"], "blocks_per_pass": cnt["blocks_per_pass"],
                "token_acceptance_per_scale": tok_rate, "block_acceptance_per_scale": blk_rate,
                "tokens_tested_per_scale": cnt["tokens_tested"], "tokens_accepted_per_scale": cnt["tokens_accepted"],
                "rows_tested_per_scale": cnt["rows_tested"], "rows_block_accepted_per_scale": cnt["rows_block_accepted"],
                "pass_wall_s": cnt["pass_wall_s"]}

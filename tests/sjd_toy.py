"""Test harness: Block-SJD's speculation policy driven over an abstract block model (an enumerable toy).

The sampling engine runs the policy on real VARs; this driver runs the very same `BlockSpeculation`
(window choice, verification, counters) over `BlockTarget`s whose joint law can be enumerated, so the
verification maths is tested independently of any transformer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from samplers.sjd.speculation import BlockSpeculation, Draft, DraftSource, SJDSettings  # noqa: F401
from samplers.sjd.verify import multinomial_rows


class BlockTarget(ABC):
    block_sizes: tuple[int, ...]
    vocab_size: int

    @abstractmethod
    def window(self, a: int, input_tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Processed probabilities (B, n_b, V) of blocks a..a+len(input_tokens)."""

    @abstractmethod
    def commit(self, a: int, c: int, tokens: list[torch.Tensor]) -> None:
        """Blocks a..c-1 are final for every row."""


class BlockSJD:
    def __init__(self, target: BlockTarget, source: DraftSource, settings: SJDSettings, draft_generator, verify_generator,
                 history=None):
        self.target, self.draft_gen, self.verify_gen = target, draft_generator, verify_generator
        self.spec = BlockSpeculation(source, settings, history=history)

    @property
    def counters(self) -> dict:
        return self.spec.counters

    def summary(self) -> dict:
        return self.spec.summary()

    @torch.no_grad()
    def run(self, batch: int, device: torch.device) -> list[torch.Tensor]:
        target, spec = self.target, self.spec
        K = len(target.block_sizes)
        spec.reset(target.block_sizes, self.verify_gen, batch)
        spec.source.start(target, batch, self.draft_gen)
        tokens: list[torch.Tensor | None] = [None] * K
        final = [torch.zeros(batch, dtype=torch.bool, device=device) for _ in range(K)]
        a = 0
        while a < K:
            e = spec.window_end(a, K)
            drafts = spec.propose(a, e - 1, tokens, final) if e - 1 > a else []
            inputs = [d.tokens if tokens[b] is None else torch.where(final[b][:, None], tokens[b], d.tokens)
                      for b, d in zip(range(a, e - 1), drafts)]
            probs = target.window(a, inputs)
            exact = torch.ones(batch, dtype=torch.bool, device=device)
            for b in range(a, e):
                if b < e - 1:
                    exact = spec.verify(b, probs[b - a], drafts[b - a], tokens, final, exact, None, None)
                else:
                    drawn = multinomial_rows(probs[b - a], self.draft_gen)
                    take = exact & ~final[b]
                    tokens[b] = drawn if tokens[b] is None else torch.where(take[:, None], drawn, tokens[b])
                    final[b] = final[b] | exact
            c = a
            while c < K and bool(final[c].all()):
                c += 1
            target.commit(a, c, tokens[a:c])
            spec.observe(a, c, probs, tokens, final)
            a = c
        return tokens

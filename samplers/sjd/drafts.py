"""Draft sources for Block-SJD: Jacobi self-drafting, random drafts, a small VAR drafter, and the registry.

Each source only has to report the law q its drafts were drawn from (or q = None for a point mass); the
verification in `samplers.sjd.verify` makes the output exact whatever the drafts are. Drafts are drawn
from the caller's generator ("draft stream"), never from the verification stream.

Adding a source (e.g. the distilled-decoding student, which drafts deterministically from shared noise
with q = None): subclass `DraftSource` and register a factory `(sampler) -> DraftSource`:

    @register_draft_source("dd")
    def _dd(sampler):
        return DDDraft(sampler.draft_models["student"])

then `build_sampler("sjd", ..., student=model, draft="dd")`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from einops import rearrange

from samplers.engine import conditions
from samplers.sjd.speculation import Draft, DraftSource
from samplers.sjd.verify import Generators, multinomial_rows, rand_rows

_SOURCES: dict[str, Callable] = {}


def register_draft_source(name: str):
    def wrap(factory: Callable) -> Callable:
        if name in _SOURCES:
            raise KeyError(f"draft source {name!r} is already registered")
        _SOURCES[name] = factory
        return factory
    return wrap


def available_draft_sources() -> list[str]:
    return sorted(_SOURCES)


def build_draft_source(name: str, sampler) -> DraftSource:
    if name not in _SOURCES:
        raise ValueError(f"unknown draft source {name!r}; available: {', '.join(available_draft_sources())}")
    return _SOURCES[name](sampler)


# ---- initial drafts (blocks that never had a p) ------------------------------------------------------------
def repeat_previous(prev_Bm: torch.Tensor, n: int) -> torch.Tensor:
    """Nearest-neighbour 'repeat' prior: block b's draft copies the spatially matching token of block b-1
    (2-D when both blocks are square maps, else along the flattened order)."""
    m = prev_Bm.shape[1]
    side_m, side_n = math.isqrt(m), math.isqrt(n)
    if side_m * side_m == m and side_n * side_n == n:
        rows = torch.arange(side_n, device=prev_Bm.device) * side_m // side_n
        idx = (rows[:, None] * side_m + rows[None, :]).reshape(-1)
    else:
        idx = torch.arange(n, device=prev_Bm.device) * m // n
    return prev_Bm[:, idx]


def initial_draft(init: str, b: int, batch: int, target, previous: torch.Tensor | None,
                  generator: Generators, device: torch.device) -> Draft:
    n, V = target.block_sizes[b], target.vocab_size
    if init == "repeat" and previous is not None:
        return Draft(repeat_previous(previous, n), None)
    u = rand_rows((batch, n), generator, device)  # uniform token ids; q is one-hot (law not used)
    return Draft((u * V).long().clamp_(max=V - 1), None)


def _current(b: int, tokens, final, drafts_so_far: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """Best known token map of block b: final tokens where final, else the draft of this proposal."""
    draft = drafts_so_far.get(b)
    if tokens[b] is None:
        return draft
    return tokens[b] if draft is None else torch.where(final[b][:, None], tokens[b], draft)


class RandomDraft(DraftSource):
    """Uniform random (or 'repeat') drafts with one-hot q and no refresh: the garbage-draft baseline."""
    name = "random"

    def __init__(self, init: str = "random"):
        if init not in ("random", "repeat"):
            raise ValueError(f"draft_init must be 'random' or 'repeat', got {init!r}")
        self.init = init

    def propose(self, a, end, tokens, final):
        out: dict[int, torch.Tensor] = {}
        drafts = []
        device = final[a].device
        for b in range(a, end):
            prev = _current(b - 1, tokens, final, out) if b > 0 else None
            d = initial_draft(self.init, b, self.batch, self.target, prev, self.generator, device)
            out[b] = d.tokens
            drafts.append(d)
        return drafts


class JacobiDraft(RandomDraft):
    """Faithful SJD self-drafting: blocks after the commit point get new drafts sampled from this pass's
    (stale-context) p, with q := that p; blocks that never had a p use the initial rule."""
    name = "jacobi"

    def start(self, target, batch, generator):
        super().start(target, batch, generator)
        self.refreshed: dict[int, Draft] = {}

    def propose(self, a, end, tokens, final):
        out: dict[int, torch.Tensor] = {}
        drafts = []
        device = final[a].device
        for b in range(a, end):
            d = self.refreshed.get(b)
            if d is None:
                prev = _current(b - 1, tokens, final, out) if b > 0 else None
                d = initial_draft(self.init, b, self.batch, self.target, prev, self.generator, device)
            out[b] = d.tokens
            drafts.append(d)
        return drafts

    def observe(self, a, c, probs, tokens, final):
        self.refreshed = {b: d for b, d in self.refreshed.items() if b >= a + len(probs)}
        for b in range(c, a + len(probs)):
            p = probs[b - a]
            self.refreshed[b] = Draft(multinomial_rows(p, self.generator), p)


class VARDraft(DraftSource):
    """A (small) VAR with the same tokenizer drafts the window autoregressively with its own KV cache, under
    the same processing (CFG ramp on the global scale index, top-k, top-p, temperature); q is its processed
    distribution. Its cache keeps every scale whose input was built from committed tokens only."""
    name = "var"

    def __init__(self, model, model_name: str = "draft_var"):
        self.model, self.model_name = model, model_name

    def start(self, target, batch, generator):
        super().start(target, batch, generator)
        self.cond_2BD = conditions(self.model, target.labels_B)
        self.cache = self.model.new_cache()
        self.n_fed = 0  # scales held in the drafter's cache
        self.used: dict[int, torch.Tensor] = {}  # drafted token maps that built later inputs of the cache
        self.kv_peak = 0

    def _valid_prefix(self, a: int) -> int:
        first_bad = a
        for s, used in self.used.items():
            if s < a and not torch.equal(used, self.target.tokens[s]):
                first_bad = min(first_bad, s)
        return min(self.n_fed, first_bad + 1, a)  # scale a is re-fed: its logits are needed

    def propose(self, a, end, tokens, final):
        t, model, vae = self.target, self.model, self.target.vae
        v = self._valid_prefix(a)
        self.cache.truncate(model.begin_ends[v][0])
        self.used = {}  # rebuilt: the cache now only holds inputs made from committed tokens (scales <= v)
        first, f_hat, drafts, out = v, t.f_hat, [], {}
        x_in = [t.inputs[s] for s in range(max(first, 1), a + 1)]  # committed inputs of scales first..a
        for b in range(a, end):
            maps = x_in if b == a else [next_map]
            x = model.embed(self.cond_2BD, torch.cat(maps, 1).repeat(2, 1, 1) if maps else None, first, b + 1)
            t.stats.count_forward(self.model_name, x)
            hidden = model.run_blocks(x, self.cond_2BD, self.cache, scale_begin=first)
            self.kv_peak = max(self.kv_peak, self.cache.nbytes())
            hidden = hidden[:, hidden.shape[1] - model.patch_nums[b] ** 2:]
            d, q = t.draw_with_law(model.logits(hidden, self.cond_2BD), b)  # the target's own token rule
            if tokens[b] is not None:  # condition later drafts on rows' final tokens
                d = torch.where(final[b][:, None], tokens[b], d)
            drafts.append(Draft(d, q))
            out[b] = d
            if b + 1 < end:
                f_hat, nxt = vae.quantize.next_input(b, f_hat, vae.quantize.lookup(d, model.patch_nums[b]))
                next_map = rearrange(nxt, "b c h w -> b (h w) c")
                self.used[b] = d
            first = b + 1
        self.n_fed = end
        return drafts

    def observe(self, a, c, probs, tokens, final):
        t = self.target
        t.stats.extra["kv_bytes_peak_draft"] = max(t.stats.extra.get("kv_bytes_peak_draft", 0), self.kv_peak)


@register_draft_source("jacobi")
def _jacobi(sampler) -> DraftSource:
    return JacobiDraft(sampler.draft_init)


@register_draft_source("random")
def _random(sampler) -> DraftSource:
    return RandomDraft(sampler.draft_init)


@register_draft_source("var")
def _var(sampler) -> DraftSource:
    model = sampler.draft_models.get("draft_model")
    if model is None:
        raise ValueError("draft='var' needs a drafting VAR: pass draft_model=<VAR> (sample.py: --model draft_model=PATH), "
                         "e.g. the shipped refiner; it must share the target's tokenizer")
    return VARDraft(model)

"""KV-cache compression policies that any sampler applies to its cache after each scale.

A policy is asked once per layer after the forward of scale k (the current map was attended in full
while it was generated; compression only affects later scales). Three policies share one interface:

* `SelectionPolicy` — score-based per-head top-k (ScaleKV with per-(layer, scale) budgets from an
  ASI calibration, or uniform SnapKV-style budgets): scores of every cached key from a 4x4 grid of
  observation queries of the current map, pooled along the sequence, window always kept.
* `WindowPolicy` — sliding window: the most recent `budget` entries of every layer.

Budgets count cache entries per (row, head) of one layer; every head of a compressed layer ends with
exactly its budget. Rows (including the CFG half) and heads are selected independently.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from samplers.engine import CachePolicy
from var.kv_cache import KVCache

WINDOW_GRID = 4  # observation window: centres of a 4x4 grid of patches of the current map


def scale_lengths(patch_nums) -> list[int]:
    """Cumulative sequence length after each scale, e.g. (1,2,3) -> [1, 5, 14]."""
    out, total = [], 0
    for p in patch_nums:
        total += p * p
        out.append(total)
    return out


def peak_cache_len(patch_nums) -> int:
    """The largest cache a sampler ever compresses: everything before the last map (424 for 256px)."""
    return scale_lengths(patch_nums)[-2]


@lru_cache(maxsize=None)  # asked for once per layer and scale: built once per map size (read-only)
def window_offsets(pn: int, window: int = WINDOW_GRID * WINDOW_GRID) -> torch.Tensor:
    """Row-major offsets inside a pn x pn map of the observation window.

    From 4x4 maps on: the centre token of each cell of a 4x4 grid (16 queries), as the authors' code places
    it: cells of side pn // 4 from the top-left, centre (side - 1) // 2 inside each (8x8 -> rows 0, 2, 4, 6).
    A smaller map has fewer than 16 tokens, so all of its tokens form the window. (The authors fall back to
    the 16 most recent positions there, whose queries reach into earlier scales that the current forward
    never computed — their code clamps those to the map's first query; we keep the real queries instead.
    In practice no budget compresses a cache before the 4x4 map.)
    """
    if pn < WINDOW_GRID:
        return torch.arange(pn * pn)
    cell = pn // WINDOW_GRID
    centres = torch.arange(WINDOW_GRID) * cell + (cell - 1) // 2
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    return (rows * pn + cols).flatten()[:window]


def window_size(pn: int) -> int:
    return min(pn * pn, WINDOW_GRID * WINDOW_GRID)


def window_cache_index(layer_len: int, pn: int) -> torch.Tensor:
    """Indices into a layer cache (the current map = its last pn*pn entries) of the always-kept window."""
    return layer_len - pn * pn + window_offsets(pn)


def pool_scores(scores_BHL: torch.Tensor, pooling: str, kernel: int,
                exclude_idx: torch.Tensor | None = None) -> torch.Tensor:
    """1-D pooling along the flattened sequence, per head (reference: max pooling, kernel 5, same padding).

    exclude_idx: entries (the observation window, always kept) that take no part in the pooling, as the
    authors' code masks them to -inf before it pools: their strong self-scores must not spread to their
    neighbours. Average pooling averages over the remaining entries (an -inf would poison its neighbours)."""
    if pooling not in ("max", "avg", "none"):
        raise ValueError(f"pooling must be 'max', 'avg' or 'none', got {pooling!r}")
    if pooling == "none" or kernel <= 1:
        return scores_BHL.clone()
    B, H, L = scores_BHL.shape
    flat = scores_BHL.reshape(B * H, 1, L).float()
    if exclude_idx is not None:
        exclude_idx = exclude_idx.to(scores_BHL.device)
    if pooling == "max":
        masked = flat if exclude_idx is None else flat.index_fill(-1, exclude_idx, float("-inf"))
        pooled = F.max_pool1d(masked, kernel, stride=1, padding=kernel // 2)
    else:
        valid_L = torch.ones(L, dtype=torch.bool, device=scores_BHL.device)
        if exclude_idx is not None:
            valid_L[exclude_idx] = False
        weight = valid_L.float().expand_as(flat)
        total = F.avg_pool1d(flat.masked_fill(~valid_L, 0.0), kernel, stride=1, padding=kernel // 2)
        count = F.avg_pool1d(weight, kernel, stride=1, padding=kernel // 2)
        pooled = (total / count.clamp_min(1e-12)).masked_fill(count == 0, float("-inf"))
    return pooled[..., :L].reshape(B, H, L)


def select_topk(scores_BHL: torch.Tensor, keep_idx: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices (B, H, budget), in positional order: the always-kept entries `keep_idx` plus the best-scoring others.

    A budget smaller than the window (tiny models at small budget fractions) cannot keep it whole: then
    every entry, window included, competes on its score. Ties go to the earlier position, exactly as a stable
    sort by descending score would break them, but without the sort: a `topk` finds the budget-th largest
    score, every entry above it is kept, and the earliest entries equal to it fill the remaining slots.
    """
    if budget < 1:
        raise ValueError(f"a KV budget must keep at least 1 entry, got {budget}; raise the budget fraction")
    B, H, L = scores_BHL.shape
    if budget > L:
        raise ValueError(f"a KV budget of {budget} entries exceeds the {L} entries the layer holds")
    ranked_BHL = scores_BHL.float()
    if budget >= keep_idx.numel():
        ranked_BHL = ranked_BHL.index_fill(-1, keep_idx.to(ranked_BHL.device), float("inf"))
    kth_BH1 = ranked_BHL.topk(budget, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above_BHL = ranked_BHL > kth_BH1
    at_BHL = ranked_BHL == kth_BH1
    free_BH1 = budget - above_BHL.sum(dim=-1, keepdim=True)
    keep_BHL = above_BHL | (at_BHL & (at_BHL.cumsum(dim=-1) <= free_BH1))
    # every (row, head) keeps exactly `budget` entries: kept entry number r goes to slot r, the rest to a spare
    # slot that is dropped (a scatter, not nonzero: no host sync on CUDA, fixed shapes)
    slot_BHL = torch.where(keep_BHL, keep_BHL.cumsum(dim=-1) - 1, budget)
    pos_BHL = torch.arange(L, device=scores_BHL.device).expand(B, H, L)
    return pos_BHL.new_zeros(B, H, budget + 1).scatter_(-1, slot_BHL, pos_BHL)[..., :budget]


@dataclass
class CompressionRecord:
    """What a policy did at one scale: entries per layer before and after (per head)."""
    scale: int
    before: list[int]
    after: list[int]


class KVPolicy(CachePolicy):
    """Interface: `layer_budgets(num_layers, patch_nums, si, lens)` -> per-layer budgets or None, and
    `choose(cache, model, layer, si, budget)` -> kept indices (B, H, budget); `compress` applies them."""
    name = "none"

    def layer_budgets(self, num_layers: int, patch_nums, si: int, lens: list[int]) -> list[int] | None:
        raise NotImplementedError

    def choose(self, cache: KVCache, model, layer: int, si: int, budget: int, queries) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def compress(self, cache: KVCache, model, si: int, queries=None) -> CompressionRecord:
        """Compress every layer of `cache` after scale si was committed (no-op at the last scale).
        queries[layer] (B, H, r, c): the `query_rows` of scale si's queries (the engine's recorder)."""
        lens = [cache.layer_len(i) for i in range(cache.num_layers)]
        budgets = None if si >= len(model.patch_nums) - 1 else self.layer_budgets(cache.num_layers, model.patch_nums, si, lens)
        if budgets is not None:
            for layer, (n, b) in enumerate(zip(lens, budgets)):
                if b < n:
                    cache.select(layer, self.choose(cache, model, layer, si, b, queries))
        return CompressionRecord(si, lens, [cache.layer_len(i) for i in range(cache.num_layers)])


class WindowPolicy(KVPolicy):
    """Sliding window at a uniform budget: the most recent `budget` cache entries of every layer."""
    name = "window"

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"window budget must be >= 1 entry, got {budget}")
        self.budget = int(budget)

    def layer_budgets(self, num_layers, patch_nums, si, lens):
        return [self.budget] * num_layers if max(lens) > self.budget else None

    def choose(self, cache, model, layer, si, budget, queries):
        B, H, n, _ = (k := cache.layer_keys(layer)).shape
        return torch.arange(n - budget, n, device=k.device).expand(B, H, budget)


class SelectionPolicy(KVPolicy):
    """Score-based selection (ScaleKV / SnapKV). `budget_fn(num_layers, patch_nums, si, lens)` returns the
    per-layer budgets of scale si (or None: no compression at this scale).

    Switches (spec 2.4 step 5): score 'logits' (reference: sum of pre-softmax q.k) or 'softmax' (paper);
    pooling 'max' (reference) | 'avg' (paper) | 'none'; per_head True (reference) or head-shared.
    Scores use exactly the layer's attention logits: L2-normalised q, k with the learned head scale.
    """
    needs_queries = True

    def __init__(self, budget_fn, name: str = "selection", score: str = "logits", pooling: str = "max",
                 kernel: int = 5, per_head: bool = True):
        if score not in ("logits", "softmax"):
            raise ValueError(f"score must be 'logits' or 'softmax', got {score!r}")
        if pooling not in ("max", "avg", "none"):
            raise ValueError(f"pooling must be 'max', 'avg' or 'none', got {pooling!r}")
        self.budget_fn, self.name = budget_fn, name
        self.score, self.pooling, self.kernel, self.per_head = score, pooling, kernel, per_head

    def layer_budgets(self, num_layers, patch_nums, si, lens):
        return self.budget_fn(num_layers, patch_nums, si, lens)

    def query_rows(self, pn: int) -> torch.Tensor:
        """Only the observation window's queries are read: the engine keeps those rows, not whole maps."""
        return window_offsets(pn)

    def window_queries(self, model, layer: int, si: int, queries) -> torch.Tensor:
        """(B, H, |W|, c) float32 queries of the observation window of scale si, from `queries[layer]`: either
        the window rows (what the engine records, `query_rows`) or all pn*pn queries of the scale."""
        q_BHlc = None if queries is None else queries[layer]
        if q_BHlc is None:
            raise RuntimeError("score-based KV compression needs the forward's queries (the engine records them "
                               "through the model's attention observer when policy.needs_queries)")
        pn = model.patch_nums[si]
        if q_BHlc.shape[2] == window_size(pn):  # the window rows already (for pn <= 4 also the whole map)
            return q_BHlc.float()
        if q_BHlc.shape[2] != pn * pn:
            raise ValueError(f"queries of layer {layer} hold {q_BHlc.shape[2]} positions, but scale {si} has "
                             f"{pn * pn} ({window_size(pn)} in its observation window); pass that scale's queries only")
        return q_BHlc.index_select(2, window_offsets(pn).to(q_BHlc.device)).float()

    def window_logits(self, cache: KVCache, model, layer: int, si: int, queries) -> torch.Tensor:
        """(B, H, |W|, L_layer) attention logits of the window queries of scale si on the whole layer cache,
        computed by the layer itself (`attention_logits`: its normalised q, cached k, its scale)."""
        k = cache.layer_keys(layer)
        return model.blocks[layer].attn.attention_logits(self.window_queries(model, layer, si, queries), k)

    def scores(self, cache: KVCache, model, layer: int, si: int, queries,
               window: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, L_layer) pooled importance of every cached entry for the window queries of scale si. The window
        entries (`window_cache_index`, passed in when the caller has it) take no part in the pooling and keep
        their own raw score: they are kept whenever the budget holds the window, and compete on that score
        only when it does not (tiny budgets)."""
        if self.score == "softmax":
            scores = self.window_logits(cache, model, layer, si, queries).softmax(dim=-1).sum(dim=2)
        else:
            # logits are linear in q: the sum over the window of q_w . k is (sum_w q_w) . k, one query per head
            q_sum_BH1c = self.window_queries(model, layer, si, queries).sum(dim=2, keepdim=True)
            scores = model.blocks[layer].attn.attention_logits(q_sum_BH1c, cache.layer_keys(layer)).squeeze(2)
        if not self.per_head:
            scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
        if window is None:
            window = window_cache_index(cache.layer_len(layer), model.patch_nums[si])
        window = window.to(scores.device)
        pooled = pool_scores(scores, self.pooling, self.kernel, exclude_idx=window)
        pooled.index_copy_(-1, window, scores.index_select(-1, window).to(pooled.dtype))
        return pooled

    def choose(self, cache, model, layer, si, budget, queries):
        window = window_cache_index(cache.layer_len(layer), model.patch_nums[si]).to(cache.layer_keys(layer).device)
        return select_topk(self.scores(cache, model, layer, si, queries, window), window, budget)


# ---- budget functions ---------------------------------------------------------------------------
def uniform_budget(budget: int):
    """SnapKV-style: the same budget for every layer, whenever a layer holds more than it."""
    def fn(num_layers, patch_nums, si, lens):
        return [budget] * num_layers if max(lens) > budget else None
    return fn


def budget_tokens(budget_frac: float, patch_nums) -> int:
    """Budget in cache entries from a fraction of the peak cache (spec 2.5: fraction of 424 at 256px)."""
    if not 0.0 < budget_frac <= 1.0:
        raise ValueError(f"budget_frac must be in (0, 1] (a fraction of the peak cache of "
                         f"{peak_cache_len(patch_nums)} entries), got {budget_frac}")
    return max(1, round(budget_frac * peak_cache_len(patch_nums)))

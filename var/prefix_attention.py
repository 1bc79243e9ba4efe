"""Attention over block-structured masks as a few prefix attentions.

In next-scale models every query of a scale sees a *prefix* of the sequence: the block-causal mask of VAR (a
scale sees every coarser scale and itself) and the level-sibling mask of the distilled student (coarser
levels, and the slot itself). One SDPA call over the full (L, L) mask computes every masked-out score too:
at the 10-scale schedule (L = 680) 38 % of the score matrix is above the prefixes. Split into row segments,
each attending only to the keys up to its last visible column, the same attention costs the block-causal
area (62 % of L^2), and a segment whose rows see their whole prefix needs no mask at all (the faster path of
the fused kernels). Scales too small to be worth a call of their own are merged with their neighbours.

`prefix_segments` plans the segments once per mask; `segmented_attention` runs them. The result equals the
one-call attention up to float rounding (tests/test_prefix_attention.py), forward and backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_SEGMENT_QUERIES = 64  # a scale with fewer queries joins the segment before it (one call less)


@dataclass(frozen=True)
class Segment:
    q_begin: int
    q_end: int
    k_end: int  # the rows [q_begin, q_end) see no key at or beyond k_end
    masked: bool  # some key below k_end is hidden from some row: the mask slice is needed


def prefix_segments(visible_LL: torch.Tensor, bounds: list[int],
                    min_queries: int = MIN_SEGMENT_QUERIES) -> tuple[Segment, ...]:
    """Segments of a boolean visibility matrix (query row, key column) whose row blocks end on `bounds` (the
    cumulative scale ends, last = L). Blocks with fewer than `min_queries` rows join the block before them."""
    L = visible_LL.shape[0]
    if visible_LL.shape != (L, L) or not bounds or bounds[-1] != L:
        raise ValueError(f"need a square visibility matrix and scale ends ending at its size {L}, got "
                         f"{tuple(visible_LL.shape)} and {bounds}")
    starts, begin = [], 0
    for end in bounds:
        if not starts or end - begin >= min_queries:
            starts.append(begin)
        begin = end
    segments = []
    for qb, qe in zip(starts, starts[1:] + [L]):
        rows = visible_LL[qb:qe]
        cols = rows.any(dim=0).nonzero()
        ke = int(cols.max()) + 1 if cols.numel() else 1
        segments.append(Segment(qb, qe, ke, not bool(rows[:, :ke].all())))
    return tuple(segments)


def segmented_attention(q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, bias_11LL: torch.Tensor,
                        segments: tuple[Segment, ...], scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA of q over (k, v) under the additive mask `bias`, one call per segment on its key prefix."""
    outs = []
    for s in segments:
        mask = bias_11LL[..., s.q_begin:s.q_end, :s.k_end].to(q_BHLc.dtype) if s.masked else None
        outs.append(F.scaled_dot_product_attention(q_BHLc[:, :, s.q_begin:s.q_end], k_BHLc[:, :, :s.k_end],
                                                   v_BHLc[:, :, :s.k_end], attn_mask=mask, dropout_p=dropout_p,
                                                   scale=scale))
    return torch.cat(outs, dim=2)

"""What a KV-cache policy sees of a forward's attention: the query rows it asks for, scale by scale.

A policy that scores cache entries (ScaleKV, SnapKV) reads some queries of the scale just committed: its
observation window, 16 of a map's pn*pn rows. Holding every layer's whole query tensor until the commit costs
memory and time (on the v2 drafter at batch 16 30-45 ms per call, 4-6 %: with glibc's defaults the later
forwards then take fresh pages from the kernel), so the recorder copies only the asked-for rows as each layer
runs. It keeps them for every scale the forward computed: a speculative forward learns which scales are
committed only after verification.

Letters: B rows (the CFG halves included), H heads, l a forward's query positions, r recorded rows, c head dim.
"""
from __future__ import annotations

from typing import Callable

import torch

from var import VAR

# rows_of(pn) -> row offsets inside a pn x pn map (row-major) that the policy reads, or None for all of them
RowsOf = Callable[[int], torch.Tensor | None]


class QueryRecorder:
    """The model's attention observer for one running stage (see `VAR.run_blocks(..., observer=)`)."""

    def __init__(self, model: VAR, rows_of: RowsOf):
        self.model, self.rows_of = model, rows_of
        self.queries_BHrc: list[torch.Tensor | None] = [None] * model.depth
        self._plans: dict[tuple, tuple[torch.Tensor | None, dict[int, tuple[int, int]]]] = {}
        self._index: torch.Tensor | None = None  # rows of the forward's queries to keep; None: all of them
        self._spans: dict[int, tuple[int, int]] = {}  # scale -> its rows in what is kept

    def start(self, first: int, end: int, device: torch.device) -> None:
        """A forward over scales [first, end) begins: forget the previous one's queries, plan which rows to keep."""
        key = (first, end, str(device))
        if key not in self._plans:
            self._plans[key] = self._plan(first, end, device)
        self._index, self._spans = self._plans[key]
        self.queries_BHrc = [None] * self.model.depth

    def _plan(self, first: int, end: int, device: torch.device):
        base = self.model.begin_ends[first][0]
        parts, spans, kept, every_row = [], {}, 0, True
        for si in range(first, end):
            begin, stop = self.model.begin_ends[si]
            rows = self.rows_of(self.model.patch_nums[si])
            every_row &= rows is None
            rows = torch.arange(stop - begin) if rows is None else rows
            parts.append(rows + (begin - base))
            spans[si] = (kept, kept + rows.numel())
            kept += rows.numel()
        return (None if every_row else torch.cat(parts).to(device)), spans

    def __call__(self, layer: int, q_BHlc: torch.Tensor, k_BHLc: torch.Tensor) -> None:
        self.queries_BHrc[layer] = q_BHlc if self._index is None else q_BHlc.index_select(2, self._index)

    def for_scale(self, si: int) -> list[torch.Tensor | None]:
        """Per layer, the recorded rows of scale si (B, H, r, c), in the order `rows_of` gave them."""
        if si not in self._spans:
            raise ValueError(f"scale {si} was not computed by the recorded forward (scales {sorted(self._spans)})")
        a, b = self._spans[si]
        return [None if q is None else q[:, :, a:b] for q in self.queries_BHrc]

    def clear(self) -> None:
        """Drop the recorded rows (called after the commit: never part of the next forward's memory peak)."""
        self.queries_BHrc = [None] * self.model.depth

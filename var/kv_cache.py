"""Per-layer key/value cache that samplers own and drive one scale (or several) at a time.

Each layer holds keys and values of shape (B, H, L_layer, head_dim). Layers may hold different
lengths (cache compression keeps per-layer budgets); within a layer every head and row keeps the
same number of entries, so tensors stay dense. `positions` records which sequence positions a
layer's entries come from, so compression and rollback stay explicit and checkable.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, record_queries: bool = False):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # (B, H, L_layer) int64 sequence positions of the cached entries (rows/heads may differ after compression)
        self.positions: list[torch.Tensor | None] = [None] * num_layers
        # The queries of the latest forward per layer, for score-based compression (e.g. ScaleKV).
        self.record_queries = record_queries
        self.queries: list[torch.Tensor | None] = [None] * num_layers
        self.seq_len = 0  # number of sequence positions fed so far (committed + just appended)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def append(self, layer: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this forward's keys/values (sequence positions start..start+l) and return the full cache."""
        B, H, l, _ = k_BHlc.shape
        pos = torch.arange(start, start + l, device=k_BHlc.device).expand(B, H, l)
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer], self.positions[layer] = k_BHlc, v_BHlc, pos
        else:
            self.keys[layer] = torch.cat((self.keys[layer], k_BHlc), dim=2)
            self.values[layer] = torch.cat((self.values[layer], v_BHlc), dim=2)
            self.positions[layer] = torch.cat((self.positions[layer], pos), dim=2)
        return self.keys[layer], self.values[layer]

    def layer_len(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else k.shape[2]

    def truncate(self, seq_len: int) -> None:
        """Roll back: drop every entry whose sequence position is >= seq_len (e.g. rejected speculation)."""
        for layer in range(self.num_layers):
            if self.keys[layer] is None:
                continue
            keep = self.positions[layer][0, 0] < seq_len  # positions are sorted and equal across rows/heads
            if not bool((self.positions[layer] < seq_len).eq(keep).all()):
                raise RuntimeError("cannot truncate a cache whose rows/heads hold different positions")
            self.keys[layer] = self.keys[layer][:, :, keep]
            self.values[layer] = self.values[layer][:, :, keep]
            self.positions[layer] = self.positions[layer][:, :, keep]
        self.seq_len = min(self.seq_len, seq_len)

    def select(self, layer: int, index_BHk: torch.Tensor) -> None:
        """Keep, per row and head, the entries at `index_BHk` (indices into the layer's current cache)."""
        idx = index_BHk.sort(dim=-1).values  # keep positional order
        gather = idx.unsqueeze(-1).expand(-1, -1, -1, self.keys[layer].shape[-1])
        self.keys[layer] = self.keys[layer].gather(2, gather)
        self.values[layer] = self.values[layer].gather(2, gather)
        self.positions[layer] = self.positions[layer].gather(2, idx)

    def nbytes(self) -> int:
        """Bytes held by key and value tensors (what a KV-memory figure should count)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def clear(self) -> None:
        n = self.num_layers
        self.keys, self.values, self.positions, self.queries = [None] * n, [None] * n, [None] * n, [None] * n
        self.seq_len = 0

"""Per-layer key/value cache that samplers own and drive one scale (or several) at a time.

The cache is static: at a layer's first append it allocates keys and values for the whole sequence,
(B, H, max_len, head_dim), plus (B, H, max_len) int64 positions, and later writes land in place. Every
read returns the used prefix `[:, :, :len]` as a view. Fixed buffers give each scale's forward fixed
shapes and fixed addresses, so it can be compiled and, on CUDA, replayed as a CUDA graph.

Layers may hold different lengths (compression keeps per-layer budgets); within a layer every head and
row keeps the same number of entries, so tensors stay dense. `positions` records which sequence
positions a layer's entries come from, so compression and rollback stay explicit and checkable.
"""
from __future__ import annotations

import torch


class KVCache:
    """`max_len`: sequence positions a layer can hold (the model's seq_len, see `VAR.new_cache`).
    `dtype`: storage dtype of keys/values (default: the dtype of the first keys; e.g. bf16 on CUDA).
    """

    def __init__(self, num_layers: int, max_len: int, *, dtype: torch.dtype | None = None):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 (the model's sequence length), got {max_len}")
        self.max_len, self.dtype = int(max_len), dtype
        self._k: list[torch.Tensor | None] = [None] * num_layers  # (B, H, max_len, c) buffers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._pos: list[torch.Tensor | None] = [None] * num_layers  # (B, H, max_len) int64
        self._len = [0] * num_layers  # used entries per layer
        self.seq_len = 0  # number of sequence positions fed so far (committed + just appended)

    @property
    def num_layers(self) -> int:
        return len(self._k)

    # ---- views of the used entries ----------------------------------------------------------------
    def _used(self, bufs: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return [None if b is None else b[:, :, :n] for b, n in zip(bufs, self._len)]

    @property
    def keys(self) -> list[torch.Tensor | None]:
        """Per layer (B, H, len, c) views of the cached keys (None before the layer's first append)."""
        return self._used(self._k)

    @property
    def values(self) -> list[torch.Tensor | None]:
        return self._used(self._v)

    @property
    def positions(self) -> list[torch.Tensor | None]:
        """Per layer (B, H, len) int64 sequence positions of the cached entries (rows/heads may differ after compression)."""
        return self._used(self._pos)

    def layer_len(self, layer: int) -> int:
        return self._len[layer]

    def layer_keys(self, layer: int) -> torch.Tensor:
        """(B, H, len, c) view of one layer's cached keys (`keys[layer]` without building every layer's view)."""
        if self._k[layer] is None:
            raise ValueError(f"layer {layer} has no cached keys yet; run a forward with this cache first")
        return self._k[layer].narrow(2, 0, self._len[layer])

    # ---- allocation ------------------------------------------------------------------------------
    def allocate(self, batch: int, num_heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        """Create every layer's buffers now (idempotent). Compiled forwards call this before tracing so the
        buffers are inputs with fixed addresses, never tensors born inside a graph."""
        for layer in range(self.num_layers):
            self._ensure(layer, batch, num_heads, head_dim, dtype, torch.device(device))

    def _ensure(self, layer: int, B: int, H: int, c: int, dtype: torch.dtype, device: torch.device) -> None:
        dtype = self.dtype or dtype
        k = self._k[layer]
        if k is not None and k.shape == (B, H, self.max_len, c) and k.device == device:
            return
        if k is not None and self._len[layer]:
            raise ValueError(f"layer {layer} caches (B, H, c) = {tuple(k.shape[:2]) + (k.shape[3],)} but got keys of "
                             f"{(B, H, c)}; use one cache per batch (or clear() it first)")
        shape = (B, H, self.max_len, c)
        # uninitialised: only the written prefix [:len] is ever read (views), so zero-filling is wasted work
        self._k[layer] = torch.empty(shape, dtype=dtype, device=device)
        self._v[layer] = torch.empty(shape, dtype=dtype, device=device)
        self._pos[layer] = torch.empty(shape[:3], dtype=torch.int64, device=device)

    def buffers(self) -> list[torch.Tensor]:
        """Every allocated buffer (keys, values, positions): what a compiler must treat as fixed-address inputs."""
        return [t for t in self._k + self._v + self._pos if t is not None]

    # ---- the operations samplers use -----------------------------------------------------------------
    def append(self, layer: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values (sequence positions start..start+l) after the layer's entries and
        return views of all of them."""
        B, H, l, c = k_BHlc.shape
        self._ensure(layer, B, H, c, k_BHlc.dtype, k_BHlc.device)
        n = self._len[layer]
        if n + l > self.max_len:
            raise ValueError(f"layer {layer} holds {n} entries and cannot take {l} more (max_len {self.max_len}); "
                             f"truncate the cache or build it with the model's new_cache()")
        self._k[layer][:, :, n:n + l].copy_(k_BHlc)
        self._v[layer][:, :, n:n + l].copy_(v_BHlc)
        self._pos[layer][:, :, n:n + l].copy_(torch.arange(start, start + l, device=k_BHlc.device))
        self._len[layer] = n + l
        return self._k[layer][:, :, :n + l], self._v[layer][:, :, :n + l]

    def truncate(self, seq_len: int) -> None:
        """Roll back: drop every entry whose sequence position is >= seq_len (e.g. rejected speculation)."""
        for layer in range(self.num_layers):
            n = self._len[layer]
            if n == 0:
                continue
            drop_BHn = self._pos[layer][:, :, :n] >= seq_len
            # positions are sorted per (row, head): the dropped entries are a suffix, shared by all rows/heads
            n_keep = n - int(drop_BHn[0, 0].sum())
            if not bool((drop_BHn == drop_BHn[:1, :1]).all()):
                raise RuntimeError("cannot truncate a cache whose rows/heads hold different positions")
            self._len[layer] = n_keep
        self.seq_len = min(self.seq_len, seq_len)

    def select(self, layer: int, index_BHk: torch.Tensor) -> None:
        """Keep, per row and head, the entries at `index_BHk` (indices into the layer's current entries),
        compacted in place into the first k slots in positional order."""
        n, (B, H, N, c) = self._len[layer], self._k[layer].shape
        k_keep = index_BHk.shape[-1]
        if k_keep > n:
            raise ValueError(f"cannot keep {k_keep} entries of layer {layer}, which holds {n}")
        bad = index_BHk.dim() != 3 or index_BHk.shape[:2] != (B, H)
        if not bad and k_keep:
            lo, hi = index_BHk.aminmax()
            bad = bool((lo < 0) | (hi >= n))
        if bad:
            raise ValueError(f"indices for layer {layer} must be (B, H, k) = ({B}, {H}, k) with values in [0, {n}), "
                             f"got shape {tuple(index_BHk.shape)}")
        idx_BHk = index_BHk.sort(dim=-1).values
        # one flat row index per kept entry: whole head_dim rows are copied (index_select), far cheaper on CPU
        # than a gather whose index is expanded over head_dim; the copy comes first, as kept slots overlap sources
        flat = (idx_BHk + torch.arange(0, B * H * N, N, device=idx_BHk.device).view(B, H, 1)).flatten()
        k_sel = self._k[layer].view(B * H * N, c).index_select(0, flat)
        v_sel = self._v[layer].view(B * H * N, c).index_select(0, flat)
        p_sel = self._pos[layer].view(B * H * N).index_select(0, flat)
        self._k[layer].narrow(2, 0, k_keep).copy_(k_sel.view(B, H, k_keep, c))
        self._v[layer].narrow(2, 0, k_keep).copy_(v_sel.view(B, H, k_keep, c))
        self._pos[layer].narrow(2, 0, k_keep).copy_(p_sel.view(B, H, k_keep))
        self._len[layer] = k_keep

    # ---- memory --------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the used key and value entries (what a KV-memory figure should count)."""
        total = 0
        for k, n in zip(self._k, self._len):
            if k is not None:
                B, H, _, c = k.shape
                total += 2 * B * H * n * c * k.element_size()
        return total

    def allocated_bytes(self) -> int:
        """Bytes of the preallocated key and value buffers (positions excluded), used or not."""
        return sum(t.numel() * t.element_size() for t in self._k + self._v if t is not None)

    def clear(self) -> None:
        """Forget every entry but keep the buffers (same addresses: compiled graphs and CUDA graphs replay)."""
        self._len = [0] * self.num_layers
        self.seq_len = 0

"""The VAR next-scale transformer.

The model has no sampling loop. It exposes the pieces samplers compose:
  condition(labels) -> class vectors; embed(...) -> input tokens of a range of scales;
  run_blocks(..., cache) -> hidden states (appending to a KVCache); logits(...) -> (B, l, V).
`forward` is the teacher-forced training pass over the whole sequence with the block-causal mask.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict

import torch
from torch import nn

from var.config import VARConfig
from var.kv_cache import KVCache
from var.layers import AdaLNBeforeHead, AdaLNBlock, Observer, SharedAdaLin
from var.prefix_attention import Segment, prefix_segments


class VAR(nn.Module):
    def __init__(self, config: VARConfig, init: bool = True):
        super().__init__()
        self.config = c = config
        C = c.embed_dim
        self.num_classes, self.depth, self.embed_dim = c.num_classes, c.depth, C
        self.patch_nums = c.patch_nums
        self.first_l = c.patch_nums[0] ** 2
        ends = list(itertools.accumulate(p * p for p in c.patch_nums))
        self.begin_ends = [(e - p * p, e) for e, p in zip(ends, c.patch_nums)]
        L = ends[-1]
        init_std = self.init_std = math.sqrt(1 / C / 3) if c.init_std < 0 else c.init_std

        self.word_embed = nn.Linear(c.z_channels, C)
        self.class_emb = nn.Embedding(c.num_classes + 1, C)  # last row: the null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(len(c.patch_nums), C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(C, 6 * C)) if c.shared_aln else nn.Identity()
        dpr = torch.linspace(0, c.drop_path_rate, c.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            AdaLNBlock(C, C, c.num_heads, c.mlp_ratio, c.drop_rate, c.attn_drop_rate, dpr[i], c.norm_eps,
                       c.shared_aln, c.attn_l2_norm) for i in range(c.depth))
        self.head_nm = AdaLNBeforeHead(C, C, c.norm_eps)
        self.head = nn.Linear(C, c.vocab_size)

        lvl_1L = torch.cat([torch.full((p * p,), si) for si, p in enumerate(c.patch_nums)]).view(1, L)
        self.register_buffer("lvl_1L", lvl_1L)
        visible = lvl_1L.view(L, 1) >= lvl_1L.view(1, L)  # query scale >= key scale
        bias = torch.zeros(L, L).masked_fill_(~visible, float("-inf"))
        self.register_buffer("attn_bias_for_masking", bias.view(1, 1, L, L).contiguous())
        if init:
            self.init_weights()

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        return self.begin_ends[-1][1]

    def config_dict(self) -> dict:
        return asdict(self.config)

    # ---- conditioning and embeddings ---------------------------------------------------------------
    def condition(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Class vectors (B, C); label `num_classes` is the null (unconditional) class."""
        labels_B = torch.as_tensor(labels_B, device=self.class_emb.weight.device)
        if labels_B.ndim != 1 or labels_B.is_floating_point():
            raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels_B.shape)} dtype {labels_B.dtype}")
        if labels_B.numel() and (labels_B.min() < 0 or labels_B.max() > self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes - 1}] (or {self.num_classes} for the null class), "
                             f"got values in [{labels_B.min().item()}, {labels_B.max().item()}]")
        return self.class_emb(labels_B)

    def embed(self, cond_BD: torch.Tensor, x_in_BlCv: torch.Tensor | None, scale_begin: int, scale_end: int) -> torch.Tensor:
        """Input tokens of scales [scale_begin, scale_end).

        Scale 0 is the start token (class vector + pos_start); scales >= 1 embed their input maps
        `x_in_BlCv` (area-downsampled f_hat, concatenated row-major over those scales).
        """
        begin, end = self.begin_ends[scale_begin][0], self.begin_ends[scale_end - 1][1]
        parts = []
        with torch.autocast(device_type=cond_BD.device.type, enabled=False):
            B = cond_BD.shape[0]
            if scale_begin == 0:
                parts.append(cond_BD.float().unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1))
            need = end - max(begin, self.first_l)
            if need > 0:
                if x_in_BlCv is None or x_in_BlCv.shape[1:] != (need, self.config.z_channels):
                    got = None if x_in_BlCv is None else tuple(x_in_BlCv.shape)
                    raise ValueError(f"input maps for scales {scale_begin}..{scale_end - 1} must have shape "
                                     f"(B, {need}, {self.config.z_channels}), got {got}; "
                                     f"do the tokenizer's patch_nums match the model's {self.patch_nums}?")
                parts.append(self.word_embed(x_in_BlCv.float()))
            x_BLC = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            return x_BLC + (self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end])

    # ---- transformer ------------------------------------------------------------------------------
    def run_blocks(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, cache: KVCache | None = None,
                   scale_begin: int = 0, observer: Observer | None = None) -> torch.Tensor:
        """Run all blocks on the tokens of consecutive scales starting at `scale_begin`.

        Without a cache the tokens must start at scale 0 and use the block-causal mask. With a cache,
        every cached entry is visible and the new tokens see each other block-causally; their keys and
        values are appended to the cache.

        observer: called by every attention layer as `observer(layer, q_BHlc, k_BHLc)` with its queries
        (normalised, head scale applied) and every key they attend to (cache included, after the append);
        `self.blocks[layer].attn.attention_logits(q, k)` gives the layer's pre-softmax logits. This is the
        one place compression policies get attention scores from; None changes nothing.
        """
        begin = self.begin_ends[scale_begin][0]
        end = begin + x_BLC.shape[1]
        ends = [e for _, e in self.begin_ends]
        if end not in ends:
            raise ValueError(f"{x_BLC.shape[1]} tokens from scale {scale_begin} do not end on a scale boundary of {self.patch_nums}")
        if cache is None and begin != 0:
            raise ValueError("without a KV cache the tokens must start at scale 0 (nothing else holds the history)")
        if cache is not None and cache.seq_len != begin:
            raise ValueError(f"the cache holds {cache.seq_len} positions but the tokens start at position {begin}; "
                             f"feed scales in order or truncate the cache first")
        new_mask = self.attn_bias_for_masking[:, :, begin:end, begin:end]
        segments = self.prefix_segments(end) if cache is None else None
        single_scale = ends.index(end) == scale_begin  # Python, not a tensor test: no graph break when compiled
        cond = self.shared_ada_lin(cond_BD)
        device_type = x_BLC.device.type
        if torch.is_autocast_enabled(device_type):  # the residual stream runs in the autocast dtype
            dtype = torch.get_autocast_dtype(device_type)
            x_BLC, cond = x_BLC.to(dtype), cond.to(dtype)
        for i, block in enumerate(self.blocks):
            if cache is None:
                bias = new_mask
            elif single_scale:
                bias = None  # one scale sees all history and itself: no mask needed
            else:
                visible_history = new_mask.new_zeros(1, 1, end - begin, cache.layer_len(i))
                bias = torch.cat((visible_history, new_mask), dim=-1)
            x_BLC = block(x_BLC, cond, bias, cache, i, begin, observer, segments=segments)
        if cache is not None:
            cache.seq_len = end
        return x_BLC

    def prefix_segments(self, end: int) -> tuple[Segment, ...]:
        """The prefix-attention plan of the block-causal mask over positions [0, end) (planned once per end)."""
        plans = self.__dict__.setdefault("_prefix_plans", {})
        if end not in plans:
            lvl_L = self.lvl_1L[0, :end].cpu()
            bounds = [e for _, e in self.begin_ends if e <= end]
            plans[end] = prefix_segments(lvl_L[:, None] >= lvl_L[None, :], bounds)
        return plans[end]

    def logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h_BLC.float(), cond_BD).float()).float()

    def new_cache(self, dtype: torch.dtype | None = None) -> KVCache:
        """A static cache for the whole sequence; dtype: KV storage dtype (default: the keys' dtype)."""
        return KVCache(self.depth, self.seq_len, dtype=dtype)

    def forward(self, labels_B: torch.Tensor, x_tf_BlCv: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, V). In training mode labels are dropped to the null class with
        probability `cond_drop_rate` (the reference also does this in eval mode; we keep eval deterministic)."""
        if self.training and self.config.cond_drop_rate > 0:
            drop = torch.rand(labels_B.shape[0], device=labels_B.device) < self.config.cond_drop_rate
            labels_B = torch.where(drop, self.num_classes, labels_B)
        cond_BD = self.condition(labels_B)
        x_BLC = self.embed(cond_BD, x_tf_BlCv, 0, self.num_scales)
        return self.logits(self.run_blocks(x_BLC, cond_BD), cond_BD)

    # ---- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        c, std = self.config, self.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2.0, b=2.0)  # absolute cut-offs, as the reference
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        nn.init.trunc_normal_(self.pos_start, std=std, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.pos_1LC, std=std, a=-2.0, b=2.0)
        self.head.weight.mul_(c.init_head)
        self.head.bias.zero_()
        head_ada = self.head_nm.ada_lin[-1]
        head_ada.weight.mul_(c.init_adaln)
        head_ada.bias.zero_()
        C = self.embed_dim
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * c.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * c.depth))
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            if c.attn_l2_norm:
                block.attn.scale_mul_1H11.fill_(math.log(4.0))
            if c.shared_aln:
                block.ada_gss.copy_(torch.randn_like(block.ada_gss) / math.sqrt(C))
                block.ada_gss[:, :, 2:].mul_(c.init_adaln)
                block.ada_gss[:, :, :2].mul_(c.init_adaln_gamma)
            else:
                lin = block.ada_lin[-1]
                lin.weight[2 * C:].mul_(c.init_adaln)
                lin.weight[: 2 * C].mul_(c.init_adaln_gamma)
                lin.bias.zero_()

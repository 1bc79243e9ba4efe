"""Transformer building blocks of VAR: L2-normalised attention with a KV cache, FFN, AdaLN blocks."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from var.kv_cache import KVCache
from var.prefix_attention import Segment, segmented_attention

# observer(layer, q_BHlc, k_BHLc): the layer's queries and every key they attend to (see VAR.run_blocks)
Observer = Callable[[int, torch.Tensor, torch.Tensor], None]


class DropPath(nn.Module):
    """Stochastic depth per sample, rescaled by 1/keep."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            # float32 value of ln(100), as the released models were trained with
            self.max_scale_mul = torch.tensor(100.0, device="cpu").log().item()
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))  # keys have no bias; stored in checkpoints
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def qkv(self, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected (and, with l2 norm, normalised and scaled) q, k, v, each (B, H, L, head_dim)."""
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias)
        q, k, v = rearrange(qkv, "b l (three h c) -> three b h l c", three=3, h=self.num_heads)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            # CUDA autocast runs the norm in fp32 (and the fp32 head scale promotes q anywhere): back to v's
            # dtype, or the KV cache would hold fp32 keys at twice the memory; SDPA computes in bf16 either way
            q = F.normalize(q, dim=-1).mul(scale_mul).to(v.dtype)
            k = F.normalize(k, dim=-1).to(v.dtype)
        return q, k, v

    def attention_logits(self, q_BHqc: torch.Tensor, k_BHLc: torch.Tensor) -> torch.Tensor:
        """(B, H, q, L) float32 pre-softmax logits, exactly what the layer's SDPA computes before the mask:
        q.k with this layer's scale (q, k as `qkv` returns them: normalised, head scale already in q)."""
        return (q_BHqc.float() @ k_BHLc.float().transpose(-1, -2)) * self.scale

    def forward(self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None, cache: KVCache | None = None,
                layer: int = 0, start: int = 0, observer: Observer | None = None,
                segments: tuple[Segment, ...] | None = None) -> torch.Tensor:
        """segments: the prefix plan of `attn_bias` (var/prefix_attention.py), used without a cache."""
        q, k, v = self.qkv(x_BLC)
        dropout_p = self.attn_drop if self.training else 0.0
        if segments is not None and cache is None and observer is None:
            out = segmented_attention(q, k, v, attn_bias, segments, self.scale, dropout_p)
            return self.proj_drop(self.proj(rearrange(out, "b h l c -> b l (h c)")))
        if cache is not None:
            k, v = cache.append(layer, k, v, start)
            # a cache stored in another dtype (bf16 KV, fp32 compute); autocast casts for SDPA by itself
            if k.dtype != q.dtype and not torch.is_autocast_enabled(q.device.type):
                k, v = k.to(q.dtype), v.to(q.dtype)
        if observer is not None:
            observer(layer, q, k)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale, dropout_p=dropout_p)
        return self.proj_drop(self.proj(rearrange(out, "b h l c -> b l (h c)")))


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class AdaLNBlock(nn.Module):
    """Pre-norm block whose LayerNorms are modulated by the class condition.

    Modulation chunks are ordered (gamma1, gamma2, scale1, scale2, shift1, shift2); the gammas gate
    the residual branches without a +1, the scales modulate as x * (1 + scale) + shift.
    """

    def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float,
                 drop_path: float, norm_eps: float, shared_aln: bool, attn_l2_norm: bool):
        super().__init__()
        self.dim, self.norm_eps, self.shared_aln = dim, norm_eps, shared_aln
        self.attn = SelfAttention(dim, num_heads, attn_l2_norm, attn_drop, drop)
        self.ffn = FFN(dim, round(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * dim))

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """cond: (B, D) class condition, or (B, 1, 6, C) from the shared AdaLN."""
        if self.shared_aln:
            return (self.ada_gss + cond).unbind(2)
        return self.ada_lin(cond).view(-1, 1, 6, self.dim).unbind(2)

    def forward(self, x_BLC: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0, start: int = 0,
                observer: Observer | None = None, mid_residual: torch.Tensor | None = None,
                segments: tuple[Segment, ...] | None = None) -> torch.Tensor:
        """mid_residual: a tensor added to the stream between the attention and FFN branches (the distilled
        student's slot-type injection); None for the VAR itself. segments: see SelfAttention.forward."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond)
        h = layer_norm(x_BLC, self.norm_eps).mul(scale1.add(1)).add_(shift1)
        x_BLC = x_BLC + self.drop_path(self.attn(h, attn_bias, cache, layer, start, observer, segments).mul_(gamma1))
        if mid_residual is not None:
            x_BLC = x_BLC + mid_residual.to(x_BLC.dtype)
        h = layer_norm(x_BLC, self.norm_eps).mul(scale2.add(1)).add_(shift2)
        return x_BLC + self.drop_path(self.ffn(h).mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    """Final LayerNorm modulated by the class condition, chunks (scale, shift)."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float):
        super().__init__()
        self.dim, self.norm_eps = dim, norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.dim).unbind(2)
        return layer_norm(x_BLC, self.norm_eps).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    """The d36-s variant: one condition projection for all blocks, returned as (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)

"""CNN encoder/decoder of the VQ-VAE (VQGAN/LDM family, VAR's variant).

Module names mirror the official checkpoint (`down.{i}.block.{j}`, `mid.attn_1`, `up.{i}.upsample`, ...)
so its state dict loads strictly. Differences from LDM that matter: one fused `qkv` 1x1 conv in the
attention block, and a decoder whose levels are stored by index but run from the coarsest one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[-2]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        h = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(c), as in the reference
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right/bottom only) is what the checkpoint was trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks (+ attention after each at the coarsest level), then resampling."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, use_attn: bool, resample: nn.Module | None,
                 dropout: float, groups: int):
        super().__init__()
        chans = [in_ch] + [out_ch] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(chans[i], chans[i + 1], dropout, groups) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch, groups) for _ in range(num_blocks)) if use_attn else nn.ModuleList()
        # The attribute name (downsample/upsample) is part of the checkpoint keys.
        self.resample_name = None if resample is None else ("downsample" if isinstance(resample, Downsample) else "upsample")
        if resample is not None:
            self.add_module(self.resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, in_channels: int,
                 z_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        n = len(ch_mult)
        self.down = nn.ModuleList(
            Level(([ch] + widths)[i], widths[i], num_res_blocks, use_attn=(i == n - 1),
                  resample=Downsample(widths[i]) if i != n - 1 else None, dropout=dropout, groups=groups)
            for i in range(n))
        self.mid = MidBlock(widths[-1], dropout, groups)
        self.norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, out_channels: int,
                 z_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], dropout, groups)
        # up[i] works at the resolution of encoder level i; its input comes from level i+1 (or the middle).
        self.up = nn.ModuleList(
            Level((widths + [widths[-1]])[i + 1], widths[i], num_res_blocks + 1, use_attn=(i == n - 1),
                  resample=Upsample(widths[i]) if i != 0 else None, dropout=dropout, groups=groups)
            for i in range(n))
        self.norm_out = group_norm(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

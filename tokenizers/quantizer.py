"""Multi-scale residual vector quantizer (VAR, section 2.5 / 3 of the spec).

An image latent `f` (B, Cvae, H, W) is explained coarse-to-fine: at scale `si` the residual is
area-downsampled to pn x pn, snapped to the codebook, bicubic-upsampled back to H x W, refined by a
"phi" convolution and subtracted. Token maps are flattened row-major.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def area_resize(x_BChw: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling (overlapping floor/ceil windows), PyTorch's 'area' mode."""
    return F.interpolate(x_BChw, size=(size, size), mode="area")


def bicubic_resize(x_BChw: torch.Tensor, size: int) -> torch.Tensor:
    """PyTorch bicubic: a=-0.75, half-pixel centres, edge clamp, no antialiasing."""
    return F.interpolate(x_BChw, size=(size, size), mode="bicubic", align_corners=False)


def phi_index_per_scale(num_phis: int, num_scales: int) -> list[int]:
    """Which phi each scale uses: the one whose tick is nearest to si/(SN-1).

    Ties (e.g. scales 2 and 7 of the official 10) are decided by float64 rounding of these exact
    expressions, so they must be evaluated exactly like this to match the released tokenizer.
    """
    if num_scales < 2:
        raise ValueError(f"the phi schedule needs at least 2 scales, got {num_scales}")
    k = num_phis
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales)]


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): a light residual refinement of an upsampled code map."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PhiBank(nn.Module):
    """Holds the phis under the official key layout: `qresi` (1 shared), `qresi_ls.k` (K shared) or `k`."""

    def __init__(self, channels: int, ratio: float, share: int, num_phis: int, num_scales: int):
        super().__init__()
        self.identity = abs(ratio) < 1e-6
        make = (lambda: nn.Identity()) if self.identity else (lambda: Phi(channels, ratio))
        if share == 1:
            self.qresi = make()
            self._phis = [self.qresi]
            self.index = [0] * num_scales
        else:
            phis = [make() for _ in range(num_phis)]
            if share == 0:
                for k, phi in enumerate(phis):
                    self.add_module(str(k), phi)
            else:
                self.qresi_ls = nn.ModuleList(phis)
            self._phis = phis
            self.index = phi_index_per_scale(num_phis, num_scales)

    def forward(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        return self._phis[self.index[si]](h_BChw)


@dataclass
class QuantizerOutput:
    f_hat_st: torch.Tensor  # straight-through f_hat: forward value f_hat, gradient to the encoder as identity
    vq_loss: torch.Tensor  # (1/SN) sum_k beta*mse(sg(f_hat_k), f) + mse(f_hat_k, sg(f))
    idx_per_scale: list[torch.Tensor]  # (B, pn*pn) each
    hits_per_scale: torch.Tensor  # (SN, V) code counts of this batch (of every process's, training distributed)


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab_size: int, z_channels: int, patch_nums: tuple[int, ...], beta: float = 0.25,
                 using_znorm: bool = False, quant_resi: float = 0.5, share_quant_resi: int = 4,
                 num_phis: int | None = None):
        super().__init__()
        self.vocab_size, self.z_channels, self.beta = vocab_size, z_channels, beta
        self.patch_nums = tuple(patch_nums)
        self.using_znorm = using_znorm
        num_phis = num_phis or (len(patch_nums) if share_quant_resi == 0 else share_quant_resi)
        self.quant_resi = PhiBank(z_channels, quant_resi, share_quant_resi, num_phis, len(patch_nums))
        self.embedding = nn.Embedding(vocab_size, z_channels)
        # Per-scale EMA of code hits; a training statistic, kept for checkpoint compatibility and usage logs.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab_size))

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    # ---- code lookup -------------------------------------------------------------------------
    def nearest_codes(self, z_NC: torch.Tensor) -> torch.Tensor:
        codebook_VC = self.embedding.weight.detach().float()
        if self.using_znorm:
            sim_NV = F.normalize(z_NC, dim=-1) @ F.normalize(codebook_VC, dim=-1).T
            return sim_NV.argmax(dim=-1)
        # |z|^2 + |e|^2 - 2 z.e, argmin takes the first index on ties
        dist_NV = z_NC.square().sum(1, keepdim=True) + codebook_VC.square().sum(1)
        dist_NV.addmm_(z_NC, codebook_VC.T, alpha=-2, beta=1)
        return dist_NV.argmin(dim=-1)

    def lookup(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Token indices (B, pn*pn) -> code map (B, Cvae, pn, pn)."""
        return rearrange(self.embedding(idx_Bl), "b (h w) c -> b c h w", h=pn, w=pn)

    # ---- scale contributions -----------------------------------------------------------------
    def scale_contribution(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """A scale's code map (B, Cvae, pn, pn) -> its additive term of f_hat at full resolution."""
        if si != self.num_scales - 1:
            h_BChw = bicubic_resize(h_BChw, self.latent_size)
        return self.quant_resi(si, h_BChw)

    def next_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling step: add scale si's code map to f_hat; return (f_hat, input map of scale si+1).

        At the last scale the returned map is f_hat itself. f_hat is not modified in place.
        """
        f_hat = f_hat + self.scale_contribution(si, h_BChw)
        if si == self.num_scales - 1:
            return f_hat, f_hat
        return f_hat, area_resize(f_hat, self.patch_nums[si + 1])

    # ---- encode / decode tokens ---------------------------------------------------------------
    @torch.no_grad()
    def encode(self, f_BChw: torch.Tensor, return_fhat_per_scale: bool = False):
        """Latent -> list of token maps (B, pn*pn); optionally also the running f_hat after each scale."""
        _, idx_per_scale, fhats, _, _ = self._quantize(f_BChw.float(), track_loss=False)
        return (idx_per_scale, fhats) if return_fhat_per_scale else idx_per_scale

    def tokens_to_fhat(self, idx_per_scale: list[torch.Tensor]) -> torch.Tensor:
        self._check_tokens(idx_per_scale, len(self.patch_nums))
        f_hat = None
        for si, (pn, idx) in enumerate(zip(self.patch_nums, idx_per_scale)):
            h = self.scale_contribution(si, self.lookup(idx, pn))
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def teacher_forcing_input(self, idx_per_scale: list[torch.Tensor]) -> torch.Tensor:
        """Transformer input for scales 1..SN-1: area-downsampled running f_hat of the coarser scales.

        Accepts the tokens of the first SN-1 scales or of all SN (the last one is never an input).
        Returns (B, L - pn_0^2, Cvae) in float32.
        """
        self._check_tokens(idx_per_scale[: self.num_scales - 1], self.num_scales - 1)
        f_hat, maps = None, []
        # float32 also when a trainer calls this under autocast (the reference builds it outside amp)
        with torch.autocast(device_type=self.embedding.weight.device.type, enabled=False):
            for si in range(self.num_scales - 1):
                h = self.scale_contribution(si, self.lookup(idx_per_scale[si], self.patch_nums[si]).float())
                f_hat = h if f_hat is None else f_hat + h
                maps.append(rearrange(area_resize(f_hat, self.patch_nums[si + 1]), "b c h w -> b (h w) c"))
        return torch.cat(maps, dim=1)

    def _check_tokens(self, idx_per_scale: list[torch.Tensor], expected: int) -> None:
        if len(idx_per_scale) < expected:
            raise ValueError(f"expected token maps for {expected} scales {self.patch_nums[:expected]}, got {len(idx_per_scale)}")
        for si, idx in enumerate(idx_per_scale[:expected]):
            pn = self.patch_nums[si]
            if idx.ndim != 2 or idx.shape[1] != pn * pn:
                raise ValueError(f"scale {si}: token map must have shape (B, {pn * pn}) for a {pn}x{pn} map, "
                                 f"got {tuple(idx.shape)}; were the tokens made with other patch_nums?")
            if idx.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"scale {si}: token indices must be int64, got {idx.dtype}")

    # ---- training forward ----------------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor) -> QuantizerOutput:
        f = f_BChw.float()  # the quantizer always runs in fp32, also under autocast
        vq_loss, idx_per_scale, _, hits, f_hat = self._quantize(f, track_loss=True)
        if self.training:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(hits)  # the usage statistic counts every process's codes
            self._update_usage(hits)
        # Straight-through: decoder sees f_hat, the encoder receives the decoder's gradient unchanged.
        f_hat_st = (f_hat.detach() - f.detach()) + f
        return QuantizerOutput(f_hat_st, vq_loss, idx_per_scale, hits)

    def _quantize(self, f: torch.Tensor, track_loss: bool):
        with torch.autocast(device_type=f.device.type, enabled=False):
            f_nograd = f.detach()
            resid = f_nograd.clone()
            f_hat = torch.zeros_like(f_nograd)
            vq_loss = f.new_zeros(())
            idx_per_scale, fhats = [], []
            hits = torch.zeros(self.num_scales, self.vocab_size, device=f.device)
            last = self.num_scales - 1
            for si, pn in enumerate(self.patch_nums):
                z = area_resize(resid, pn) if si != last else resid
                idx_N = self.nearest_codes(rearrange(z, "b c h w -> (b h w) c"))
                hits[si] = idx_N.bincount(minlength=self.vocab_size).float()
                idx_Bl = rearrange(idx_N, "(b l) -> b l", b=f.shape[0])
                h = self.scale_contribution(si, self.lookup(idx_Bl, pn))
                f_hat = f_hat + h
                resid = resid - h.detach()
                idx_per_scale.append(idx_Bl)
                fhats.append(f_hat.detach())
                if track_loss:
                    vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_nograd)
            vq_loss = vq_loss / self.num_scales
        return vq_loss, idx_per_scale, fhats, hits, f_hat

    @torch.no_grad()
    def _update_usage(self, hits_SV: torch.Tensor) -> None:
        rate = hits_SV / hits_SV.sum(dim=1, keepdim=True).clamp_min(1)
        fresh = self.ema_vocab_hit_SV.sum(dim=1, keepdim=True) == 0
        self.ema_vocab_hit_SV.copy_(torch.where(fresh, rate, 0.99 * self.ema_vocab_hit_SV + 0.01 * rate))

    @torch.no_grad()
    def codebook_usage(self) -> torch.Tensor:
        """Per scale, the fraction of codes whose EMA hit rate exceeds 1% of the uniform rate."""
        return (self.ema_vocab_hit_SV > 0.01 / self.vocab_size).float().mean(dim=1)

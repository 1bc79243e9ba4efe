"""The VQ-VAE: encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder.

Images enter in [-1, 1]. Decoding paths used at inference clamp to [-1, 1]; the training forward does not.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from tokenizers.autoencoder import Decoder, Encoder
from tokenizers.config import VQVAEConfig
from tokenizers.quantizer import MultiScaleQuantizer


@dataclass
class VQVAEOutput:
    recon: torch.Tensor  # (B, 3, H, W), not clamped
    vq_loss: torch.Tensor
    idx_per_scale: list[torch.Tensor]
    hits_per_scale: torch.Tensor  # (SN, V) code counts of this batch


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c.ch, c.ch_mult, c.num_res_blocks, c.in_channels, c.z_channels, c.dropout, c.groupnorm_groups)
        self.decoder = Decoder(c.ch, c.ch_mult, c.num_res_blocks, c.in_channels, c.z_channels, c.dropout, c.groupnorm_groups)
        self.quantize = MultiScaleQuantizer(c.vocab_size, c.z_channels, c.patch_nums, c.beta, c.using_znorm,
                                            c.quant_resi, c.share_quant_resi, c.num_phis)
        ks = c.quant_conv_ks
        self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, ks, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, ks, padding=ks // 2)

    # ---- properties used by the transformer and samplers --------------------------------------
    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.quantize.patch_nums

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def z_channels(self) -> int:
        return self.config.z_channels

    def config_dict(self) -> dict:
        return asdict(self.config)

    # ---- input checks ---------------------------------------------------------------------------
    def check_images(self, img_B3HW: torch.Tensor) -> None:
        c = self.config
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != c.in_channels:
            raise ValueError(f"images must have shape (B, {c.in_channels}, H, W), got {tuple(img_B3HW.shape)}")
        h, w = img_B3HW.shape[-2:]
        if h != w or h % c.downsample or h // c.downsample != c.latent_size:
            raise ValueError(f"images must be {c.image_size}x{c.image_size} for patch_nums {c.patch_nums} "
                             f"(latent {c.latent_size}x{c.latent_size}, downsample {c.downsample}), got {h}x{w}; "
                             f"resize the images or build the tokenizer with matching patch_nums")
        if not img_B3HW.is_floating_point():
            raise TypeError(f"images must be float in [-1, 1], got dtype {img_B3HW.dtype}; use img.float() / 127.5 - 1")
        lo, hi = img_B3HW.min().item(), img_B3HW.max().item()
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"images must be in [-1, 1], got values in [{lo:.3f}, {hi:.3f}]; "
                             f"map [0, 1] inputs with 2*x - 1 (uint8: x/127.5 - 1)")

    # ---- image <-> tokens -----------------------------------------------------------------------
    def encode_latent(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        self.check_images(img_B3HW)
        return self.quant_conv(self.encoder(img_B3HW))

    @torch.no_grad()
    def img_to_tokens(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] -> token maps, one (B, pn*pn) int64 tensor per scale. In fp32 also inside an
        autocast region: tokens must not depend on the mixed-precision setting (a bf16 encoder changes a few
        per cent of the finer scales' tokens)."""
        if img_B3HW.is_floating_point():  # (integer images are refused by check_images, naming the fix)
            img_B3HW = img_B3HW.float()
        with torch.autocast(device_type=img_B3HW.device.type, enabled=False):
            return self.quantize.encode(self.encode_latent(img_B3HW))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Accumulated latent -> image in [-1, 1] (clamped)."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def tokens_to_fhat(self, idx_per_scale: list[torch.Tensor]) -> torch.Tensor:
        return self.quantize.tokens_to_fhat(idx_per_scale)

    def tokens_to_img(self, idx_per_scale: list[torch.Tensor], last_scale: int | None = None) -> torch.Tensor:
        """Decode tokens; with `last_scale` only scales 0..last_scale contribute (coarse-to-fine views)."""
        if last_scale is not None:
            q = self.quantize
            f_hat = sum(q.scale_contribution(si, q.lookup(idx_per_scale[si], q.patch_nums[si]))
                        for si in range(last_scale + 1))
            return self.fhat_to_img(f_hat)
        return self.fhat_to_img(self.tokens_to_fhat(idx_per_scale))

    def teacher_forcing_input(self, idx_per_scale: list[torch.Tensor]) -> torch.Tensor:
        return self.quantize.teacher_forcing_input(idx_per_scale)

    # ---- training --------------------------------------------------------------------------------
    def forward(self, img_B3HW: torch.Tensor) -> VQVAEOutput:
        q = self.quantize(self.encode_latent(img_B3HW))
        recon = self.decoder(self.post_quant_conv(q.f_hat_st))
        return VQVAEOutput(recon, q.vq_loss, q.idx_per_scale, q.hits_per_scale)

    # ---- checkpoint compatibility ---------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The usage statistic depends on the number of scales; the official file (10 scales) must also load
        # into tokenizers with other patch_nums, so a differently shaped statistic is replaced by our own.
        key = prefix + "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            state_dict[key] = self.quantize.ema_vocab_hit_SV.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

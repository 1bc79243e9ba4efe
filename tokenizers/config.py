"""Configuration of the multi-scale VQ-VAE."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: latent and codebook width
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # encoder; the decoder uses num_res_blocks + 1 per level
    in_channels: int = 3
    dropout: float = 0.0
    beta: float = 0.25  # commitment weight of the quantizer loss
    using_znorm: bool = False  # cosine-similarity code lookup instead of Euclidean
    quant_conv_ks: int = 3
    quant_resi: float = 0.5  # phi blend ratio; |r| < 1e-6 makes phi the identity
    share_quant_resi: int = 4  # 0: one phi per scale, 1: one shared phi, K>1: K partially shared phis
    default_qresi_counts: int = 0  # number of phis when share_quant_resi == 0 (0: one per scale)
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    groupnorm_groups: int = 32

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        problems = []
        if self.vocab_size < 2:
            problems.append(f"vocab_size must be >= 2, got {self.vocab_size}")
        if len(self.patch_nums) < 2:
            problems.append(f"patch_nums needs at least 2 scales (the phi schedule divides by SN-1), got {self.patch_nums}")
        if any(p <= 0 for p in self.patch_nums) or list(self.patch_nums) != sorted(self.patch_nums):
            problems.append(f"patch_nums must be positive and non-decreasing, got {self.patch_nums}")
        for c in [self.ch * m for m in self.ch_mult]:
            if c % self.groupnorm_groups:
                problems.append(f"channel count {c} (ch={self.ch} x ch_mult) is not divisible by "
                                f"{self.groupnorm_groups} GroupNorm groups; choose ch as a multiple of {self.groupnorm_groups}")
                break
        if self.share_quant_resi < 0:
            problems.append(f"share_quant_resi must be >= 0, got {self.share_quant_resi}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ValueError("invalid VQVAEConfig: " + "; ".join(problems))

    @property
    def downsample(self) -> int:
        """Spatial reduction factor of the encoder (2 per level except the last)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latent map = the last (finest) scale."""
        return self.patch_nums[-1]

    @property
    def image_size(self) -> int:
        return self.latent_size * self.downsample

    @property
    def num_phis(self) -> int:
        if self.share_quant_resi == 0:
            return self.default_qresi_counts or len(self.patch_nums)
        return self.share_quant_resi


def official_vqvae_config(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) -> VQVAEConfig:
    """`vae_ch160v4096z32.pth`: the one tokenizer shared by every official VAR (256 px and 512 px)."""
    return VQVAEConfig(patch_nums=tuple(patch_nums))


__all__ = ["VQVAEConfig", "official_vqvae_config"]

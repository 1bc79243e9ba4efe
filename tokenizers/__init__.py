"""Multi-scale residual VQ-VAE tokenizer (the VAR tokenizer).

`VQVAE` is the model; `VQVAEConfig` its configuration. Key names and shapes follow the official
`vae_ch160v4096z32.pth`, so that file loads with strict matching.
"""
from tokenizers.config import VQVAEConfig
from tokenizers.quantizer import MultiScaleQuantizer, phi_index_per_scale
from tokenizers.vqvae import VQVAE

__all__ = ["VQVAE", "VQVAEConfig", "MultiScaleQuantizer", "phi_index_per_scale"]

"""Auxiliary tokenizer losses (VQGAN style): a patch-GAN discriminator with hinge loss and the adaptive
generator weight, and an optional VGG16 feature-matching perceptual loss from a local weights file."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided convs -> one logit per patch. GroupNorm instead of BatchNorm keeps it DDP-safe."""

    def __init__(self, in_channels: int = 3, ch: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ch
        for i in range(1, num_layers):
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1), nn.GroupNorm(min(32, c * 2), c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        layers += [nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.net(img)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction gradient at the decoder's last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class VGGPerceptual(nn.Module):
    """Distance between unit-normalised VGG16 features at relu1_2 .. relu5_3 (LPIPS without the learned
    linear heads). Weights must be a local torchvision `vgg16` state dict; nothing is downloaded."""

    CUTS = (4, 9, 16, 23, 30)

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from torchvision.models import vgg16

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual loss weights {path} not found: give a local torchvision vgg16 "
                                    f"state dict (e.g. vgg16-397923af.pth) or set loss.perceptual_weight = 0")
        net = vgg16(weights=None)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.features = net.features[: self.CUTS[-1]].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).add(1).div(2).sub(self.mean).div(self.std)
        loss, start = x.new_zeros(()), 0
        for cut in self.CUTS:
            h = self.features[start:cut](h)
            start = cut
            fx, fy = F.normalize(h, dim=1).chunk(2)
            loss = loss + (fx - fy).square().sum(1).mean()
        return loss

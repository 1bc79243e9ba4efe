"""Zero-shot editing (VAR paper, section 'zero-shot generalisation'): inpainting, outpainting and
class-conditional editing with an unchanged model.

The image is tokenised at every scale; while sampling, the tokens whose region lies outside the mask are
teacher-forced to the image's own tokens and only the masked positions are drawn from the model. The
conditional and unconditional CFG rows share that history, as in ordinary sampling. It is the engine's
`constraint` slot, so it stacks: `code+edit` edits with CoDe, `sjd+edit` verifies only the free positions
(forced positions are exact by definition), `edit+flow` transports the free positions.

  sampler = build_sampler("edit", var=var, vae=vae)
  out = sampler.edit(images_B3HW_in_0_1, mask_B1HW, labels, cfg=2.0, top_k=100, seed=[...])

Mask convention: 1 (True) = regenerate, 0 = keep. A token is regenerated when the masked fraction of its
region exceeds `mask_threshold` (0: any overlap, so the mask is fully covered at every scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from samplers.base import Accelerator, register_sampler, sampler_class
from samplers.engine import Constraint, Plan
from samplers.stats import SampleOutput


class KnownTokens(Constraint):
    """Per scale (known idx (B|1, l), keep mask (B|1, l)); keep = True is forced to the known token."""

    def __init__(self, known: list[tuple[torch.Tensor, torch.Tensor]]):
        self.known = known

    def apply(self, si: int, idx_Bl: torch.Tensor):
        known_idx, keep_Bl = self.known[si]
        if keep_Bl.shape[0] == 1:
            known_idx, keep_Bl = known_idx.expand_as(idx_Bl), keep_Bl.expand_as(idx_Bl)
        if keep_Bl.shape[0] != idx_Bl.shape[0]:
            raise ValueError(f"{idx_Bl.shape[0]} labels for {keep_Bl.shape[0]} images/masks: give one label per image")
        return torch.where(keep_Bl, known_idx, idx_Bl), keep_Bl


@register_sampler("edit")
class Edit(Accelerator):
    slots = ("constraint",)

    def __init__(self, *, mask_threshold: float = 0.0):
        if not 0.0 <= mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1), got {mask_threshold}")
        self.mask_threshold = mask_threshold
        self._known: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # set during edit()

    def configure(self, plan: Plan, sampler) -> None:
        if self._known is not None:
            plan.constraint = KnownTokens(self._known)

    def token_masks(self, mask_B1HW: torch.Tensor) -> list[torch.Tensor]:
        """Per scale, (B, pn*pn) bool: True where the token must be regenerated."""
        side = self.sampler.vae.config.image_size
        if mask_B1HW.ndim != 4 or mask_B1HW.shape[1] != 1 or tuple(mask_B1HW.shape[-2:]) != (side, side):
            raise ValueError(f"mask must have shape (B, 1, {side}, {side}) at the image resolution, "
                             f"got {tuple(mask_B1HW.shape)}")
        mask = mask_B1HW.float()
        if mask.min() < 0 or mask.max() > 1:
            raise ValueError("mask values must be in [0, 1] (1 = regenerate, 0 = keep)")
        out = []
        for pn in self.sampler.var.patch_nums:
            covered = F.interpolate(mask, size=(pn, pn), mode="area")  # masked fraction of each token's region
            out.append(rearrange(covered > self.mask_threshold, "b 1 h w -> b (h w)"))
        return out

    @torch.no_grad()
    def edit(self, images_B3HW: torch.Tensor, mask_B1HW: torch.Tensor, labels, **sample_kwargs) -> SampleOutput:
        """images in [0, 1] (B or 1 images), mask (B or 1, 1, H, W); other arguments as in `sample`."""
        sampler = self.sampler
        images_B3HW = images_B3HW.to(sampler.device)
        mask_B1HW = mask_B1HW.to(sampler.device)
        if images_B3HW.is_floating_point() and (images_B3HW.min() < -1e-3 or images_B3HW.max() > 1.001):
            raise ValueError("edit() takes images in [0, 1] (as sample() returns them); map [-1, 1] with (x + 1) / 2")
        tokens = sampler.vae.img_to_tokens(images_B3HW * 2 - 1)
        regenerate = self.token_masks(mask_B1HW)
        n = max(images_B3HW.shape[0], mask_B1HW.shape[0])
        if {images_B3HW.shape[0], mask_B1HW.shape[0]} - {1, n}:
            raise ValueError(f"{images_B3HW.shape[0]} images and {mask_B1HW.shape[0]} masks: give equal numbers or one")
        # one image/mask is shared by every label (batch 1 broadcasts in KnownTokens.apply)
        self._known = [(t.expand(n, -1), ~r.expand(n, -1)) for t, r in zip(tokens, regenerate)]
        try:
            return sampler.sample(labels, **sample_kwargs)
        finally:
            self._known = None


EditingSampler = sampler_class("edit")

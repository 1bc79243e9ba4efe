"""Tokenizer training job: reconstruction (L1 + L2) + quantizer loss, optional patch-GAN with adaptive
weight and start step, optional perceptual loss, codebook usage/perplexity logs, dead-code re-seeding.

Dead codes (the documented choice): every `loss.dead_code_every` steps, codes unused at every scale (EMA
hit rate below 0.1% of the uniform rate at all scales) are re-seeded with encoder latent vectors of the
current batch (gathered over processes, picked with a step-seeded generator so every process makes the
same choice) and given a fresh uniform hit rate so they are not judged again before they had a chance.
Re-seeding from encoder outputs (rather than restarting from noise) puts the new code where the data is,
so it is picked at the next step; a code used at any one scale is alive.

Data: the shared pipeline (training/loader.py): samples are decoded and given the VAR train transform
(data.mid_reso / random_crop / hflip) in DataLoader workers; without augmentation the images are exactly
the dataset's own (`dataset[i]`), so unaugmented training is unchanged. Validation (train.val_every, on the
held-out split with the eval transform): val_loss = the reconstruction loss l1_weight * L1 + l2_weight * MSE
(no quantizer, perceptual or GAN terms, which measure the training objective rather than the
reconstruction), with L1, MSE and PSNR logged beside it.

The discriminator (optional) is updated after the generator on the last micro-batch of each step, on
real images and detached reconstructions, with its own AdamW (no weight decay) at `disc_lr_ratio` x lr.
"""
from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from tokenizers.config import VQVAEConfig
from tokenizers.losses import PatchDiscriminator, VGGPerceptual, adaptive_gan_weight, hinge_d_loss
from tokenizers.vqvae import VQVAE
from training.checkpoint import load_any, load_state_dict_checked, save_model
from training.images import grid_image, psnr
from training.loader import ImageSamples, collate_images
from training.job import TrainJob
from training.optim import build_adamw
from training.transforms import VARTransform


class TokenizerJob(TrainJob):
    export_name = "tokenizer"

    def __init__(self, cfg, vae_config: VQVAEConfig, dataset, device: torch.device, val_dataset=None):
        self.cfg, self.lcfg, self.dataset, self.val = cfg, cfg.loss, dataset, val_dataset
        self.transform = VARTransform.from_config(cfg.data)
        self.model = VQVAE(vae_config)
        if cfg.train.init_from:  # fine-tuning, e.g. from the official vae_ch160v4096z32.pth
            src = load_any(cfg.train.init_from, "vqvae", patch_nums=vae_config.patch_nums)
            load_state_dict_checked(self.model, src.state_dict(), cfg.train.init_from)
        self.model.to(device)
        self.disc = PatchDiscriminator(vae_config.in_channels).to(device) if self.lcfg.gan_weight > 0 else None
        self.perceptual = (VGGPerceptual(self.lcfg.perceptual_weights).to(device)
                           if self.lcfg.perceptual_weight > 0 else None)
        self._last = None
        self.preview = torch.stack([dataset[i][0] for i in range(min(16, len(dataset)))])

    def num_items(self) -> int:
        return len(self.dataset)

    def extra_models(self) -> list[nn.Module]:
        return [self.disc] if self.disc is not None else []

    def extra_optimizers(self, optim_cfg) -> list:
        if self.disc is None:
            return []
        return [build_adamw(self.disc, optim_cfg, lr_ratio=self.lcfg.disc_lr_ratio, decay_groups=False)]

    def set_prepared(self, models) -> None:
        super().set_prepared(models)
        if self.disc is not None:
            self.disc = models[1]

    def fetch(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """In-process path (no workers, no augmentation): the dataset's own images."""
        return torch.stack([self.dataset[i][0] for i in indices]).to(device)

    # ---- the data pipeline (training/loader.py) -------------------------------------------------------
    def loader_num_workers(self) -> int:
        return self.cfg.data.num_workers

    def loader_dataset(self) -> ImageSamples:
        return ImageSamples(self.dataset, self.transform, self.cfg.train.seed, train=True,
                            skip_corrupt=self.cfg.data.skip_corrupt)

    def val_dataset(self) -> ImageSamples | None:
        if self.val is None:
            return None
        return ImageSamples(self.val, self.transform, self.cfg.train.seed, train=False,
                            skip_corrupt=self.cfg.data.skip_corrupt)

    def collate(self, samples) -> dict:
        return collate_images(samples)

    def prepare_batch(self, cpu_batch: dict, device: torch.device) -> torch.Tensor:
        return cpu_batch["images"].to(device, non_blocking=True)

    @torch.no_grad()
    def val_metrics(self, img: torch.Tensor) -> dict:
        """Reconstruction of one held-out batch (the trainer sets eval mode: the codebook statistics are
        not updated)."""
        recon = self.model(img).recon.float()
        l1 = (recon - img).abs().mean()
        mse = (recon - img).square().mean()
        return {"loss": float(self.lcfg.l1_weight * l1 + self.lcfg.l2_weight * mse), "loss_rec_l1": float(l1),
                "loss_rec_l2": float(mse), "psnr": float(psnr(recon, img.float(), data_range=2.0).mean())}

    def _gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.lcfg.gan_start_step

    def loss(self, img: torch.Tensor, step: int):
        out = self.model(img)
        l1 = (out.recon - img).abs().mean()
        mse = (out.recon - img).square().mean()
        rec = self.lcfg.l1_weight * l1 + self.lcfg.l2_weight * mse
        if self.perceptual is not None:
            rec = rec + self.lcfg.perceptual_weight * self.perceptual(out.recon.float(), img.float())
        loss = rec + self.lcfg.vq_weight * out.vq_loss
        metrics = {"loss_rec_l1": l1.detach(), "loss_vq": out.vq_loss.detach(),
                   "psnr": psnr(out.recon.detach(), img, data_range=2.0).mean()}  # images in [-1, 1]
        if self._gan_active(step):
            g_loss = -self.disc(out.recon).mean()
            unwrapped = self.model.module if hasattr(self.model, "module") else self.model
            weight = adaptive_gan_weight(rec, g_loss, unwrapped.decoder.conv_out.weight)
            loss = loss + self.lcfg.gan_weight * weight * g_loss
            metrics.update(loss_g=g_loss.detach(), gan_weight=weight)
        hits = out.hits_per_scale
        probs = hits / hits.sum(1, keepdim=True).clamp_min(1)
        for si, p in enumerate(probs):
            metrics[f"ppl_s{si}"] = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
        self._last = (img, out.recon.detach())
        metrics["loss"] = loss.detach()
        return loss, metrics

    def after_step(self, extra_optimizers, step: int, micro, acc) -> dict:
        metrics = {}
        unwrapped = acc.unwrap_model(self.model)
        usage = unwrapped.quantize.codebook_usage()
        metrics.update({f"usage_s{si}": float(u) for si, u in enumerate(usage)})
        if self._gan_active(step):
            img, recon = self._last
            # the generator's GAN term also reached the discriminator's .grad: drop it before the D step
            extra_optimizers[0].zero_grad(set_to_none=True)
            with acc.autocast():  # one forward over real + fake keeps DDP at one forward per backward
                logits_real, logits_fake = self.disc(torch.cat([img, recon])).chunk(2)
                d_loss = hinge_d_loss(logits_real, logits_fake)
            acc.backward(d_loss)
            extra_optimizers[0].step()
            extra_optimizers[0].zero_grad(set_to_none=True)
            metrics["loss_d"] = float(d_loss.detach())
        if self.lcfg.dead_code_every > 0 and (step + 1) % self.lcfg.dead_code_every == 0:
            metrics["dead_codes_reseeded"] = float(self._reseed_dead_codes(unwrapped, step, acc))
        return metrics

    @torch.no_grad()
    def _reseed_dead_codes(self, vae: VQVAE, step: int, acc) -> int:
        q = vae.quantize
        dead = q.ema_vocab_hit_SV.max(0).values < 1e-3 / q.vocab_size  # unused at every scale
        dead = acc.reduce(dead.float(), "sum") > 0  # same decision on every process
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        z = rearrange(vae.encode_latent(self._last[0]).float(), "b c h w -> (b h w) c")
        z = acc.gather(z.contiguous())
        pick = torch.randint(0, z.shape[0], (n_dead,), generator=torch.Generator().manual_seed(step)).to(z.device)
        q.embedding.weight[dead] = z[pick].to(q.embedding.weight.dtype)
        q.ema_vocab_hit_SV[:, dead] = 1.0 / q.vocab_size  # give the new codes time before judging them again
        return n_dead

    @torch.no_grad()
    def sample_grid(self, model: VQVAE):
        was_training = model.training
        model.eval()
        img = self.preview.to(model.post_quant_conv.weight.device)
        recon = model.tokens_to_img(model.img_to_tokens(img))
        model.train(was_training)
        return grid_image(torch.cat([img, recon]).add(1).div(2), nrow=len(img))

    def export(self, path: Path, model: VQVAE) -> None:
        save_model(path, model, extra={"classes": list(getattr(self.dataset, "classes", []))})

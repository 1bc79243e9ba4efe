"""The public VAR release's own sampling loop (`autoregressive_infer_cfg`) on the very same weights, as a
baseline contender of `benchmarks/benchmark.py --reference-checkout PATH --sampler reference`.

Nothing of that code is vendored: the user points at a checkout of github.com/FoundationVision/VAR (it needs
`huggingface_hub` importable, as its requirements say), imported only while the benchmark runs. Its tokenizer
architecture is fixed, so this works with the official tokenizer shape (`--official-shape var_d16`, with
`--var-override` for smaller transformers).

The public loop always decodes its latent into images at the end. Two honest ways to leave that out, neither
re-implementing the loop (both run its own `autoregressive_infer_cfg` unchanged):
- `--sampler reference` with `--no-decode`: the reference VQVAE's `fhat_to_img` is shadowed, on that instance
  and only for the benchmark, by a function returning the latent itself, so the loop runs as released up to
  f_hat and its decoder is never called (generation only, measured directly);
- `--sampler reference:full`: the whole call (it decodes), then, right after it in the same round, its
  decoder alone on a latent of the same shape; "generation only" is then the paired difference, labelled as
  decoder-subtracted wherever it is reported.
"""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import torch


def _import_reference(checkout: str):
    root = Path(checkout).resolve()
    if not (root / "models" / "var.py").is_file():
        raise FileNotFoundError(f"--reference-checkout {root} is not a checkout of the public VAR repository "
                                f"(no models/var.py); clone github.com/FoundationVision/VAR and point at it")
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("models.var"), importlib.import_module("models.vqvae")
    except ImportError as err:
        raise ImportError(f"the reference code at {root} failed to import ({err}); install what its "
                          f"requirements.txt names (e.g. huggingface_hub) to compare against it") from err
    finally:
        sys.path.remove(str(root))


def build_reference(checkout: str, var, vae):
    """The reference VAR + VQVAE carrying our weights (identical key names, loaded strictly)."""
    ref_var_mod, ref_vae_mod = _import_reference(checkout)
    vc = vae.config
    if tuple(vc.ch_mult) != (1, 1, 2, 2, 4) or vc.num_res_blocks != 2:
        raise ValueError("the reference tokenizer has a fixed architecture (ch_mult 1,1,2,2,4, 2 res blocks); "
                         "compare on the official shapes, e.g. --official-shape var_d16")
    device = var.class_emb.weight.device
    ref_vae = ref_vae_mod.VQVAE(vocab_size=vc.vocab_size, z_channels=vc.z_channels, ch=vc.ch, test_mode=True,
                                share_quant_resi=vc.share_quant_resi, v_patch_nums=var.patch_nums).to(device)
    ref_vae.load_state_dict(vae.state_dict(), strict=True)
    c = var.config
    ref_var = ref_var_mod.VAR(vae_local=ref_vae, num_classes=c.num_classes, depth=c.depth, embed_dim=c.embed_dim,
                              num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, drop_rate=0.0, attn_drop_rate=0.0,
                              drop_path_rate=c.drop_path_rate, norm_eps=c.norm_eps, shared_aln=c.shared_aln,
                              cond_drop_rate=c.cond_drop_rate, attn_l2_norm=c.attn_l2_norm,
                              patch_nums=var.patch_nums).to(device)
    ref_var.load_state_dict(var.state_dict(), strict=True)
    return ref_var.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReferenceContender:
    """One timed call = the public loop's call. `full`: it decodes, and its decoder is then timed alone on a
    latent of the same shape, so every round yields a paired (full, decoder) measurement."""
    kind = "reference"

    def __init__(self, ref_var, batch: int, labels_B: torch.Tensor, seed: int, sampling: dict, full: bool):
        self.ref_var, self.batch, self.labels_B, self.seed, self.sampling = ref_var, batch, labels_B, seed, sampling
        self.full = full  # False: the decoder is shadowed and the call returns (f_hat + 1) / 2
        device = labels_B.device
        side = ref_var.patch_nums[-1]
        gen = torch.Generator(device=device).manual_seed(seed)
        self.f_hat = torch.randn(batch, ref_var.Cvae, side, side, device=device, generator=gen)
        self.decoder_times: list[float] = []
        self.images = None

    @torch.no_grad()
    def __call__(self) -> float:
        device = self.labels_B.device
        vae = self.ref_var.vae_proxy[0]
        if not self.full:
            vae.fhat_to_img = lambda f_hat: f_hat.clone()  # the loop's last line then only de-normalises f_hat
        try:
            _sync(device)
            start = time.perf_counter()
            self.images = self.ref_var.autoregressive_infer_cfg(
                B=self.batch, label_B=self.labels_B, g_seed=self.seed, cfg=self.sampling["cfg"],
                top_k=self.sampling["top_k"], top_p=self.sampling["top_p"], more_smooth=False)
            _sync(device)
            full = time.perf_counter() - start
        finally:
            vae.__dict__.pop("fhat_to_img", None)
        if not self.full:
            return full
        start = time.perf_counter()
        self.ref_var.vae_proxy[0].fhat_to_img(self.f_hat)
        _sync(device)
        self.decoder_times.append(time.perf_counter() - start)
        return full

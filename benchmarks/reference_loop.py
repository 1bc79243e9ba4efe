"""Time the public VAR release's own sampling loop (`autoregressive_infer_cfg`) on the very same weights,
for `benchmarks/benchmark.py --reference-checkout PATH`. Nothing of that code is vendored: the user points at
a checkout of github.com/FoundationVision/VAR (it needs `huggingface_hub` importable, as its requirements
say). Its tokenizer architecture is fixed, so this works with the official tokenizer shape
(`--official-shape var_d16` or the official checkpoints)."""
from __future__ import annotations

import importlib
import statistics
import sys
import time
from pathlib import Path

import torch


def _import_reference(checkout: str):
    root = Path(checkout).resolve()
    if not (root / "models" / "var.py").is_file():
        raise FileNotFoundError(f"{root} is not a checkout of the public VAR repository (no models/var.py)")
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


@torch.no_grad()
def time_reference_loop(checkout: str, var, vae, batch_sizes, sample_kwargs, warmup: int, repeats: int,
                        device: torch.device, our_rows: list[dict]) -> list[dict]:
    ref_var = build_reference(checkout, var, vae)
    autocast = device.type == "cuda"
    rows = []
    for batch in batch_sizes:
        labels = torch.arange(batch, device=device) % var.num_classes
        times = []
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                ref_var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=i, cfg=sample_kwargs["cfg"],
                                                 top_k=sample_kwargs["top_k"], top_p=sample_kwargs["top_p"],
                                                 more_smooth=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        ours = next(r for r in our_rows if r["batch"] == batch and r["sampler"] == "default")
        median = statistics.median(times)
        # the reference always decodes images; ours decodes too unless the benchmark skipped it
        rows.append({"batch": batch, "reference_median_s": median, "ours_median_s": ours["median_s"],
                     "speedup_vs_reference": median / ours["median_s"], "ours_decoded": "psnr_vs_default_db" in ours})
    return rows

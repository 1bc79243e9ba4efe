"""Reproduce every entry of the reference golden file (spec var-core section 10.2, except the optional
RNG-exact entries): token indices bitwise, floats within 1e-4.

The models are rebuilt only from the file's configuration and state dicts (strict loading), so this
also checks key names, shapes and the load path.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from samplers import build_sampler
from samplers.logits_processing import guide, cfg_strength, top_k_top_p_filter_
from tokenizers import VQVAE, VQVAEConfig, phi_index_per_scale
from tokenizers.quantizer import MultiScaleQuantizer
from var import VAR, VARConfig
from training.checkpoint import load_state_dict_checked

# Produced by the public VAR reference implementation; provenance and sha256 in tests/data/README.md.
GOLDEN = Path(__file__).resolve().parent / "data" / "golden_tiny.pt"
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def G():
    torch.set_num_threads(1)  # the golden file was produced with one thread
    return torch.load(GOLDEN, weights_only=True)


def _vae(G) -> VQVAE:
    c = G["config"]["vae"]
    fixed = G["config"]["vae_fixed_by_reference"]
    cfg = VQVAEConfig(vocab_size=c["vocab_size"], z_channels=c["z_channels"], ch=c["ch"], ch_mult=tuple(fixed["ch_mult"]),
                      num_res_blocks=fixed["num_res_blocks"], beta=c["beta"], using_znorm=c["using_znorm"],
                      quant_conv_ks=c["quant_conv_ks"], quant_resi=c["quant_resi"],
                      share_quant_resi=c["share_quant_resi"], default_qresi_counts=c["default_qresi_counts"],
                      patch_nums=tuple(c["v_patch_nums"]))
    vae = VQVAE(cfg)
    load_state_dict_checked(vae, G["vae_state_dict"], "golden vae")
    return vae.eval()


def _var(G, saln: bool = False) -> VAR:
    c = dict(G["config"]["var_saln" if saln else "var"])
    for k in ("flash_if_available", "fused_if_available"):
        c.pop(k)
    c["cond_drop_rate"] = 0.0  # the golden forwards were all produced without condition dropout
    c.update(G["config"]["var_init"], vocab_size=G["config"]["vae"]["vocab_size"],
             z_channels=G["config"]["vae"]["z_channels"], patch_nums=tuple(c["patch_nums"]))
    var = VAR(VARConfig(**c), init=False)
    load_state_dict_checked(var, (G["saln"] if saln else G)["var_state_dict"], "golden var")
    return var.eval()


def _eq_tokens(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(ours) == len(ref)
    for si, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == torch.int64 and a.shape == b.shape, f"scale {si}: {a.dtype} {tuple(a.shape)}"
        assert torch.equal(a, b), f"scale {si}: {(a != b).sum().item()} tokens differ"


# ---- tokenizer --------------------------------------------------------------------------------------
def test_encoder_quantizer_and_decoder(G):
    vae = _vae(G)
    with torch.no_grad():
        f = vae.encode_latent(G["images"])
        torch.testing.assert_close(f, G["enc_f"], atol=1e-5, rtol=1e-5)
        idx, fhats = vae.quantize.encode(f, return_fhat_per_scale=True)
        _eq_tokens(idx, G["idx_per_scale"])
        for ours, ref in zip(fhats, G["fhat_per_scale"]):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        f_hat = vae.tokens_to_fhat(G["idx_per_scale"])
        torch.testing.assert_close(f_hat, G["fhat_from_idx"], atol=1e-5, rtol=1e-5)
        assert torch.equal(f_hat, fhats[-1]), "decoding from tokens must rebuild the encoder's f_hat exactly"
        torch.testing.assert_close(vae.tokens_to_img(G["idx_per_scale"]), G["recon_from_idx"], **TOL)
        assert torch.equal(vae.img_to_tokens(G["images"])[-1], G["idx_per_scale"][-1])


def test_vae_training_forward_loss(G):
    vae = _vae(G).train()
    out = vae(G["images"])
    torch.testing.assert_close(out.vq_loss, G["vq_loss_train_forward"], **TOL)
    _eq_tokens(out.idx_per_scale, G["idx_per_scale"])
    out.vq_loss.backward()
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0, "the codebook must receive the VQ gradient"


def test_teacher_forcing_input(G):
    vae = _vae(G)
    with torch.no_grad():
        x = vae.teacher_forcing_input(G["idx_per_scale"])
    torch.testing.assert_close(x, G["teacher_forced_input"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the last scale's tokens are never an input
        x_wo_last = vae.teacher_forcing_input(G["idx_per_scale"][:-1])
    assert torch.equal(x, x_wo_last)


# ---- transformer ------------------------------------------------------------------------------------
def test_transformer_forward_block_io_and_losses(G):
    var = _var(G)
    labels, x_tf = G["teacher_labels"], G["teacher_forced_input"]
    with torch.no_grad():
        cond = var.condition(labels)
        x_in = var.embed(cond, x_tf, 0, var.num_scales)
        torch.testing.assert_close(x_in, G["x_BLC_block_input"], **TOL)
        h = var.run_blocks(x_in, cond)
        torch.testing.assert_close(h, G["x_BLC_last_block_output"], **TOL)
        logits = var(labels, x_tf)
    torch.testing.assert_close(logits, G["logits"], atol=1e-5, rtol=1e-5)
    target = torch.cat(G["idx_per_scale"], dim=1)
    for ls, key in ((0.0, "train_loss_ls0"), (0.1, "train_loss_ls0.1")):
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), label_smoothing=ls)
        torch.testing.assert_close(loss, G[key], **TOL)


def test_shared_adaln_forward(G):
    var = _var(G, saln=True)
    with torch.no_grad():
        logits = var(G["teacher_labels"], G["teacher_forced_input"])
    torch.testing.assert_close(logits, G["saln"]["logits"], atol=1e-5, rtol=1e-5)


def _cached_guided_logits(var: VAR, vae: VQVAE, labels: torch.Tensor, tokens: list[torch.Tensor], cfg: float):
    """Guided logits of every scale through the KV-cache step API, feeding the given tokens."""
    B = labels.shape[0]
    cond = var.condition(torch.cat((labels, torch.full_like(labels, var.num_classes))))
    x_next = vae.teacher_forcing_input(tokens)
    cache, out = var.new_cache(), []
    for si in range(var.num_scales):
        if si == 0:
            x = var.embed(cond, None, 0, 1)
        else:
            b, e = var.begin_ends[si]
            x = var.embed(cond, x_next[:, b - var.first_l:e - var.first_l].repeat(2, 1, 1), si, si + 1)
        logits = var.logits(var.run_blocks(x, cond, cache, scale_begin=si), cond)
        out.append(guide(logits, cfg_strength(cfg, si, var.num_scales)))
    assert B == out[0].shape[0]
    return out


@pytest.mark.parametrize("cfg", ["0.0", "1.0", "1.5"])
def test_greedy_generation(G, cfg):
    vae, var = _vae(G), _var(G)
    ref = G["greedy_samples"][cfg]
    args = G["greedy_sampling_args"]
    sampler = build_sampler("default", var=var, vae=vae)
    out = sampler.sample(G["gen_labels"], cfg=float(cfg), top_k=args["top_k"], top_p=args["top_p"],
                         more_smooth=args["more_smooth"], seed=args["g_seed"])
    _eq_tokens(out.tokens, ref["idx_per_scale"])
    torch.testing.assert_close(out.f_hat, ref["f_hat"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.images, ref["images"], **TOL)
    with torch.no_grad():
        x_next = vae.teacher_forcing_input(out.tokens)
        for si, ref_map in enumerate(ref["next_scale_input_maps"], start=1):
            b, e = var.begin_ends[si]
            ours = x_next[:, b - var.first_l:e - var.first_l].transpose(1, 2).reshape(ref_map.shape)
            torch.testing.assert_close(ours, ref_map, atol=1e-5, rtol=1e-5)
        if "guided_logits_per_scale" in ref:
            guided = _cached_guided_logits(var, vae, G["gen_labels"], out.tokens, float(cfg))
            for ours, r in zip(guided, ref["guided_logits_per_scale"]):
                torch.testing.assert_close(ours, r, **TOL)


def test_greedy_generation_shared_adaln(G):
    vae, var = _vae(G), _var(G, saln=True)
    ref = G["saln"]["greedy_cfg1_5"]
    out = build_sampler("default", var=var, vae=vae).sample(G["gen_labels"], cfg=1.5, top_k=1, seed=0)
    _eq_tokens(out.tokens, ref["idx_per_scale"])
    torch.testing.assert_close(out.f_hat, ref["f_hat"], atol=1e-5, rtol=1e-5)


def test_greedy_is_seed_independent(G):
    vae, var = _vae(G), _var(G)
    sampler = build_sampler("default", var=var, vae=vae)
    a = sampler.sample(G["gen_labels"], cfg=1.5, top_k=1, seed=0, decode=False)
    b = sampler.sample(G["gen_labels"], cfg=1.5, top_k=1, seed=123, decode=False)
    _eq_tokens(a.tokens, b.tokens)


# ---- logits filtering ---------------------------------------------------------------------------------
def test_top_k_top_p_filter_cases(G):
    ref = G["topk_topp_filter"]
    cases = ref["cases"]
    assert len(cases) == 6
    for case in cases:
        ours = top_k_top_p_filter_(ref["input_logits"].clone(), int(case["top_k"]), float(case["top_p"]))
        assert torch.equal(torch.isfinite(ours), case["kept"]), f"kept set differs for {case['top_k']}, {case['top_p']}"
        torch.testing.assert_close(ours, case["filtered_logits"], atol=0, rtol=0)


# ---- quantizer with the official 10 scales and phi tables -----------------------------------------------------
def test_ten_scale_quantizer(G):
    q10 = G["quant10"]
    c = q10["config"]
    quant = MultiScaleQuantizer(c["vocab_size"], c["Cvae"], tuple(c["v_patch_nums"]), c["beta"], c["using_znorm"],
                                c["quant_resi"], c["share_quant_resi"])
    quant.load_state_dict(q10["state_dict"], strict=True)
    quant.eval()
    assert quant.quant_resi.index == list(q10["phi_index_per_scale"]) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    with torch.no_grad():
        idx, fhats = quant.encode(q10["f"], return_fhat_per_scale=True)
        _eq_tokens(idx, q10["idx_per_scale"])
        torch.testing.assert_close(fhats[-1], q10["fhat_final"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(quant.tokens_to_fhat(idx), q10["fhat_final"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(quant.teacher_forcing_input(idx), q10["var_input"], atol=1e-5, rtol=1e-5)


def test_phi_index_tables(G):
    tables = G["phi_index_tables"]
    assert len(tables) > 50
    for key, expected in tables.items():
        k, sn = (int(part[1:]) if part[0] == "K" else int(part[2:]) for part in key.split("_"))
        assert phi_index_per_scale(k, sn) == list(expected), key


@pytest.mark.parametrize("case", ["stochastic", "smooth"])
def test_reference_rng_reproduces_the_public_loops_random_draws(G, case):
    """rng='reference' replays the public loop's generator calls (one multinomial draw per scale, then the
    exponential noise of the smooth path), so a seed gives the reference's tokens and f_hat exactly."""
    var, vae = _var(G), _vae(G)
    ref = G["rng_exact_optional"][case]
    a = ref["args"]
    out = build_sampler("default", var=var, vae=vae, rng="reference").sample(
        G["gen_labels"], cfg=a["cfg"], top_k=a["top_k"], top_p=a["top_p"], more_smooth=a["more_smooth"],
        seed=a["g_seed"], decode=False)
    _eq_tokens(out.tokens, ref["idx_per_scale"])
    torch.testing.assert_close(out.f_hat, ref["f_hat"], atol=1e-5, rtol=1e-5)
    if case == "stochastic":  # the fast mode draws from the same law with its own random stream
        fast = build_sampler("default", var=var, vae=vae).sample(G["gen_labels"], cfg=a["cfg"], top_k=a["top_k"],
                                                                  top_p=a["top_p"], seed=a["g_seed"], decode=False)
        assert not all(torch.equal(x, y) for x, y in zip(fast.tokens, ref["idx_per_scale"]))

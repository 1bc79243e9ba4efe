"""Checkpoint round trips (ours and the official bare .pth) and clear errors for bad input."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import make_tiny_pair
from samplers import build_sampler
from training.checkpoint import (CheckpointMismatchError, load_any, load_model, load_official_vae, load_official_var,
                            read_metadata, save_model)


# ---- checkpoints ---------------------------------------------------------------------------------------
def test_our_format_round_trip_is_bitwise(tmp_path, tiny_pair):
    var, vae = tiny_pair
    save_model(tmp_path / "var.safetensors", var, extra={"classes": ["a", "b", "c", "d", "e"]})
    save_model(tmp_path / "vae.safetensors", vae)
    meta = read_metadata(tmp_path / "var.safetensors")
    assert meta["kind"] == "var" and meta["format_version"] == 1 and meta["extra"]["classes"][0] == "a"
    var2, vae2 = load_model(tmp_path / "var.safetensors", "var"), load_model(tmp_path / "vae.safetensors", "vqvae")
    for a, b in ((var, var2), (vae, vae2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    s1 = build_sampler("default", var=var, vae=vae).sample(torch.tensor([1, 2]), top_k=5, seed=3)
    s2 = build_sampler("default", var=var2, vae=vae2).sample(torch.tensor([1, 2]), top_k=5, seed=3)
    assert torch.equal(s1.images, s2.images)
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes leave no temp files behind"


def test_derived_mask_is_left_out_and_rebuilt(tmp_path, tiny_pair):
    """Files leave out the (L, L) block-causal mask; loading rebuilds it, and files that hold it still load."""
    var, _ = tiny_pair
    path = save_model(tmp_path / "var.safetensors", var)
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
    assert "attn_bias_for_masking" not in keys and "lvl_1L" in keys
    # independent truth: token i sees token j iff j's scale is not finer than i's
    scale_L = torch.cat([torch.full((pn * pn,), s) for s, pn in enumerate(var.config.patch_nums)])
    want_LL = torch.where(scale_L[:, None] >= scale_L[None, :], 0.0, float("-inf"))
    assert torch.equal(load_model(path, "var").attn_bias_for_masking[0, 0], want_LL)
    tensors = {k: v.contiguous() for k, v in var.state_dict().items()}
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)  # as format-1 files were written before
    old = load_model(tmp_path / "old.safetensors", "var")
    assert all(torch.equal(v, tensors[k]) for k, v in old.state_dict().items())


def test_official_bare_state_dicts_load_with_inferred_config(tmp_path):
    var, vae = make_tiny_pair(seed=4, patch_nums=(1, 2, 3, 5), shared_aln=True, num_classes=7)
    torch.save(var.state_dict(), tmp_path / "var_tiny.pth")
    torch.save(vae.state_dict(), tmp_path / "vae_tiny.pth")
    loaded = load_official_var(tmp_path / "var_tiny.pth")
    c = loaded.config
    assert (c.patch_nums, c.depth, c.embed_dim, c.num_heads, c.num_classes, c.shared_aln) == \
           ((1, 2, 3, 5), 2, 64, 4, 7, True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in var.state_dict().items())
    with pytest.raises(CheckpointMismatchError, match="patch_nums"):
        load_official_var(tmp_path / "var_tiny.pth", patch_nums=(1, 2, 3, 4))
    with pytest.raises(CheckpointMismatchError, match="not a VAR state dict"):
        load_official_var(tmp_path / "vae_tiny.pth")
    # the official tokenizer shape is fixed; a tiny tokenizer file must be reported as a mismatch, not loaded
    with pytest.raises(CheckpointMismatchError, match="tokenizer architecture"):
        load_official_vae(tmp_path / "vae_tiny.pth")


def test_mismatched_checkpoints_name_the_cause(tmp_path):
    var_a, vae_a = make_tiny_pair(seed=0, vocab_size=32)
    var_b, _ = make_tiny_pair(seed=0, vocab_size=48)
    var_c, _ = make_tiny_pair(seed=0, patch_nums=(1, 2, 3, 5))
    save_model(tmp_path / "a.safetensors", var_a)
    from training.checkpoint import load_state_dict_checked
    with pytest.raises(CheckpointMismatchError, match="vocabulary size"):
        load_state_dict_checked(var_b, var_a.state_dict(), "a")
    with pytest.raises(CheckpointMismatchError, match="scale list"):
        load_state_dict_checked(var_c, var_a.state_dict(), "a")
    with pytest.raises(CheckpointMismatchError, match="holds a var checkpoint"):
        load_model(tmp_path / "a.safetensors", "vqvae")
    with pytest.raises(ValueError, match="do not match: vocabulary size 48 vs tokenizer 32"):
        build_sampler("default", var=var_b, vae=vae_a)
    with pytest.raises(ValueError, match="patch_nums"):
        build_sampler("default", var=var_c, vae=vae_a)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_any(tmp_path / "nope.safetensors", "var")
    with pytest.raises(FileNotFoundError, match="FoundationVision/var"):
        load_any(tmp_path / "var_d16.pth", "var")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointMismatchError, match="not a readable safetensors"):
        load_model(bad)
    with pytest.raises(ValueError, match="unknown checkpoint type"):
        load_any(tmp_path / "model.ckpt", "var")


def test_damaged_metadata_is_named(tmp_path, tiny_pair):
    var, _ = tiny_pair
    good = save_model(tmp_path / "var.safetensors", var)
    with safe_open(str(good), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    for change in ({"config": None}, {"config": "{bad"}, {"format_version": "x"}, {"config": "[1]"}):
        damaged = {k: v for k, v in {**meta, **change}.items() if v is not None}
        path = tmp_path / "damaged.safetensors"
        save_file(tensors, path, metadata=damaged)
        with pytest.raises(CheckpointMismatchError, match="damaged.safetensors: its .* metadata is damaged"):
            load_model(path)


# ---- bad input to the models and samplers -----------------------------------------------------------------
def test_bad_images(tiny_pair):
    _, vae = tiny_pair
    side = vae.config.image_size
    with pytest.raises(ValueError, match=f"must be {side}x{side}"):
        vae.img_to_tokens(torch.zeros(1, 3, side * 2, side * 2))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        vae.img_to_tokens(torch.full((1, 3, side, side), 255.0))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        vae.img_to_tokens(torch.zeros(3, side, side))
    with pytest.raises(TypeError, match="float"):
        vae.img_to_tokens(torch.zeros(1, 3, side, side, dtype=torch.uint8))


def test_bad_tokens(tiny_pair):
    _, vae = tiny_pair
    with pytest.raises(ValueError, match="other patch_nums"):
        vae.tokens_to_img([torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 9, dtype=torch.long)] * 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cfg=-1.0), r"cfg must be a number in \[0, 10000\]"),
    (dict(cfg=float("inf")), r"cfg must be a number in \[0, 10000\]"),
    (dict(top_p=1.5), r"top_p must be in \[0, 1\]"),
    (dict(top_p=-0.1), r"top_p must be in \[0, 1\]"),
    (dict(top_k=10_000), "top_k must be an integer"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
    (dict(temperature=[1.0, 1.0]), "per-scale temperature needs 4 values"),
])
def test_bad_sampling_arguments(tiny_pair, kwargs, message):
    var, vae = tiny_pair
    with pytest.raises(ValueError, match=message):
        build_sampler("default", var=var, vae=vae).sample(torch.tensor([0]), **kwargs)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 9]), r"labels must be in \[0, 4\]"),
    (torch.tensor([-1]), r"labels must be in \[0, 4\]"),
    (torch.tensor([[0, 1]]), "1-D integer"),
    (torch.tensor([0.5]), "1-D integer"),
])
def test_bad_labels(tiny_pair, labels, message):
    var, vae = tiny_pair
    with pytest.raises(ValueError, match=message):
        build_sampler("default", var=var, vae=vae).sample(labels)


def test_null_class_and_uniform_labels(tiny_pair):
    var, vae = tiny_pair
    sampler = build_sampler("default", var=var, vae=vae)
    assert sampler.sample(-1, batch_size=2, decode=False, seed=0).labels.tolist() == [5, 5]
    drawn = sampler.sample(None, batch_size=64, decode=False, top_k=1, seed=0).labels
    assert drawn.min() >= 0 and drawn.max() < var.num_classes and len(drawn.unique()) == var.num_classes


def test_unknown_sampler_and_bad_config():
    with pytest.raises(KeyError, match="unknown sampler 'nope'; available: .*default"):
        build_sampler("nope")
    from var import VARConfig, var_config
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        VARConfig(embed_dim=65, num_heads=4)
    with pytest.raises(ValueError, match="embed_dim and num_heads must be >= 1, got 64, 0"):
        VARConfig(embed_dim=64, num_heads=0)
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="norm_eps must be > 0"):
            VARConfig(norm_eps=eps)
    with pytest.raises(KeyError, match="registered sizes"):
        var_config("var_d99")

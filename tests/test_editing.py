"""Zero-shot editing: teacher-forced known tokens, masked positions sampled."""
from __future__ import annotations

import pytest
import torch

from samplers import build_sampler


@pytest.fixture
def setup(tiny_pair):
    var, vae = tiny_pair
    gen = torch.Generator().manual_seed(0)
    side = vae.config.image_size
    images = torch.rand(2, 3, side, side, generator=gen)
    return var, vae, images, side


def test_known_tokens_outside_the_mask_are_unchanged_at_every_scale(setup):
    var, vae, images, side = setup
    mask = torch.zeros(2, 1, side, side)
    mask[:, :, side // 2:, :] = 1  # regenerate the bottom half
    sampler = build_sampler("edit", var=var, vae=vae)
    out = sampler.edit(images, mask, torch.tensor([1, 3]), cfg=1.5, top_k=10, seed=[4, 5])
    encoded = vae.img_to_tokens(images * 2 - 1)
    regenerate = sampler.token_masks(mask)
    changed_somewhere = False
    for si, (ours, ref, r) in enumerate(zip(out.tokens, encoded, regenerate)):
        assert torch.equal(ours[~r], ref[~r]), f"scale {si}: a kept token changed"
        changed_somewhere |= bool((ours[r] != ref[r]).any())
    assert changed_somewhere, "masked positions must be sampled, not copied"
    assert regenerate[0].all(), "with threshold 0 a partly masked 1x1 scale is regenerated"
    assert (~regenerate[-1]).sum() == 2 * (var.patch_nums[-1] ** 2) // 2


def test_all_known_mask_reproduces_the_encoded_image(setup):
    var, vae, images, side = setup
    out = build_sampler("edit", var=var, vae=vae).edit(images, torch.zeros(1, 1, side, side), torch.tensor([0, 2]),
                                                       cfg=1.5, top_k=10, seed=0)
    encoded = vae.img_to_tokens(images * 2 - 1)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, encoded))
    torch.testing.assert_close(out.images, vae.tokens_to_img(encoded).add(1).div(2), atol=1e-5, rtol=1e-5)


def test_known_tokens_are_encoded_in_fp32_inside_an_autocast_region(setup):
    """sample.py wraps edit() in bf16 autocast on CUDA: the kept tokens must still be the fp32 encoding."""
    var, vae, images, side = setup
    encoded = vae.img_to_tokens(images * 2 - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = build_sampler("edit", var=var, vae=vae).edit(images, torch.zeros(1, 1, side, side),
                                                           torch.tensor([0, 2]), cfg=1.5, top_k=10, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, encoded))


def test_all_unknown_mask_equals_ordinary_sampling(setup):
    var, vae, images, side = setup
    kwargs = dict(cfg=2.0, top_k=12, top_p=0.9, seed=[7, 8], more_smooth=True)
    edited = build_sampler("edit", var=var, vae=vae).edit(images, torch.ones(2, 1, side, side), torch.tensor([4, 0]),
                                                          **kwargs)
    plain = build_sampler("default", var=var, vae=vae).sample(torch.tensor([4, 0]), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(edited.tokens, plain.tokens))
    assert torch.equal(edited.images, plain.images)


def test_bad_masks(setup):
    var, vae, images, side = setup
    sampler = build_sampler("edit", var=var, vae=vae)
    with pytest.raises(ValueError, match="mask must have shape"):
        sampler.edit(images, torch.ones(2, 1, side + 1, side), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\]"):
        sampler.edit(images, torch.full((2, 1, side, side), 2.0), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="images in"):
        sampler.edit(images * 255, torch.ones(2, 1, side, side), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one label per image"):
        sampler.edit(images, torch.ones(2, 1, side, side), torch.tensor([0, 1, 2]))


def test_one_image_is_shared_by_every_label(setup):
    var, vae, images, side = setup
    mask = torch.zeros(1, 1, side, side)
    mask[..., :, : side // 2] = 1
    out = build_sampler("edit", var=var, vae=vae).edit(images[:1], mask, torch.tensor([0, 1, 2]), top_k=5, seed=[1, 2, 3])
    keep = ~build_sampler("edit", var=var, vae=vae).token_masks(mask)[-1][0]
    last = out.tokens[-1]
    assert last.shape[0] == 3 and torch.equal(last[0, keep], last[2, keep])


def test_sample_cli_edit_mode(tmp_path, tiny_pair):
    import numpy as np
    from PIL import Image

    import sample
    from training.checkpoint import save_model
    var, vae = tiny_pair
    side = vae.config.image_size
    save_model(tmp_path / "var.safetensors", var)
    save_model(tmp_path / "vae.safetensors", vae)
    Image.fromarray((np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)).save(tmp_path / "img.png")
    mask = np.zeros((side, side), np.uint8)
    mask[: side // 2] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = ["--vae", str(tmp_path / "vae.safetensors"), "--var", str(tmp_path / "var.safetensors"), "--classes", "1",
            "--per-class", "3", "--out", str(tmp_path / "out"), "--edit-image", str(tmp_path / "img.png")]
    sample.main(base + ["--edit-mask", str(tmp_path / "mask.png")])
    edited = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert edited.shape == (3, side, side, 3)
    with pytest.raises(ValueError, match="needs both"):
        sample.main(base)
    Image.fromarray(mask[:-1]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="resize it first"):
        sample.main(base + ["--edit-mask", str(tmp_path / "small.png")])

"""The VAR train / eval transforms (training/transforms.py) against torchvision's PIL path, exact sub-array
checks, a binomial test of the flip, and the unaugmented default against the pixels it always produced."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as tvt

from training.data import to_model_range
from training.transforms import VARTransform, sample_generator

RNG = np.random.default_rng(0)


def _img(h: int, w: int, c: int | None = 3) -> np.ndarray:
    return RNG.integers(0, 256, (h, w) if c is None else (h, w, c)).astype(np.uint8)


def _model_range(pixels_HWC: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> (3, H, W), v / 127.5 - 1 (the toolkit's affine map), written out independently."""
    return torch.from_numpy(pixels_HWC.astype(np.float32) / np.float32(127.5) - np.float32(1)).permute(2, 0, 1)


def _tv_resized(img: np.ndarray, short: int) -> np.ndarray:
    pil = Image.fromarray(img).convert("RGB")
    return np.asarray(tvt.Resize(short, interpolation=tvt.InterpolationMode.LANCZOS)(pil))


@pytest.mark.parametrize("shape", [(40, 56, 3), (57, 41, 3), (37, 37, None), (64, 33, 1), (33, 80, 4)])
def test_eval_is_torchvision_lanczos_resize_then_centre_crop(shape):
    S, mid = 32, 1.125
    img = _img(*shape)
    t = VARTransform(S, mid_reso=mid, random_crop=True, hflip=True)  # eval ignores both random ops
    pil = Image.fromarray(img if img.ndim == 2 or img.shape[-1] != 1 else img[..., 0])
    pil = pil.convert("RGB")
    expected = tvt.CenterCrop(S)(tvt.Resize(round(mid * S), interpolation=tvt.InterpolationMode.LANCZOS)(pil))
    got = t(img, generator=None, train=False)
    assert got.shape == (3, S, S) and got.dtype == torch.float32
    assert torch.equal(got, _model_range(np.asarray(expected)))


def test_train_crop_is_the_exact_window_at_the_offset_the_generator_implies():
    S, mid = 16, 1.5
    img = _img(30, 45)
    resized = _tv_resized(img, round(mid * S))  # (24, 36)
    h, w = resized.shape[:2]
    t = VARTransform(S, mid_reso=mid, random_crop=True)
    offsets = []
    for seed in range(300):
        out = t(img, sample_generator(seed, 0, 7))
        top, left, flip = t.params(h, w, sample_generator(seed, 0, 7))
        # every window of the resized image the output equals, found by exhaustive search
        hits = [(y, x) for y in range(h - S + 1) for x in range(w - S + 1)
                if torch.equal(out, _model_range(resized[y: y + S, x: x + S]))]
        assert (top, left) in hits and not flip
        offsets.append((top, left))
    # offsets cover the range, uniformly: chi-square over the (h - S + 1) top positions
    tops = np.bincount([o[0] for o in offsets], minlength=h - S + 1)
    assert stats.chisquare(tops).pvalue > 1e-3 and len({o[1] for o in offsets}) == w - S + 1


def test_hflip_happens_half_the_time_and_is_a_mirror_of_the_same_crop():
    S, img = 16, _img(20, 26)
    plain = VARTransform(S, mid_reso=1.125, random_crop=True)
    flipping = VARTransform(S, mid_reso=1.125, random_crop=True, hflip=True)
    n, flipped = 400, 0
    for seed in range(n):
        a = plain(img, sample_generator(seed, 3, 1))
        b = flipping(img, sample_generator(seed, 3, 1))
        if torch.equal(b, a.flip(-1)) and not torch.equal(a, a.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(a, b)
    assert stats.binomtest(flipped, n, 0.5).pvalue > 1e-3
    assert not VARTransform(S, hflip=True).is_random(train=False)  # eval never flips


# sha256 of the float32 bytes of the _pad_cases, computed with the to_model_range shipped before the
# transforms existed (commit 7f79dbd): the Fashion-MNIST and procedural runs must keep their exact inputs
SHIPPED_PAD_DIGEST = "9fe92f21579784498936fdf53d413579ef996350a4e306d80ca40fdb1889dfbe"


def _pad_cases():
    rng = np.random.default_rng(123)
    return [rng.integers(0, 256, (28, 28)).astype(np.uint8), rng.integers(0, 256, (32, 32, 1)).astype(np.uint8),
            rng.integers(0, 256, (7, 9, 3)).astype(np.uint8)]


def test_default_transform_is_bitwise_the_shipped_model_range():
    S = 32
    default = VARTransform(S)
    for img in _pad_cases():  # no larger than S: centre-padded with -1, pixels exact
        got = default(img, train=True)
        rgb = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else np.broadcast_to(img, img.shape[:2] + (3,))
        expected = torch.full((3, S, S), -1.0)
        top, left = (S - img.shape[0]) // 2, (S - img.shape[1]) // 2
        expected[:, top: top + img.shape[0], left: left + img.shape[1]] = _model_range(np.ascontiguousarray(rgb))
        assert torch.equal(got, expected) and torch.equal(default(img, train=False), expected)
    for shape in [(40, 56, 3), (64, 64, None), (33, 100, 3)]:  # larger: today's antialiased bilinear path
        img = _img(*shape)
        assert torch.equal(default(img), to_model_range(img, S))
    digest = hashlib.sha256(b"".join(default(img).numpy().tobytes() for img in _pad_cases())).hexdigest()
    assert digest == SHIPPED_PAD_DIGEST


def test_small_images_are_padded_not_upsampled_at_mid_reso_one_even_with_random_crop():
    img = _img(28, 28, None)
    t = VARTransform(32, random_crop=True)
    out = t(img, sample_generator(0, 0, 0))
    assert torch.equal(out, to_model_range(img, 32))


def test_randomness_only_from_the_generator():
    img, t = _img(30, 30), VARTransform(16, mid_reso=1.5, random_crop=True, hflip=True)
    torch.manual_seed(0)
    a = t(img, sample_generator(5, 2, 9))
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(a, t(img, sample_generator(5, 2, 9)))
    outs = {t(img, sample_generator(5, e, i)).numpy().tobytes() for e in range(3) for i in range(3)}
    assert len(outs) > 3  # (epoch, index) change the draws
    with pytest.raises(ValueError, match="needs a generator.*sample_generator"):
        t(img)
    assert torch.equal(t(img, train=False), t(img, sample_generator(0, 0, 0), train=False))


def test_pad_small_false_upsamples_small_images_as_torchvision():
    """data.pad_small = false (28 px Fashion-MNIST at 64 px): the small image is resized like a large one."""
    S = 64
    img = _img(28, 28, None)
    expected = tvt.CenterCrop(S)(tvt.Resize(S, interpolation=tvt.InterpolationMode.LANCZOS)(Image.fromarray(img).convert("RGB")))
    t = VARTransform(S, pad_small=False)
    assert not t.legacy and not t.is_random() and t.describe()["pad_small"] is False
    assert torch.equal(t(img), _model_range(np.asarray(expected)))
    padded = VARTransform(S)(img)  # the default still pads with the background
    assert torch.equal(padded[:, :18], torch.full((3, 18, S), -1.0))

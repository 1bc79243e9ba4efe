"""FID modes: the three resize paths against independent formulas, and which statistics each mode uses."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eval.data import ArraySource, save_ref_stats
from eval.frechet import RankDeficientWarning, feature_stats
from eval.harness import FIDModeError, default_fid_mode, evaluate, load_reference
from eval.inception import InceptionFeatures, random_fid_inception
from eval.resize import RESIZE_DESCRIPTIONS, clean_resize_bicubic, tf1_resize_bilinear


def _tf1_bilinear_numpy(img_HW: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 resize_bilinear (align_corners=False, half_pixel_centers=False), pixel by pixel: src = dst * in / out
    (a float32 product in TF's kernel, so here too), lower = floor(src), upper = min(lower + 1, in - 1)."""
    h, w = img_HW.shape
    f32 = np.float32
    out = np.empty((out_h, out_w))
    for i in range(out_h):
        sy = float(f32(i) * (f32(h) / f32(out_h)))
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = float(f32(j) * (f32(w) / f32(out_w)))
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = img_HW[y0, x0] * (1 - fx) + img_HW[y0, x1] * fx
            bottom = img_HW[y1, x0] * (1 - fx) + img_HW[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((32, 32), (299, 299)), ((7, 5), (11, 13)), ((40, 36), (13, 9))])
def test_tf1_resize_matches_direct_formula(in_hw, out_hw):
    x = torch.rand(2, 3, *in_hw, generator=torch.Generator().manual_seed(0)) * 255
    ours = tf1_resize_bilinear(x, out_hw)
    assert ours.shape == (2, 3, *out_hw) and ours.dtype == torch.float32
    for b, c in ((0, 0), (1, 2)):
        expected = _tf1_bilinear_numpy(x[b, c].double().numpy(), *out_hw)
        np.testing.assert_allclose(ours[b, c].numpy(), expected, rtol=0, atol=1e-4)


def test_tf1_resize_is_not_half_pixel_bilinear():
    """Guard: the half-pixel (pytorch-fid) resize differs by whole grey levels, so the test above can fail."""
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255
    tf1 = tf1_resize_bilinear(x)
    half_pixel = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (tf1 - half_pixel).abs().max() > 10
    torch.testing.assert_close(tf1[..., 0, 0], x[..., 0, 0])  # TF samples from the top-left corner
    up2 = tf1_resize_bilinear(x, (64, 64))  # integer factor: even outputs land exactly on input pixels
    torch.testing.assert_close(up2[..., ::2, ::2], x)


@pytest.mark.parametrize("out_hw", [(299, 299), (20, 17)])
def test_clean_resize_matches_torch_antialiased_bicubic(out_hw):
    # independent implementation: torch's antialiased bicubic is built to match PIL (Keys a = -0.5)
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 255
    expected = F.interpolate(x, size=out_hw, mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)
    torch.testing.assert_close(clean_resize_bicubic(x, out_hw), expected, rtol=0, atol=5e-3)
    plain = F.interpolate(x, size=(20, 17), mode="bicubic", align_corners=False)
    if out_hw == (20, 17):  # guard: without antialiasing a 3x down-sampling is visibly different
        assert (clean_resize_bicubic(x, out_hw) - plain).abs().max() > 5


def test_inception_input_path_per_mode():
    net = random_fid_inception(0)
    x01 = torch.randint(0, 256, (1, 3, 24, 24), generator=torch.Generator().manual_seed(3)).float() / 255
    adm, rec, clean = (InceptionFeatures(net, "sha", mode=m) for m in ("adm", "recompute", "clean"))
    torch.testing.assert_close(adm.preprocess(x01), (tf1_resize_bilinear(x01 * 255) - 128) / 128)
    torch.testing.assert_close(rec.preprocess(x01), 2 * F.interpolate(x01, size=(299, 299), mode="bilinear") - 1)
    torch.testing.assert_close(clean.preprocess(x01), (clean_resize_bicubic(x01 * 255) - 128) / 128)
    assert adm.with_mode("clean").net is net and adm.resize == RESIZE_DESCRIPTIONS["adm"]
    with pytest.raises(ValueError, match="unknown FID mode"):
        InceptionFeatures(net, mode="tf")


# ---- which statistics each mode uses --------------------------------------------------------------------
class TinyFIDNet(nn.Module):
    """Stands in for the Inception (same name and mode attributes) with 4-d features: mode logic only."""

    name, feature_names, feature_dims = "inception-v3-fid", ("pool",), {"pool": 4}

    def __init__(self, mode: str):
        super().__init__()
        self.fid_mode, self.resize, self.weights_sha256 = mode, RESIZE_DESCRIPTIONS[mode], "ab" * 32
        self.proj = nn.Linear(3, 4)
        torch.manual_seed(0)
        nn.init.normal_(self.proj.weight)

    def forward(self, img_B3HW_01):
        return {"pool": self.proj(img_B3HW_01.mean(dim=(2, 3)))}


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def test_adm_mode_uses_stored_statistics_and_recompute_does_not(tmp_path):
    imgs = _images(30, 0)
    stored_mu, stored_sigma = np.arange(4.0), np.diag([1.0, 2.0, 3.0, 4.0])  # unlike any features of the images
    np.savez(tmp_path / "VIRTUAL_batch.npz", arr_0=imgs, mu=stored_mu, sigma=stored_sigma)
    assert default_fid_mode(tmp_path / "VIRTUAL_batch.npz") == "adm"
    adm = load_reference(tmp_path / "VIRTUAL_batch.npz", TinyFIDNet("adm"), device="cpu")
    np.testing.assert_array_equal(adm.stats["mu"], stored_mu)
    np.testing.assert_array_equal(adm.stats["sigma"], stored_sigma)
    assert adm.feats["pool"].shape == (30, 4) and adm.info["fid_mode"] == "adm"  # features still for KID / P-R
    for mode in ("recompute", "clean"):
        net = TinyFIDNet(mode)
        ref = load_reference(tmp_path / "VIRTUAL_batch.npz", net, device="cpu")
        with torch.no_grad():
            feats = net(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)["pool"].numpy()
        np.testing.assert_allclose(ref.stats["mu"], feats.astype(np.float64).mean(0), rtol=1e-6)
        assert ref.info["fid_mode"] == mode
    np.savez(tmp_path / "images_only.npz", arr_0=imgs)
    assert default_fid_mode(tmp_path / "images_only.npz") == "recompute"


def _our_stats(path, mode: str | None):
    s = feature_stats(np.random.default_rng(1).normal(size=(20, 4)))
    meta = {"network": {"name": "inception-v3-fid", "weights_sha256": "ab" * 32}}
    if mode:
        meta["fid_mode"] = mode
    save_ref_stats(path, {"mu": s.mu, "sigma": s.sigma}, meta)


def test_statistics_of_another_mode_are_refused(tmp_path):
    _our_stats(tmp_path / "clean.npz", "clean")
    _our_stats(tmp_path / "legacy.npz", None)  # written before modes existed: pytorch-fid's path
    assert default_fid_mode(tmp_path / "clean.npz") == "clean"
    assert default_fid_mode(tmp_path / "legacy.npz") == "recompute"
    assert load_reference(tmp_path / "clean.npz", TinyFIDNet("clean")).info["fid_mode"] == "clean"
    with pytest.raises(FIDModeError, match="mode 'clean' but the samples are evaluated in mode 'adm'") as err:
        load_reference(tmp_path / "clean.npz", TinyFIDNet("adm"))
    assert "\n" not in str(err.value)
    with pytest.raises(FIDModeError, match="'recompute'.*'adm'"):
        load_reference(tmp_path / "legacy.npz", TinyFIDNet("adm"))
    np.savez(tmp_path / "adm_stats_only.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(FIDModeError, match="'adm'.*'recompute'"):
        load_reference(tmp_path / "adm_stats_only.npz", TinyFIDNet("recompute"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(random_fid_inception(0).state_dict(), path)
    return path


def test_ref_stats_cli_records_its_mode(tmp_path, weights):
    from eval import ref_stats
    from eval.data import load_ref_stats

    np.savez(tmp_path / "real.npz", arr_0=_images(3, 5))
    with pytest.warns(RankDeficientWarning):  # 3 images for 2048 dimensions: only the metadata matters here
            assert ref_stats.main(["--images", str(tmp_path / "real.npz"), "--inception", str(weights), "--fid-mode", "clean",
                               "--out", str(tmp_path / "ref.npz"), "--device", "cpu", "--no-features"]) == 0
    meta = load_ref_stats(tmp_path / "ref.npz").meta
    assert meta["fid_mode"] == "clean" and meta["network"]["resize"] == RESIZE_DESCRIPTIONS["clean"]
    assert default_fid_mode(tmp_path / "ref.npz") == "clean"


def test_cli_refuses_mixed_modes_with_one_line(tmp_path, capsys, weights):
    from eval import fid

    _our_stats(tmp_path / "ref.npz", "recompute")
    np.savez(tmp_path / "fake.npz", arr_0=_images(4, 2))
    rc = fid.main(["--samples", str(tmp_path / "fake.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception",
                   str(weights), "--fid-mode", "adm", "--device", "cpu", "--out", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'recompute'" in err[0] and "'adm'" in err[0]
    assert not (tmp_path / "m.json").exists()


def test_result_records_mode_weights_resize_and_count(tmp_path):
    np.savez(tmp_path / "batch.npz", arr_0=_images(30, 0), mu=np.zeros(4), sigma=np.eye(4))
    net = TinyFIDNet("adm")
    ref = load_reference(tmp_path / "batch.npz", net, device="cpu")
    report = evaluate(net, ArraySource(_images(25, 3)), ref, device="cpu", kid_subset_size=20, kid_subsets=3)
    assert report["protocol"] == {"fid_mode": "adm", "weights_sha256": "ab" * 32, "resize": RESIZE_DESCRIPTIONS["adm"],
                                  "num_samples": 25, "reference_stats": ref.info["stats_from"]}
    assert "used as they are" in report["protocol"]["reference_stats"]
    assert json.loads(json.dumps(report["network"]))["fid_mode"] == "adm"

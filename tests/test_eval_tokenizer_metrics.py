"""PSNR / SSIM / codebook statistics against closed forms and an independent numpy SSIM."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.data import ArraySource, fashion_mnist_uint8
from eval.frechet import feature_stats, frechet_distance
from eval.proxy import ClassifierConfig, ProxyClassifier
from eval.tokenizer_metrics import codebook_stats, evaluate_tokenizer, main, psnr, ssim
from tokenizers import VQVAE, VQVAEConfig
from training.checkpoint import load_any


def _numpy_ssim(x_HW: np.ndarray, y_HW: np.ndarray, win: int = 11, sigma: float = 1.5) -> float:
    """Direct windowed SSIM: for every valid window, Gaussian-weighted moments, no separable filtering."""
    ax = np.arange(win) - (win - 1) / 2
    w2 = np.exp(-(ax[:, None] ** 2 + ax[None] ** 2) / (2 * sigma**2))
    w2 /= w2.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(x_HW.shape[0] - win + 1):
        for j in range(x_HW.shape[1] - win + 1):
            px, py = x_HW[i:i + win, j:j + win], y_HW[i:i + win, j:j + win]
            mx, my = (w2 * px).sum(), (w2 * py).sum()
            vx, vy = (w2 * (px - mx) ** 2).sum(), (w2 * (py - my) ** 2).sum()
            cxy = (w2 * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_independent_numpy_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 18, generator=gen, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(2, 3, 16, 18, generator=gen, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(x, y)
    for b in range(2):
        expected = np.mean([_numpy_ssim(x[b, c].numpy(), y[b, c].numpy()) for c in range(3)])
        assert ours[b].item() == pytest.approx(expected, abs=1e-10)


def test_ssim_closed_forms():
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    a, b = 0.3, 0.7  # constant images: only the luminance term remains
    c1 = 0.01**2
    got = ssim(torch.full((1, 1, 12, 12), a, dtype=torch.float64), torch.full((1, 1, 12, 12), b, dtype=torch.float64)).item()
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    with pytest.raises(ValueError, match="window"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_psnr_closed_form():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert psnr(x, x + 0.1).tolist() == pytest.approx([20.0, 20.0], abs=1e-9)  # mse 0.01 -> 20 dB
    assert torch.isinf(psnr(x, x)).all()


def test_codebook_usage_and_perplexity():
    counts = np.zeros((3, 8), np.int64)
    counts[0, :4] = 5  # uniform over 4 of 8 codes
    counts[1, 2] = 9  # a single code
    counts[2] = [1, 1, 2, 0, 0, 0, 0, 0]
    stats = codebook_stats(counts)
    assert stats[0]["usage"] == 0.5 and stats[0]["perplexity"] == pytest.approx(4.0)
    assert stats[1]["usage"] == 1 / 8 and stats[1]["perplexity"] == pytest.approx(1.0)
    p = np.array([0.25, 0.25, 0.5])
    assert stats[2]["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_evaluate_tokenizer_end_to_end_on_tiny_vqvae():
    torch.manual_seed(0)
    pn = (1, 2, 4, 8)  # 16x16 images: the SSIM window needs >= 11 pixels
    vae = VQVAE(VQVAEConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=pn)).eval()
    size = vae.config.image_size
    images = np.random.default_rng(0).integers(0, 256, size=(6, size, size, 3), dtype=np.uint8)
    proxy = ProxyClassifier(ClassifierConfig(widths=(4, 8), feature_dim=3)).eval()
    report = evaluate_tokenizer(vae, ArraySource(images), batch_size=4, feature_nets={"proxy": proxy})
    assert [c["tokens"] for c in report["codebook"]] == [6 * p * p for p in pn]
    x01 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        recon = ((vae.tokens_to_img(vae.img_to_tokens(x01 * 2 - 1)) + 1) / 2).clamp(0, 1)
    assert report["psnr_db"] == pytest.approx(psnr(recon, x01).mean().item(), rel=1e-6)
    assert report["ssim"] == pytest.approx(ssim(recon, x01).mean().item(), rel=1e-6)
    with torch.no_grad():  # rFD: Fréchet distance of reconstructions vs originals in the network's features
        a, b = feature_stats(proxy(x01)["pool"].numpy()), feature_stats(proxy(recon)["pool"].numpy())
    assert report["proxy_rfd"] == pytest.approx(frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-4, abs=1e-9)
    with pytest.raises(ValueError, match="tokenizer works at"):
        evaluate_tokenizer(vae, ArraySource(images[:, :size // 2, :size // 2]))


def test_cli_measures_the_v2_tokenizer_on_the_layout_it_was_trained_on(fashion_mnist_root, tmp_path):
    """--no-pad-small feeds Fashion-MNIST upsampled to 64 px, as the v2 tokenizer was trained (data.pad_small =
    false); the report's images are exactly that layout's."""
    tokenizer = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist64" / "tokenizer.safetensors"
    reports = {}
    for flag in ("--no-pad-small", "--pad-small"):
        out = tmp_path / f"{flag}.json"
        main(["--tokenizer", str(tokenizer), "--data", str(fashion_mnist_root), "--max-images", "32", "--threads", "1",
              "--out", str(out), flag])
        reports[flag] = json.loads(out.read_text())
    images = fashion_mnist_uint8(fashion_mnist_root, "test", 64, pad_small=False)[0][:32]
    direct = evaluate_tokenizer(load_any(tokenizer, "vqvae"), ArraySource(images), batch_size=64)
    assert reports["--no-pad-small"]["psnr_db"] == pytest.approx(direct["psnr_db"], rel=1e-6)
    assert reports["--pad-small"]["psnr_db"] < reports["--no-pad-small"]["psnr_db"] - 2  # the wrong layout

"""Confidence intervals: coverage of known true values over many seeds, closed forms, and the card wiring."""
import numpy as np
import pytest
from scipy import stats as sps

from eval.intervals import (bootstrap_ci, fd_bootstrap_ci, fd_paired_difference_ci, kid_bootstrap_ci, mean_ci,
                            metric_intervals, paired_difference_ci, significantly_different, wilson_ci)

SEEDS = 100


def _covered(ci: dict, truth: float) -> bool:
    return ci["low"] <= truth <= ci["high"]


def test_mean_intervals_cover_the_true_mean():
    t_hits = pct_hits = bca_hits = 0
    for seed in range(SEEDS):
        x = np.random.default_rng(seed).normal(size=100) * 2 + 1
        t_hits += _covered(mean_ci(x), 1.0)
        pct_hits += _covered(bootstrap_ci(x, lambda r: r.mean(axis=1), n_boot=400, seed=seed), 1.0)
        bca_hits += _covered(bootstrap_ci(x, lambda r: r.mean(axis=1), n_boot=400, seed=seed, method="bca"), 1.0)
    assert t_hits >= 90 and pct_hits >= 90 and bca_hits >= 90, (t_hits, pct_hits, bca_hits)


def test_mean_ci_is_the_t_interval_and_skips_infinite_psnr():
    x = np.array([20.0, 22.0, 25.0, np.inf, 21.0])
    finite = x[np.isfinite(x)]
    half = sps.t.ppf(0.975, 3) * finite.std(ddof=1) / 2
    ci = mean_ci(x)
    assert ci["n"] == 4 and ci["low"] == pytest.approx(finite.mean() - half) and ci["high"] == pytest.approx(finite.mean() + half)


def test_bca_of_a_skewed_statistic_is_asymmetric_and_percentile_is_not_for_symmetric_data():
    x = np.random.default_rng(0).exponential(size=200)
    ci = bootstrap_ci(x, lambda r: r.var(axis=1), n_boot=2000, method="bca")
    est = x.var()
    assert ci["high"] - est > est - ci["low"]  # right-skewed sampling distribution of a variance


def test_wilson_matches_the_score_equation_and_covers():
    # independent truth: the Wilson bounds are the roots p of (k/n - p)^2 = z^2 p (1 - p) / n
    k, n, z = 7, 40, sps.norm.ppf(0.975)
    roots = np.sort(np.roots([1 + z * z / n, -(2 * k / n + z * z / n), (k / n) ** 2]))
    ci = wilson_ci(k, n)
    assert (ci["low"], ci["high"]) == pytest.approx(tuple(roots), rel=1e-10)
    assert wilson_ci(0, 10)["low"] == 0.0 and wilson_ci(10, 10)["high"] == pytest.approx(1.0)
    hits = sum(_covered(wilson_ci(int(np.random.default_rng(s).binomial(50, 0.3)), 50), 0.3) for s in range(SEEDS))
    assert hits >= 90
    with pytest.raises(ValueError, match="successes"):
        wilson_ci(11, 10)


def test_fd_interval_covers_the_true_distance_between_gaussians():
    # equal covariances: FD = |mu1 - mu2|^2 exactly; the estimate itself is biased upwards by O(d^2 / N)
    truth, both_hits, fixed_hits = 2.25, 0, 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
        y[:, 0] += 1.5
        both_hits += _covered(fd_bootstrap_ci(x, y, n_boot=100, seed=seed), truth)
        # the reference known exactly (stored statistics): only the sample side is resampled
        fixed_hits += _covered(fd_bootstrap_ci(x, None, [1.5, 0, 0, 0], np.eye(4), n_boot=100, seed=seed), truth)
    assert both_hits >= 90 and fixed_hits >= 90, (both_hits, fixed_hits)


def test_paired_fd_difference_covers_the_closed_form_and_is_tighter_than_two_intervals():
    # a ~ N(0, I), b = a + delta + 0.3 eta (the same items, a second sampler), reference N(1.5 e1, I), d = 4:
    # FD(a) = 2.25, FD(b) = (1.5 - 0.5)^2 + 4 (1.09) + 4 - 8 sqrt(1.09)
    d, eps = 4, 0.3
    truth = 2.25 - (1.0 + d * (1 + eps**2) + d - 2 * d * np.sqrt(1 + eps**2))
    ref_mu, ref_sigma = np.array([1.5, 0, 0, 0]), np.eye(d)
    hits, paired_width, separate_width = 0, 0.0, 0.0
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        a = rng.normal(size=(300, d))
        b = a + np.array([0.5, 0, 0, 0]) + eps * rng.normal(size=(300, d))
        ci = fd_paired_difference_ci(a, b, None, ref_mu, ref_sigma, n_boot=100, seed=seed)
        hits += _covered(ci, truth)
        assert ci["estimate"] == pytest.approx(_fd(a, ref_mu, ref_sigma) - _fd(b, ref_mu, ref_sigma), rel=1e-6)
        paired_width += ci["high"] - ci["low"]
        one, two = (fd_bootstrap_ci(x, None, ref_mu, ref_sigma, n_boot=100, seed=seed) for x in (a, b))
        separate_width += (one["high"] - one["low"]) + (two["high"] - two["low"])
    assert hits >= 90, hits
    assert paired_width < 0.5 * separate_width
    same = fd_paired_difference_ci(a, a.copy(), rng.normal(size=(200, d)), n_boot=50)
    assert same["low"] == same["high"] == 0.0 and not same["significant"]
    with pytest.raises(ValueError, match="equal shape"):
        fd_paired_difference_ci(a, b[:10], None, ref_mu, ref_sigma)


def _fd(x, mu, sigma):
    from eval.frechet import frechet_distance
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma)


def test_fd_interval_at_zero_distance_stays_non_negative_and_covers_zero():
    # equal distributions: the estimate is pure bias, a reflected interval alone would lie below it
    hits = 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        ci = fd_bootstrap_ci(rng.normal(size=(200, 6)), rng.normal(size=(200, 6)), n_boot=50, seed=seed)
        assert ci["low"] >= 0
        hits += _covered(ci, 0.0)
    assert hits >= 90


def test_kid_interval_covers_the_closed_form_mmd():
    # d = 1: k(x, y) = (xy + 1)^3, so MMD^2 = (m3P - m3Q)^2 + 3 (m2P - m2Q)^2 + 3 (m1P - m1Q)^2 with raw moments
    mu = 0.5
    m1, m2, m3 = mu, mu**2 + 1, mu**3 + 3 * mu
    truth = m3**2 + 3 * (m2 - 1) ** 2 + 3 * m1**2
    hits = 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        hits += _covered(kid_bootstrap_ci(rng.normal(size=(200, 1)), rng.normal(size=(200, 1)) + mu, seed=seed), truth)
    assert hits >= 90


def test_kid_interval_centre_and_subsampling():
    from eval.metrics import polynomial_mmd2_unbiased

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(150, 3)), rng.normal(size=(150, 3)) + 0.3
    ci = kid_bootstrap_ci(x, y)
    assert ci["low"] < polynomial_mmd2_unbiased(x, y) < ci["high"]
    big = kid_bootstrap_ci(rng.normal(size=(600, 3)), rng.normal(size=(600, 3)) + 0.3, max_points=150, centre=1.0)
    assert "rescaled" in big["method"] and big["low"] < 1.0 < big["high"]


def test_significance_helpers():
    a, b, c = {"low": 1, "high": 2}, {"low": 2.5, "high": 3}, {"low": 1.5, "high": 2.6}
    assert significantly_different(a, b) and significantly_different(b, a)
    assert not significantly_different(a, c) and not significantly_different(c, b)
    rng = np.random.default_rng(0)
    base = rng.normal(size=300) * 3
    shifted = paired_difference_ci(base + 0.2 + rng.normal(size=300) * 0.1, base)
    null = paired_difference_ci(base + rng.normal(size=300) * 0.1, base)
    assert shifted["significant"] and not null["significant"]
    assert shifted["low"] < 0.2 < shifted["high"]


def test_metric_intervals_cover_every_reported_metric():
    rng = np.random.default_rng(1)
    fake, real = rng.normal(size=(120, 6)), rng.normal(size=(150, 6)) + 0.2
    metrics = {"proxy_fd": 0.3, "proxy_accuracy": 0.75, "proxy_precision": 0.6, "proxy_recall": 0.5, "proxy_kid": 0.01}
    ref_stats = {"mu": real.mean(0), "sigma": np.cov(real, rowvar=False)}
    cis = metric_intervals({"pool": fake}, ref_stats, {"pool": real}, metrics, prefix="proxy_", n_boot=50)
    assert set(cis) == set(metrics)
    assert cis["proxy_accuracy"] == wilson_ci(90, 120)
    assert cis["proxy_recall"]["n"] == 150 and "manifolds" in cis["proxy_recall"]["method"]
    assert "samples and reference" in cis["proxy_fd"]["method"]
    # stored statistics that are not the features' own: the reference side stays fixed
    cis = metric_intervals({"pool": fake}, {"mu": np.zeros(6), "sigma": np.eye(6)}, {"pool": real}, metrics,
                           prefix="proxy_", n_boot=50)
    assert "reference statistics fixed" in cis["proxy_fd"]["method"]
    # Inception-sized features: no FD bootstrap (minutes of eigendecompositions), the rest still
    wide = metric_intervals({"pool": rng.normal(size=(20, 600))}, {"mu": np.zeros(600), "sigma": np.eye(600)},
                            None, {"fid": 1.0}, n_boot=10)
    assert wide == {}


def test_card_shows_intervals_and_marks_significant_differences(tmp_path):
    from eval.card import card_markdown, comparison_markdown

    def card(fd, ci):
        ev = {"metrics": {"num_samples": 100, "proxy_fd": fd}, "intervals": {"proxy_fd": {**ci, "level": 0.95,
              "method": "basic bootstrap"}}, "network": {"name": "proxy"}, "reference": {}, "timings_s": {},
              "note": "not FID"}
        return {"samples": "s", "num_samples": 100, "image_size": [32, 32], "written_utc": "now", "sampling": {},
                "evaluation": {"proxy": ev}, "evaluation_settings": {}}

    a, b, c = card(1.0, {"low": 0.8, "high": 1.2}), card(2.0, {"low": 1.7, "high": 2.3}), card(1.1, {"low": 0.9, "high": 1.3})
    assert "| proxy FD (classifier features) | 1 | [0.8, 1.2] |" in card_markdown(a)
    table = comparison_markdown({"a": a, "b": b, "c": c})
    assert "| 2 [1.7, 2.3] * |" in table and "| 1.1 [0.9, 1.3] |" in table


def test_tokenizer_report_carries_psnr_interval():
    import torch

    from eval.data import ArraySource
    from eval.tokenizer_metrics import evaluate_tokenizer, psnr
    from tokenizers import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                            patch_nums=(1, 2, 4, 8))).eval()
    size = vae.config.image_size
    images = np.random.default_rng(0).integers(0, 256, size=(6, size, size, 3), dtype=np.uint8)
    report = evaluate_tokenizer(vae, ArraySource(images), batch_size=4)
    x01 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        recon = ((vae.tokens_to_img(vae.img_to_tokens(x01 * 2 - 1)) + 1) / 2).clamp(0, 1)
    per_image = psnr(recon, x01).numpy()
    ci = report["intervals"]["psnr_db"]
    half = sps.t.ppf(0.975, 5) * per_image.std(ddof=1) / np.sqrt(6)
    assert (ci["low"], ci["high"]) == pytest.approx((per_image.mean() - half, per_image.mean() + half), rel=1e-5)
    assert ci["low"] < report["psnr_db"] < ci["high"] and "ssim" in report["intervals"]

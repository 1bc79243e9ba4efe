"""Shared fixtures: tiny random tokenizer/VAR pairs that run in milliseconds on CPU, and the real-data rule:
a test that needs Fashion-MNIST skips when it is absent, except under CI=true, where that skip is a failure."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tokenizers import VQVAE, VQVAEConfig
from var import VAR, VARConfig


def perturb_(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Move every parameter away from its initial value: the reference init gates each block with
    gamma ~ 1e-5, which would make every block (and so most bugs) invisible in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def make_tiny_pair(seed: int = 0, patch_nums=(1, 2, 3, 4), vocab_size: int = 32, z_channels: int = 8,
                   num_classes: int = 5, depth: int = 2, embed_dim: int = 64, num_heads: int = 4,
                   shared_aln: bool = False) -> tuple[VAR, VQVAE]:
    torch.manual_seed(seed)
    vae = VQVAE(VQVAEConfig(vocab_size=vocab_size, z_channels=z_channels, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                            patch_nums=tuple(patch_nums)))
    perturb_(vae, seed + 1, std=0.02)
    var = VAR(VARConfig(num_classes=num_classes, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                        patch_nums=tuple(patch_nums), vocab_size=vocab_size, z_channels=z_channels,
                        shared_aln=shared_aln, cond_drop_rate=0.0, drop_path_rate=0.0))
    perturb_(var, seed + 2, std=0.05)
    return var.eval(), vae.eval()


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (statistical and speed-sensitive tests), then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_pair():
    return make_tiny_pair()


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"  # every skip for missing data names it (the hook below keys on it)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def fashion_mnist_root() -> Path:
    """The Debian package's folder; skips (fails under CI=true, see the hook) when it is not installed."""
    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed (apt-get install {FASHION_MNIST_PACKAGE}; .ci/run installs it)")
    return FASHION_MNIST


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip for missing Fashion-MNIST is a failure: CI must not pass without the real-data
    tests. Keyed on the package name, so skips written in any test module (skipif marks or pytest.skip) count."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _in_ci() and FASHION_MNIST_PACKAGE in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = (f"CI=true but Fashion-MNIST is missing from {FASHION_MNIST}: install {FASHION_MNIST_PACKAGE} "
                           f"(.ci/run does) instead of skipping {item.nodeid}")

"""Paths that only CUDA exercises (skipped without a CUDA device): device-bound generators, CPU-held
statistics fed by CUDA tensors, what CUDA autocast does that CPU autocast does not, and per-GPU RNG states."""
from __future__ import annotations

import pytest
import torch

from samplers import build_sampler
from samplers.scalekv.calibration import calibrate
from tests.conftest import make_tiny_pair
from training.run_state import rng_state, set_rng_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def cuda_pair():
    var, vae = make_tiny_pair(seed=3, patch_nums=(1, 2, 3, 4, 6))
    return var.to(CUDA), vae.to(CUDA)


def test_unseeded_block_sjd_draws_its_acceptance_stream_on_the_device(cuda_pair):
    """Without a seed the acceptance stream is seeded from the global RNG; it must live on the model's device
    (CUDA ops refuse a CPU generator)."""
    var, vae = cuda_pair
    out = build_sampler("sjd", var=var, vae=vae, window_scales=3).sample(torch.tensor([0, 1, 2], device=CUDA),
                                                                        cfg=1.5, top_k=8)
    assert out.images.device.type == "cuda" and out.tokens[-1].shape == (3, 36)


def test_calibration_of_a_cuda_model_equals_the_cpu_one(cuda_pair):
    var, vae = cuda_pair
    on_cuda = calibrate(var, vae, [0, 2], seeds=[0], drafter_frac=0.25)
    on_cpu = calibrate(*make_tiny_pair(seed=3, patch_nums=(1, 2, 3, 4, 6)), [0, 2], seeds=[0], drafter_frac=0.25)
    torch.testing.assert_close(torch.tensor(on_cuda["asi"]), torch.tensor(on_cpu["asi"]), atol=1e-3, rtol=1e-2)


def test_cuda_autocast_keeps_a_bf16_cache_in_eager_mode(cuda_pair):
    """CUDA autocast runs the q/k norm in fp32; the cache must still hold the autocast dtype (half the bytes)."""
    var, _ = cuda_pair
    cache = var.new_cache()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cond_BD = var.condition(torch.tensor([0, 1], device=CUDA))
        x_BLC = var.embed(cond_BD, torch.randn(2, var.seq_len - var.first_l, var.config.z_channels, device=CUDA), 0,
                          var.num_scales)
        var.run_blocks(x_BLC[:, :var.first_l], cond_BD, cache, 0)
    assert cache.keys[0].dtype == torch.bfloat16 and cache.values[0].dtype == torch.bfloat16


def test_rng_state_saved_with_more_gpus_than_visible_restores_the_visible_ones():
    state = rng_state()
    expected = torch.rand(4, device=CUDA)
    state["cuda"] = list(state["cuda"]) * 2 + [state["cuda"][0]]  # saved on a node with more GPUs
    set_rng_state(state, "test")
    assert torch.equal(torch.rand(4, device=CUDA), expected)

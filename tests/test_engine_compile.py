"""The sampler with compile= (CPU inductor): identical greedy tokens and logits within 1e-5 of eager on the
shipped pair, through the full engine (a second call replays the same graphs on the pooled cache)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from samplers import build_sampler
from training.checkpoint import load_any

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist"


@pytest.mark.slow
def test_compiled_sampler_equals_eager_on_the_shipped_pair():
    vae = load_any(SHIPPED / "tokenizer.safetensors", "vqvae")
    var = load_any(SHIPPED / "var_drafter.safetensors", "var")
    labels = torch.tensor([1, 8])
    args = dict(cfg=1.5, top_k=1, seed=0, decode=False, keep_logits=True)
    eager = build_sampler("default", var=var, vae=vae).sample(labels, **args)
    compiled_sampler = build_sampler("default", var=var, vae=vae, compile=True)
    for _ in range(2):  # the second call reuses the pooled cache: same buffers, no recompilation needed
        out = compiled_sampler.sample(labels, **args)
        assert all(torch.equal(a, b) for a, b in zip(out.tokens, eager.tokens))
        for a, b in zip(out.raw_logits, eager.raw_logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(compiled_sampler._cache_pool) == 1


def test_compile_and_precision_arguments_are_checked():
    vae = load_any(SHIPPED / "tokenizer.safetensors", "vqvae")
    var = load_any(SHIPPED / "var_drafter.safetensors", "var")
    with pytest.raises(ValueError, match="torch.compile mode"):
        build_sampler("default", var=var, vae=vae, compile="fastest")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        build_sampler("default", var=var, vae=vae, precision="bf16")
    with pytest.raises(ValueError, match="rng must be"):
        build_sampler("default", var=var, vae=vae, rng="numpy")

"""compile_blocks: one traced graph per scale over the static cache, reused across caches; compiled = eager.

The fast tests trace with a counting backend (Dynamo + our graphs run eagerly), which checks what the
static cache promises a compiler: no graph breaks, in-place cache writes that survive tracing, guards
that hold across generations. The slow test runs the CPU inductor backend on the shipped drafter.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_pair
from var.compile import compile_blocks

DRAFTER = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist" / "var_drafter.safetensors"


class CountingBackend:
    """A torch.compile backend that records each graph and runs it as traced (aten ops, no codegen)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def random_scales(var, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cond = var.condition(torch.randint(0, var.num_classes, (batch,), generator=g))
    x_in = torch.randn(batch, var.seq_len - var.first_l, var.config.z_channels, generator=g)
    with torch.no_grad():
        return var.embed(cond, x_in, 0, var.num_scales), cond


def per_scale(var, run, cache, x_all, cond):
    out = []
    with torch.no_grad():
        for si, (b, e) in enumerate(var.begin_ends):
            out.append(var.logits(run(x_all[:, b:e], cond, cache, si), cond))
    return out


def test_one_graph_per_scale_reused_by_new_and_cleared_caches():
    var, _ = make_tiny_pair(seed=0, patch_nums=(1, 2, 3, 4, 5))
    torch._dynamo.reset()
    backend = CountingBackend()
    run = compile_blocks(var, "default", backend=backend)
    x_all, cond = random_scales(var, 2, 0)
    eager_cache, cache = var.new_cache(), var.new_cache()
    eager = per_scale(var, var.run_blocks, eager_cache, x_all, cond)
    traced = per_scale(var, run, cache, x_all, cond)
    assert backend.graphs == var.num_scales
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    for layer in range(var.depth):  # the cache writes happened in the real buffers
        torch.testing.assert_close(cache.keys[layer], eager_cache.keys[layer], atol=1e-6, rtol=1e-6)
        assert cache.positions[layer].equal(eager_cache.positions[layer])
    cache.clear()
    again = per_scale(var, run, cache, x_all, cond)
    per_scale(var, run, var.new_cache(), x_all, cond)
    assert backend.graphs == var.num_scales  # guards hold: no retrace for a cleared or a new cache
    assert all(torch.equal(a, b) for a, b in zip(traced, again))


def test_rollback_and_compression_between_compiled_scales():
    """SJD/ScaleKV drive the cache between forwards; the traced forward must see the new lengths."""
    var, _ = make_tiny_pair(seed=1, patch_nums=(1, 2, 3, 4))
    run = compile_blocks(var, "default", backend=CountingBackend())
    x_all, cond = random_scales(var, 2, 1)
    caches = var.new_cache(), var.new_cache()
    with torch.no_grad():
        for fn, cache in zip((var.run_blocks, run), caches):
            b2, e3 = var.begin_ends[2][0], var.begin_ends[3][1]
            fn(x_all[:, :b2], cond, cache, 0)  # prefill scales 0..1
            fn(x_all[:, b2:e3], cond, cache, 2)  # speculative 2..3
            cache.truncate(b2)
            fn(x_all[:, b2:var.begin_ends[2][1]], cond, cache, 2)
            for layer in range(var.depth):
                n = cache.layer_len(layer)
                cache.select(layer, torch.arange(n - 3 - layer, n).expand(2, var.config.num_heads, -1))
        outs = [fn(x_all[:, var.begin_ends[3][0]:], cond, cache, 3) for fn, cache in zip((var.run_blocks, run), caches)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
    assert [caches[1].layer_len(i) for i in range(var.depth)] == [caches[0].layer_len(i) for i in range(var.depth)]


def test_modes_observer_and_errors():
    var, _ = make_tiny_pair(seed=2)
    assert compile_blocks(var, None) == var.run_blocks
    with pytest.raises(ValueError, match="compile mode"):
        compile_blocks(var, "fast")
    with pytest.warns(UserWarning, match="CUDA graphs"):
        compile_blocks(var, "reduce-overhead")  # CPU model: falls back to mode 'default'
    compile_blocks(var, "max-autotune-no-cudagraphs", backend=CountingBackend())  # every torch.compile mode
    backend = CountingBackend()
    run = compile_blocks(var, "default", backend=backend)
    x_all, cond = random_scales(var, 2, 2)
    seen = []
    with torch.no_grad():
        run(x_all[:, :1], cond, var.new_cache(), 0, observer=lambda layer, q, k: seen.append(layer))
    assert seen == list(range(var.depth)) and backend.graphs == 0  # an observer runs eagerly


@pytest.mark.slow
def test_inductor_cpu_equals_eager_on_the_shipped_drafter():
    from training.checkpoint import load_any

    var = load_any(DRAFTER, "var").eval()
    x_all, cond = random_scales(var, 2, 3)
    eager = per_scale(var, var.run_blocks, var.new_cache(), x_all, cond)
    run = compile_blocks(var, "default")
    t0 = time.perf_counter()
    compiled = per_scale(var, run, var.new_cache(), x_all, cond)
    print(f"compile + first pass over {var.num_scales} scales: {time.perf_counter() - t0:.1f} s")
    for si, (a, b) in enumerate(zip(eager, compiled)):
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"greedy tokens differ at scale {si}"
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_traced_forward_under_cpu_autocast_keeps_a_bf16_cache():
    var, _ = make_tiny_pair(seed=3)
    run = compile_blocks(var, "default", backend=CountingBackend())
    x_all, cond = random_scales(var, 2, 4)
    caches = var.new_cache(), var.new_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, traced = (per_scale(var, fn, c, x_all, cond) for fn, c in zip((var.run_blocks, run), caches))
    assert caches[1].keys[0].dtype == torch.bfloat16  # allocated before tracing in the autocast dtype
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)

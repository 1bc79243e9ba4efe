"""Static KV cache: bitwise equal to the old torch.cat cache (kept here as the independent truth) for every
way samplers drive it, fixed buffer addresses, memory figures, and the run_blocks attention observer."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange

from tests.conftest import make_tiny_pair
from var import KVCache


class ConcatCache:
    """The cache before the static rewrite: every append concatenates. Same duck-typed interface."""

    def __init__(self, num_layers: int):
        self.keys, self.values, self.positions = [None] * num_layers, [None] * num_layers, [None] * num_layers
        self.record_queries, self.queries, self.seq_len = False, [None] * num_layers, 0

    @property
    def num_layers(self):
        return len(self.keys)

    def append(self, layer, k, v, start):
        B, H, l, _ = k.shape
        pos = torch.arange(start, start + l).expand(B, H, l)
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer], self.positions[layer] = k, v, pos
        else:
            self.keys[layer] = torch.cat((self.keys[layer], k), 2)
            self.values[layer] = torch.cat((self.values[layer], v), 2)
            self.positions[layer] = torch.cat((self.positions[layer], pos), 2)
        return self.keys[layer], self.values[layer]

    def layer_len(self, layer):
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def truncate(self, seq_len):
        for i in range(self.num_layers):
            keep = self.positions[i][0, 0] < seq_len
            self.keys[i], self.values[i] = self.keys[i][:, :, keep], self.values[i][:, :, keep]
            self.positions[i] = self.positions[i][:, :, keep]
        self.seq_len = min(self.seq_len, seq_len)

    def select(self, layer, idx):
        idx = idx.sort(-1).values
        g = idx.unsqueeze(-1).expand(-1, -1, -1, self.keys[layer].shape[-1])
        self.keys[layer], self.values[layer] = self.keys[layer].gather(2, g), self.values[layer].gather(2, g)
        self.positions[layer] = self.positions[layer].gather(2, idx)


CONFIGS = [dict(seed=0), dict(seed=1, patch_nums=(1, 2, 4, 6, 8), shared_aln=True, num_heads=2, depth=3),
           dict(seed=2, patch_nums=(2, 3, 5), depth=3)]


def inputs(var, batch: int, seed: int):
    """Random embedded tokens of every scale (no tokenizer needed) and the class vectors."""
    g = torch.Generator().manual_seed(seed)
    cond = var.condition(torch.randint(0, var.num_classes + 1, (batch,), generator=g))
    x_in = torch.randn(batch, var.seq_len - var.first_l, var.config.z_channels, generator=g)
    with torch.no_grad():
        return var.embed(cond, x_in, 0, var.num_scales), cond


def tokens_of(var, x_all, a: int, e: int):
    return x_all[:, var.begin_ends[a][0]:var.begin_ends[e - 1][1]]


def assert_same(var, static: KVCache, ref: ConcatCache):
    assert static.seq_len == ref.seq_len
    for i in range(var.depth):
        assert static.layer_len(i) == ref.layer_len(i)
        for a, b in ((static.keys, ref.keys), (static.values, ref.values), (static.positions, ref.positions)):
            assert torch.equal(a[i], b[i])


def both(var, x, cond, caches, scale_begin):
    with torch.no_grad():
        outs = [var.run_blocks(x, cond, c, scale_begin=scale_begin) for c in caches]
    assert torch.equal(outs[0], outs[1])
    return outs[0]


def buffer_ptrs(cache: KVCache):
    return [t.data_ptr() for t in cache.buffers()]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_scale_by_scale_and_prefill_are_bitwise_the_concat_cache(cfg):
    var, _ = make_tiny_pair(**cfg)
    x_all, cond = inputs(var, 3, 0)
    static, ref = var.new_cache(), ConcatCache(var.depth)
    for si in range(var.num_scales):
        both(var, tokens_of(var, x_all, si, si + 1), cond, (static, ref), si)
        assert_same(var, static, ref)
    static, ref = var.new_cache(), ConcatCache(var.depth)
    both(var, tokens_of(var, x_all, 0, 2), cond, (static, ref), 0)  # multi-scale prefill, block-causal mask
    ptrs = buffer_ptrs(static)
    both(var, tokens_of(var, x_all, 2, var.num_scales), cond, (static, ref), 2)
    assert_same(var, static, ref)
    assert buffer_ptrs(static) == ptrs  # written in place
    assert static.layer_len(0) == static.max_len == var.seq_len


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_rollback_then_refeed_is_bitwise_the_concat_cache(cfg):
    """SJD's pattern: feed a speculative window, roll back to the committed scales, re-feed other inputs."""
    var, _ = make_tiny_pair(**cfg)
    x_all, cond = inputs(var, 2, 1)
    x_alt, _ = inputs(var, 2, 2)
    static, ref = var.new_cache(), ConcatCache(var.depth)
    both(var, tokens_of(var, x_all, 0, 2), cond, (static, ref), 0)
    ptrs = buffer_ptrs(static)
    both(var, tokens_of(var, x_all, 2, 4), cond, (static, ref), 2)  # speculative scales 2..3
    for c in (static, ref):
        c.truncate(var.begin_ends[3][0])  # scale 2 committed, scale 3 rejected
    assert_same(var, static, ref)
    both(var, tokens_of(var, x_alt, 3, var.num_scales), cond, (static, ref), 3)
    assert_same(var, static, ref)
    for c in (static, ref):
        c.truncate(var.begin_ends[1][0])
    assert_same(var, static, ref)
    both(var, tokens_of(var, x_alt, 1, var.num_scales), cond, (static, ref), 1)
    assert_same(var, static, ref)
    assert buffer_ptrs(static) == ptrs


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_select_then_continue_is_bitwise_the_concat_cache(cfg):
    """Per-(row, head) compaction with different budgets per layer, then more scales on the compressed cache."""
    var, _ = make_tiny_pair(**cfg)
    x_all, cond = inputs(var, 2, 3)
    g = torch.Generator().manual_seed(4)
    static, ref = var.new_cache(), ConcatCache(var.depth)
    ptrs = None
    for si in range(var.num_scales):
        both(var, tokens_of(var, x_all, si, si + 1), cond, (static, ref), si)
        ptrs = ptrs or buffer_ptrs(static)
        if 1 <= si < var.num_scales - 1:
            for layer in range(var.depth):
                n = static.layer_len(layer)
                budget = max(1, n - 2 - layer)
                B, H = static.keys[layer].shape[:2]
                idx = torch.rand(B, H, n, generator=g).argsort(-1)[..., :budget]  # unsorted on purpose
                static.select(layer, idx)
                ref.select(layer, idx)
            assert_same(var, static, ref)
            pos = static.positions[0]
            assert bool((pos[..., 1:] > pos[..., :-1]).all()) and not bool((pos == pos[:, :1]).all())
    assert_same(var, static, ref)
    assert buffer_ptrs(static) == ptrs


def test_memory_figures_and_bad_use():
    var, _ = make_tiny_pair(seed=0)
    x_all, cond = inputs(var, 2, 5)
    cache = var.new_cache()
    assert cache.nbytes() == cache.allocated_bytes() == 0
    both(var, tokens_of(var, x_all, 0, 2), cond, (cache, ConcatCache(var.depth)), 0)
    C = var.embed_dim
    used = sum(k.numel() * k.element_size() for k in cache.keys + cache.values)
    assert cache.nbytes() == used == 2 * var.depth * 2 * var.begin_ends[1][1] * C * 4
    assert cache.allocated_bytes() == 2 * var.depth * 2 * var.seq_len * C * 4
    n0 = cache.layer_len(0)
    H = var.config.num_heads
    # a stale slot past the used entries, a negative index, a wrong row count, a missing head dimension
    for bad in (torch.full((2, H, 1), n0), torch.full((2, H, 1), -1), torch.zeros(1, H, 1, dtype=torch.long),
                torch.zeros(2, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"must be \(B, H, k\)"):
            cache.select(0, bad)
    assert torch.equal(cache.layer_keys(0), cache.keys[0])
    with pytest.raises(ValueError, match="no cached keys yet"):
        var.new_cache().layer_keys(0)
    cache.select(0, torch.zeros(2, var.config.num_heads, 1, dtype=torch.long))
    assert cache.nbytes() == used - 2 * 2 * (var.begin_ends[1][1] - 1) * C * 4
    ptrs = buffer_ptrs(cache)
    cache.clear()
    assert cache.nbytes() == 0 and cache.seq_len == 0 and buffer_ptrs(cache) == ptrs
    both(var, tokens_of(var, x_all, 0, 1), cond, (cache, ConcatCache(var.depth)), 0)
    with pytest.raises(ValueError, match="use one cache per batch"):
        var.run_blocks(tokens_of(var, x_all, 1, 2)[:1], cond[:1], cache, 1)
    small = KVCache(var.depth, max_len=3)
    with pytest.raises(ValueError, match="max_len 3"):
        var.run_blocks(tokens_of(var, x_all, 0, 2), cond, small, 0)


def test_bf16_storage_and_cpu_autocast():
    var, _ = make_tiny_pair(seed=1)
    x_all, cond = inputs(var, 2, 6)
    x = tokens_of(var, x_all, 0, 2)
    with torch.no_grad():
        fp32 = var.new_cache()
        full = var.run_blocks(x, cond, fp32)
        half = var.new_cache(dtype=torch.bfloat16)
        out = var.run_blocks(x, cond, half)  # stored in bf16, attended in fp32
        assert half.keys[0].dtype == half.values[0].dtype == torch.bfloat16
        assert 2 * half.nbytes() == fp32.nbytes() and 2 * half.allocated_bytes() == fp32.allocated_bytes()
        assert torch.equal(half.keys[0], fp32.keys[0].bfloat16())  # layer 0 sees the same input: rounding only
        torch.testing.assert_close(out, full, atol=0.05, rtol=0.05)
        static, ref = var.new_cache(), ConcatCache(var.depth)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for si in range(var.num_scales):
                both(var, tokens_of(var, x_all, si, si + 1), cond, (static, ref), si)
    assert static.keys[0].dtype == torch.bfloat16
    assert_same(var, static, ref)


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_observer_sees_exactly_what_attention_uses(cfg):
    """softmax(attention_logits(q, k)) @ v must be the layer's attention output (captured at `proj`'s input),
    and a forward with an observer must be bitwise the forward without one."""
    var, _ = make_tiny_pair(**cfg)
    x_all, cond = inputs(var, 2, 7)
    captured, seen = {}, {}
    hooks = [blk.attn.proj.register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, inp[0]))
             for i, blk in enumerate(var.blocks)]

    def observer(layer, q, k):
        seen[layer] = (q, k)

    try:
        watched, plain = var.new_cache(), var.new_cache()
        with torch.no_grad():
            for si in range(var.num_scales):
                x = tokens_of(var, x_all, si, si + 1)
                out = var.run_blocks(x, cond, watched, si, observer=observer)
                assert torch.equal(out, var.run_blocks(x, cond, plain, si))
                for layer, (q, k) in seen.items():
                    assert k.shape[2] == watched.layer_len(layer) == var.begin_ends[si][1]
                    assert torch.equal(k, watched.keys[layer])
                    attn = var.blocks[layer].attn.attention_logits(q, k).softmax(-1)
                    mixed = rearrange(attn @ watched.values[layer], "b h l c -> b l (h c)")
                    torch.testing.assert_close(mixed, captured[layer], atol=1e-6, rtol=1e-6)
    finally:
        for h in hooks:
            h.remove()

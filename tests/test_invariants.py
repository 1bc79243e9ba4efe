"""Invariants of the model and the default sampler on random tiny configurations (no golden data needed)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_tiny_pair
from samplers import build_sampler

CONFIGS = [
    dict(seed=0),
    dict(seed=1, patch_nums=(1, 2, 4, 6, 8), shared_aln=True, num_heads=2),
    dict(seed=2, patch_nums=(2, 3, 5), depth=3, vocab_size=48),  # first scale with 4 start tokens
]


@pytest.mark.parametrize("cfg_kwargs", CONFIGS)
def test_kv_cache_sampling_equals_full_block_causal_forward(cfg_kwargs):
    var, vae = make_tiny_pair(**cfg_kwargs)
    labels = torch.tensor([0, 3, 1])
    out = build_sampler("default", var=var, vae=vae).sample(labels, cfg=2.0, top_k=10, top_p=0.9, seed=5,
                                                               keep_logits=True, decode=False)
    null = torch.full_like(labels, var.num_classes)
    with torch.no_grad():
        x_tf = vae.teacher_forcing_input(out.tokens).repeat(2, 1, 1)
        full = var(torch.cat((labels, null)), x_tf)  # (2B, L, V) in one masked forward
    cached = torch.cat(out.raw_logits, dim=1)
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-5)
    assert out.stats.forwards == {"var": var.num_scales}
    assert out.stats.tokens_processed == {"var": 2 * len(labels) * var.seq_len}


def test_prefill_of_several_scales_equals_one_scale_at_a_time(tiny_pair):
    var, vae = tiny_pair
    labels = torch.tensor([1, 4])
    tokens = build_sampler("default", var=var, vae=vae).sample(labels, cfg=0.0, seed=0, decode=False).tokens
    cond = var.condition(labels)
    x_all = var.embed(cond, vae.teacher_forcing_input(tokens), 0, var.num_scales)
    with torch.no_grad():
        step_cache, steps = var.new_cache(), []
        for si, (b, e) in enumerate(var.begin_ends):
            steps.append(var.run_blocks(x_all[:, b:e], cond, step_cache, scale_begin=si))
        prefill_cache = var.new_cache()
        split = var.begin_ends[2][0]
        head = var.run_blocks(x_all[:, :split], cond, prefill_cache, scale_begin=0)  # scales 0..1 at once
        tail = var.run_blocks(x_all[:, split:], cond, prefill_cache, scale_begin=2)  # scales 2.. at once
    torch.testing.assert_close(torch.cat((head, tail), 1), torch.cat(steps, 1), atol=2e-5, rtol=1e-5)
    for layer in range(var.depth):
        torch.testing.assert_close(prefill_cache.keys[layer], step_cache.keys[layer], atol=2e-5, rtol=1e-5)
    assert prefill_cache.seq_len == step_cache.seq_len == var.seq_len


def test_cache_rollback_then_refeed_reproduces_the_logits(tiny_pair):
    var, vae = tiny_pair
    labels = torch.tensor([2])
    tokens = build_sampler("default", var=var, vae=vae).sample(labels, cfg=0.0, seed=1, decode=False).tokens
    cond = var.condition(labels)
    x_all = var.embed(cond, vae.teacher_forcing_input(tokens), 0, var.num_scales)
    b2, e2 = var.begin_ends[2]
    with torch.no_grad():
        cache = var.new_cache()
        var.run_blocks(x_all[:, :b2], cond, cache, scale_begin=0)
        first = var.run_blocks(x_all[:, b2:e2], cond, cache, scale_begin=2)
        cache.truncate(b2)
        assert cache.seq_len == b2 and all(cache.layer_len(i) == b2 for i in range(var.depth))
        again = var.run_blocks(x_all[:, b2:e2], cond, cache, scale_begin=2)
    assert torch.equal(first, again)


def test_rows_do_not_depend_on_each_other():
    var, vae = make_tiny_pair(seed=3)
    sampler = build_sampler("default", var=var, vae=vae)
    labels, seeds = torch.tensor([0, 2, 4, 1]), [10, 11, 12, 13]
    batch = sampler.sample(labels, cfg=1.5, top_k=8, top_p=0.95, seed=seeds)
    for b in (0, 2):
        alone = sampler.sample(labels[b:b + 1], cfg=1.5, top_k=8, top_p=0.95, seed=[seeds[b]])
        for si in range(var.num_scales):
            assert torch.equal(alone.tokens[si][0], batch.tokens[si][b])
        torch.testing.assert_close(alone.images[0], batch.images[b], atol=1e-5, rtol=1e-5)
    # the greedy path needs no per-row seeds at all
    greedy = sampler.sample(labels, cfg=1.5, top_k=1, seed=0, decode=False)
    greedy_one = sampler.sample(labels[1:2], cfg=1.5, top_k=1, seed=0, decode=False)
    assert all(torch.equal(g[1], o[0]) for g, o in zip(greedy.tokens, greedy_one.tokens))


@pytest.mark.parametrize("more_smooth", [False, True])
def test_fixed_seed_gives_identical_output_twice(tiny_pair, more_smooth):
    var, vae = tiny_pair
    sampler = build_sampler("default", var=var, vae=vae)
    kwargs = dict(batch_size=3, cfg=1.5, top_k=10, top_p=0.9, more_smooth=more_smooth, seed=42)
    a, b = sampler.sample(None, **kwargs), sampler.sample(None, **kwargs)
    assert torch.equal(a.labels, b.labels)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert torch.equal(a.images, b.images)
    c = sampler.sample(None, **{**kwargs, "seed": 43})
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens)), "the seed must matter"


def test_stats_are_real_counters(tiny_pair):
    var, vae = tiny_pair
    out = build_sampler("default", var=var, vae=vae).sample(torch.tensor([0, 1]), cfg=1.0, seed=0)
    C, B = var.embed_dim, 2
    ends = [e for _, e in var.begin_ends]
    # keys + values of every layer for 2B rows (CFG doubles the batch), float32
    assert out.stats.kv_bytes_per_scale == [2 * var.depth * 2 * B * e * C * 4 for e in ends]
    assert out.stats.kv_bytes_peak == out.stats.kv_bytes_per_scale[-1]
    assert out.stats.wall_time_s > 0
    assert out.images.shape == (B, 3, vae.config.image_size, vae.config.image_size)
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0


def test_top_k_keeps_ties_and_top_p_keeps_argmax():
    from samplers.logits_processing import top_k_top_p_filter_
    logits = torch.tensor([[[3.0, 1.0, 3.0, 2.0, 3.0]]])
    kept = torch.isfinite(top_k_top_p_filter_(logits.clone(), top_k=2))
    assert kept.tolist() == [[[True, False, True, False, True]]]  # three-way tie at the threshold survives
    peaked = torch.tensor([[[10.0, 0.0, 0.0]]])
    assert torch.isfinite(top_k_top_p_filter_(peaked.clone(), top_p=1e-6)).tolist() == [[[True, False, False]]]
    flat = torch.zeros(1, 1, 4)
    probs = top_k_top_p_filter_(flat.clone(), top_p=0.5).softmax(-1)
    assert (probs > 0).sum() == 2 and torch.isclose(probs.sum(), torch.tensor(1.0))  # mass 0.5 <= 1 - top_p goes


def test_quantizer_training_forward_straight_through_and_counters(tiny_pair):
    _, vae = tiny_pair
    q = vae.quantize.train()
    f = torch.randn(3, vae.z_channels, 4, 4, requires_grad=True)
    out = q(f)
    idx, fhats = q.encode(f.detach(), return_fhat_per_scale=True)
    torch.testing.assert_close(out.f_hat_st, fhats[-1], atol=1e-6, rtol=1e-6)  # forward value is f_hat
    out.f_hat_st.sum().backward(retain_graph=True)
    assert torch.equal(f.grad, torch.ones_like(f)), "straight-through: the decoder gradient reaches f unchanged"
    assert out.hits_per_scale.sum(1).tolist() == [3 * p * p for p in q.patch_nums]
    assert all(torch.equal(a, b) for a, b in zip(out.idx_per_scale, idx))
    # vq loss = (1 + beta)/SN * sum_k mse(f_hat_k, f) in value (spec 2.5)
    expected = (1 + q.beta) / len(fhats) * sum(torch.mean((fh - f.detach()) ** 2) for fh in fhats)
    torch.testing.assert_close(out.vq_loss, expected, atol=1e-6, rtol=1e-5)
    assert q.ema_vocab_hit_SV.sum(1).gt(0).all(), "training updates the usage statistics"
    q.eval()


def _usage_on_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    q = make_tiny_pair(seed=4)[1].quantize.train()
    f = torch.randn(2, q.z_channels, 4, 4, generator=torch.Generator().manual_seed(rank))
    out = q(f)
    save_file({"ema": q.ema_vocab_hit_SV.contiguous(), "hits": out.hits_per_scale.contiguous()},
              f"{out_dir}/rank{rank}.safetensors")
    torch.distributed.destroy_process_group()


def test_codebook_usage_counts_every_process(tmp_path):
    """Two gloo processes, each its own batch: both hold the usage statistic of the two batches together."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_usage_on_rank, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    q = make_tiny_pair(seed=4)[1].quantize.train()
    total = sum(q(torch.randn(2, q.z_channels, 4, 4, generator=torch.Generator().manual_seed(r))).hits_per_scale
                for r in range(2))
    expected = total / total.sum(1, keepdim=True)  # a fresh statistic starts at the first batch's rates
    for got in ranks:
        assert torch.equal(got["hits"], total)
        torch.testing.assert_close(got["ema"], expected)


def test_teacher_forcing_input_is_fp32_inside_an_autocast_region(tiny_pair):
    """The trainer builds the VAR input under autocast; its phi convolutions must still run in float32."""
    _, vae = tiny_pair
    q = vae.quantize
    idx = [torch.randint(0, q.vocab_size, (3, p * p), generator=torch.Generator().manual_seed(p)) for p in q.patch_nums]
    plain = q.teacher_forcing_input(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q.teacher_forcing_input(idx), plain)

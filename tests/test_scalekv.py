"""ScaleKV: exactness without compression, exact per-(layer, head) budgets, ASI identification, calibration file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from scipy.ndimage import maximum_filter1d

from samplers import DefaultSampler, build_sampler
from samplers.engine import conditions as conditions_for
from samplers.scalekv.calibration import (asi_terms, calibrate, identify_drafters, load_calibration, save_calibration,
                                  zscore_per_scale)
from samplers.scalekv.policies import (KVPolicy, pool_scores, peak_cache_len, scale_lengths, select_topk,
                                     window_cache_index, window_offsets)
from samplers.scalekv.sampler import ScaleKVSampler, allocate_scale, build_policy, even_fill
from tests.test_code import LABELS, PN, same_tokens, tiny_var
from tokenizers import VQVAE, VQVAEConfig
from training.checkpoint import load_any


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=PN)).eval()
    var = tiny_var(11, depth=4)
    path = tmp_path_factory.mktemp("cal") / "cal.json"
    save_calibration(calibrate(var, vae, [0, 3, 6, 9], seeds=[0], drafter_frac=0.25), path)
    return vae, var, path


@pytest.mark.parametrize("policy", ["scalekv", "snapkv", "window"])
def test_budget_covering_the_cache_is_bitwise_uncompressed(setup, policy):
    vae, var, cal = setup
    args = dict(cfg=1.5, top_k=10, top_p=0.9, seed=3)
    ref = DefaultSampler(var, vae).sample(LABELS, **args)
    out = ScaleKVSampler(var, vae, policy=policy, budget_frac=1.0, calibration=str(cal)).sample(LABELS, **args)
    assert same_tokens(ref, out) and torch.equal(ref.f_hat, out.f_hat)
    assert out.stats.kv_bytes_per_scale == ref.stats.kv_bytes_per_scale


class CheckedPolicy(KVPolicy):
    """Test wrapper: runs the real policy, then checks the cache it left behind."""

    def __init__(self, inner):
        self.inner, self.needs_queries, self.seen = inner, inner.needs_queries, []

    def compress(self, cache, model, si, queries=None):
        lens = [cache.layer_len(i) for i in range(cache.num_layers)]
        budgets = None if si == len(PN) - 1 else self.inner.layer_budgets(cache.num_layers, PN, si, lens)
        win = [cache.positions[i][:, :, window_cache_index(lens[i], PN[si])].clone() for i in range(cache.num_layers)]
        record = self.inner.compress(cache, model, si, queries)
        for layer in range(cache.num_layers):
            pos = cache.positions[layer]
            want = lens[layer] if budgets is None else min(budgets[layer], lens[layer])
            assert cache.keys[layer].shape[2] == cache.values[layer].shape[2] == pos.shape[2] == want
            assert bool((pos[..., 1:] > pos[..., :-1]).all()), "positions must stay sorted and unique per (row, head)"
            if self.needs_queries:  # score-based selection always keeps the observation window
                assert bool(torch.isin(win[layer], pos).all())
        self.seen.append((si, budgets, record.after))
        return record


@pytest.mark.parametrize("policy", ["scalekv", "snapkv", "window"])
def test_each_layer_and_head_holds_exactly_its_budget(setup, policy):
    vae, var, cal = setup
    frac = 0.4
    B = round(frac * peak_cache_len(PN))  # 22 of 55 entries
    checked = CheckedPolicy(build_policy(policy, var, frac, str(cal)))
    out = ScaleKVSampler(var, vae, policy=checked).sample(LABELS, cfg=1.5, top_k=10, seed=1)
    compressed = [(si, b, after) for si, b, after in checked.seen if b is not None]
    assert [si for si, _, _ in compressed] == [3, 4]  # caches of 30 and 22+25 entries exceed 22; the last scale never
    for si, budgets, after in compressed:
        assert after == budgets and sum(budgets) == B * var.depth  # layer average equals the uniform budget
    if policy == "scalekv":
        assert any(len(set(b)) > 1 for _, b, _ in compressed), "drafter layers get more than refiners"
    held = out.stats.extra["kv_bytes_after_compression"]
    per_entry = 2 * 2 * len(LABELS) * var.embed_dim * 4  # k + v, 2B rows, fp32
    assert held[3] == held[4] == B * var.depth * per_entry
    assert out.stats.kv_bytes_peak < DefaultSampler(var, vae).sample(LABELS, cfg=1.5, top_k=10, seed=1).stats.kv_bytes_peak


def test_per_head_selection_differs_between_heads_and_rows(setup):
    vae, var, cal = setup
    policy = build_policy("snapkv", var, 0.4)
    after_scale_3 = []

    class Spy(KVPolicy):  # the real policy; keeps layer 1's positions after the compression of scale 3
        needs_queries = True

        def compress(self, cache, model, si, queries=None):
            record = policy.compress(cache, model, si, queries)
            if si == 3:
                after_scale_3.append(cache.positions[1].clone())
            return record
    ScaleKVSampler(var, vae, policy=Spy()).sample(LABELS, cfg=1.5, top_k=10, seed=0, decode=False)
    pos = after_scale_3[0]
    assert not bool((pos == pos[:, :1]).all()) and not bool((pos == pos[:1]).all())


def test_select_topk_and_pooling_against_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 12, generator=g)
    keep = torch.tensor([10, 11])
    idx = select_topk(scores, keep, budget=6)
    for b in range(2):
        for h in range(3):
            others = sorted(range(10), key=lambda i: -float(scores[b, h, i]))[:4]
            assert sorted(idx[b, h].tolist()) == sorted(others + [10, 11])
    pooled = pool_scores(scores, "max", 5)
    expect = maximum_filter1d(scores.numpy(), size=5, axis=-1, mode="constant", cval=-np.inf)
    np.testing.assert_array_equal(pooled.numpy(), expect)
    # a budget below the window size: the window competes like every other entry
    assert torch.equal(select_topk(scores, keep, budget=1)[..., 0], scores.argmax(-1))
    with pytest.raises(ValueError, match="at least 1"):
        select_topk(scores, keep, budget=0)


def test_select_topk_breaks_ties_towards_earlier_positions():
    """Integer scores, so most entries tie: the kept set must be the first `budget` entries of a stable sort
    by (window first, then descending score, then position), enumerated by hand, and come back in order."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (3, 4, 17), generator=g).float()
    scores[0, 0, 5:9] = float("-inf")  # entries whose whole pooling neighbourhood was excluded
    keep = torch.tensor([13, 15, 16])
    for budget in (1, 2, 3, 4, 9, 16, 17):
        idx = select_topk(scores, keep, budget)
        assert idx.shape == (3, 4, budget) and bool((idx[..., 1:] > idx[..., :-1]).all())
        for b in range(3):
            for h in range(4):
                rank = {i: (0 if budget >= len(keep) and i in keep.tolist() else 1, -float(scores[b, h, i]), i)
                        for i in range(17)}
                assert idx[b, h].tolist() == sorted(sorted(range(17), key=rank.__getitem__)[:budget])
    with pytest.raises(ValueError, match="exceeds"):
        select_topk(scores, keep, 18)


def test_logit_scores_are_the_summed_window_logits(setup):
    """'logits' scores use one summed query per head, (sum_w q_w) . k; without pooling they must equal the
    window's attention logits summed over the window, as the layer computes them (linearity of q . k)."""
    vae, var, _ = setup
    policy = build_policy("snapkv", var, 0.4, pooling="none")
    cache, queries = var.new_cache(), [None] * var.depth
    tokens = DefaultSampler(var, vae).sample(LABELS, seed=0, cfg=1.5, top_k=10, decode=False).tokens
    x_tf = vae.quantize.teacher_forcing_input(tokens).repeat(2, 1, 1)
    cond, si = conditions_for(var, LABELS), 4
    with torch.no_grad():
        var.run_blocks(var.embed(cond, x_tf[:, :scale_lengths(PN)[si] - 1], 0, si + 1), cond, cache, 0,
                       lambda layer, q, k: queries.__setitem__(layer, q[:, :, -PN[si] ** 2:]))  # scale si's
        for layer in range(var.depth):
            expect = policy.window_logits(cache, var, layer, si, queries).sum(dim=2)
            torch.testing.assert_close(policy.scores(cache, var, layer, si, queries), expect, atol=1e-5, rtol=1e-5)


def test_window_geometry():
    assert window_offsets(4).tolist() == list(range(16))
    off = window_offsets(8)
    assert off.tolist() == [r * 8 + c for r in (0, 2, 4, 6) for c in (0, 2, 4, 6)]  # the authors' cell centres
    assert window_offsets(13).tolist()[:4] == [14, 17, 20, 23]  # cells of 3, centre 1: row 1, columns 1, 4, 7, 10
    assert window_offsets(3).tolist() == list(range(9))  # smaller maps: every token is a query
    assert window_cache_index(40, 5).min() >= 40 - 25


def test_budget_allocation_keeps_the_mean_and_caps():
    shares, left = even_fill(10, [2, 100, 100])
    assert shares == [2, 4, 4] and left == 0
    lens = [50, 50, 50, 50]
    b = allocate_scale(lens, [True, False, False, False], budget=20, refiner_frac=0.8, floor=16)
    assert b == [32, 16, 16, 16] and sum(b) == 80
    capped = allocate_scale([30, 50, 50, 50], [True, False, False, False], 20, 0.5, 16)
    assert capped[0] == 30 and sum(capped) == 80  # drafter capped at what it holds; refiners take the rest
    assert allocate_scale(lens, [False] * 4, 20, 0.5, 16) == [20] * 4


def test_asi_identifies_the_diffuse_layer_on_a_synthetic_tensor():
    """4 layers, 4 current queries, 10 history keys; the two heads differ but average to the designed rows."""
    hist, cur = 10, 4

    def layer(row):  # row: head-averaged attention of every query; split unevenly over two heads
        A = torch.tensor(row).expand(1, 1, cur, hist + cur)
        h0 = A * 0.5
        h0[..., :] += torch.linspace(-1, 1, hist + cur) * 0.01
        return torch.cat((h0, 2 * A - h0), dim=1)

    uniform = [1 / 14] * 14  # diffuse: current 4/14, top-2 history 2/14 -> ASI 8/196
    local = [0.1] + [0.0] * 9 + [0.225] * 4  # current .9, top-2 history .1 -> .09
    selective = [0.0] * 3 + [0.5] + [0.0] * 6 + [0.125] * 4  # .5 x .5 -> .25
    split = [0.2, 0.2] + [0.0] * 8 + [0.15] * 4  # .6 x .4 -> .24
    expected = [8 / 196, 0.09, 0.25, 0.24]
    for row, want in zip((uniform, local, selective, split), expected):
        current, conc = asi_terms(layer(row), cur, hist_topk=2)
        assert float(current.mean() * conc.mean()) == pytest.approx(want, abs=1e-6)
    asi = torch.zeros(4, 4)
    asi[:, 1] = torch.tensor(expected)
    asi[:, 2] = torch.tensor(expected) * 10 + 3  # another scale on another range: z-scores are per scale
    z = zscore_per_scale(asi, [1, 2])
    torch.testing.assert_close(z[:, 1], z[:, 2], atol=1e-4, rtol=1e-4)
    mask = identify_drafters(asi, [1, 2], drafter_frac=2 / 8)
    assert [(l, k) for l in range(4) for k in range(4) if mask[l][k]] == [(0, 1), (0, 2)]
    assert sum(map(sum, identify_drafters(asi, [1, 2], 0.0))) == 0
    # pooled (the paper) vs per scale: two diffuse layers at scale 1 (z -1.01, -0.99), none at scale 2 (three
    # layers at z -0.58, one selective outlier)
    asi = torch.tensor([[0.0, 0.01, 0.50], [0.0, 0.02, 0.50], [0.0, 0.90, 0.50], [0.0, 0.91, 0.90]])
    drafters = {sel: sorted((l, k) for l in range(4) for k in range(3) if identify_drafters(asi, [1, 2], 0.25, sel)[l][k])
                for sel in ("pooled", "per_scale")}
    assert drafters == {"pooled": [(0, 1), (1, 1)], "per_scale": [(0, 1), (0, 2)]}
    with pytest.raises(ValueError, match="selection must be one of"):
        identify_drafters(asi, [1, 2], 0.25, "global")


def test_calibration_file_is_deterministic_and_tied_to_the_model(setup, tmp_path):
    vae, var, cal = setup
    data = json.loads(cal.read_text())
    assert data["scales"] == [1, 2, 3, 4] and len(data["drafters"]) == 4 * max(1, round(0.25 * var.depth))
    # the paper's pooled rule: the N_d pairs of smallest z over every ranked (layer, scale) pair
    pairs = sorted((data["z"][l][k], k, l) for k in data["scales"] for l in range(var.depth))
    assert sorted([l, k] for _, k, l in pairs[: len(data["drafters"])]) == sorted(data["drafters"])
    assert data["settings"]["selection"] == "pooled"
    assert all(not any(row[k] for row in data["drafter_mask"]) for k in (0, len(PN) - 1))
    again = save_calibration(calibrate(var, vae, [0, 3, 6, 9], seeds=[0], drafter_frac=0.25), tmp_path / "again.json")
    assert json.loads(again.read_text()) == data
    assert not list(tmp_path.glob(".*tmp*")), "the write is atomic (no temp file left)"
    assert load_calibration(cal, var)["drafters"] == data["drafters"]
    other = tiny_var(11, depth=4)
    with torch.no_grad():
        other.head.bias.add_(1e-3)
    with pytest.raises(ValueError, match="different model.*weights"):
        load_calibration(cal, other)
    with pytest.raises(ValueError, match="different model.*config"):
        build_policy("scalekv", tiny_var(11, depth=3), 0.4, str(cal))
    with pytest.raises(FileNotFoundError, match="samplers.scalekv.calibration"):
        load_calibration(tmp_path / "missing.json", var)
    for name, text, message in (("bad.json", "{bad", "is not readable JSON"), ("list.json", "[1, 2]", "is not a"),
                                ("nomodel.json", json.dumps({k: v for k, v in data.items() if k != "model"}),
                                 "is not a")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            load_calibration(tmp_path / name, var)


def test_registry_and_bad_options(setup):
    vae, var, cal = setup
    assert isinstance(build_sampler("scalekv", var=var, vae=vae, policy="snapkv"), ScaleKVSampler)
    with pytest.raises(ValueError, match="unknown KV policy"):
        ScaleKVSampler(var, vae, policy="h2o")
    with pytest.raises(ValueError, match="budget_frac"):
        ScaleKVSampler(var, vae, policy="window", budget_frac=1.5)
    with pytest.raises(ValueError, match="calibration"):
        ScaleKVSampler(var, vae, policy="scalekv")
    assert scale_lengths(PN)[-2] == peak_cache_len(PN) == 55


def test_scores_come_from_the_attention_the_layer_really_computes(setup):
    """softmax(window logits) @ cached V must reproduce the layer's own attention output (captured before
    `proj` by a forward hook) at the window positions: same normalised q, k and scale as the model."""
    vae, var, _ = setup
    policy = build_policy("snapkv", var, 0.4)
    captured = {}
    hooks = [blk.attn.proj.register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, inp[0]))
             for i, blk in enumerate(var.blocks)]
    try:
        tokens = DefaultSampler(var, vae).sample(LABELS, seed=0, cfg=1.5, top_k=10, decode=False).tokens
        x_tf = vae.quantize.teacher_forcing_input(tokens).repeat(2, 1, 1)
        cond = conditions_for(var, LABELS)
        cache = var.new_cache()
        queries = [None] * var.depth  # recorded through the model's attention observer
        si = 4  # prefill scales 0..4 in one forward; the window queries are the 4x4 grid centres of the 5x5 map
        with torch.no_grad():
            var.run_blocks(var.embed(cond, x_tf[:, :scale_lengths(PN)[si] - 1], 0, si + 1), cond, cache, 0,
                           lambda layer, q, k: queries.__setitem__(layer, q[:, :, -25:]))  # the 5x5 map's
            for layer in range(var.depth):
                attn = policy.window_logits(cache, var, layer, si, queries).softmax(-1)
                out = rearrange(attn @ cache.values[layer], "b h w c -> b w (h c)")
                real = captured[layer][:, scale_lengths(PN)[si] - 25:][:, window_offsets(5)]
                torch.testing.assert_close(out, real, atol=1e-5, rtol=1e-5)
    finally:
        for h in hooks:
            h.remove()


def test_paper_variant_switches(setup):
    """softmax scores, average pooling, head-shared selection: exact budgets, identical positions in all heads."""
    vae, var, cal = setup
    for per_head in (False, True):
        checked = CheckedPolicy(build_policy("scalekv", var, 0.4, str(cal), score="softmax", pooling="avg",
                                             per_head=per_head))
        sampler = ScaleKVSampler(var, vae, policy=checked)
        cache_positions = []
        orig = checked.inner.compress

        def spy(cache, model, si, queries=None, orig=orig):
            rec = orig(cache, model, si, queries)
            cache_positions.append([p.clone() for p in cache.positions])
            return rec
        checked.inner.compress = spy
        sampler.sample(LABELS, cfg=1.5, top_k=10, seed=2)
        pos = cache_positions[4][0]  # layer 0 after the second compressed scale
        assert bool((pos == pos[:, :1]).all()) == (not per_head)


def test_window_entries_take_no_part_in_pooling():
    """As the authors' code: window scores are masked before the max pooling, so a window key's large
    self-score never spreads to its neighbours; average pooling averages over the non-window entries."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 20, generator=g)
    window = torch.tensor([12, 15, 18])
    scores[..., window] = 50.0  # window keys score far above the rest
    masked = scores.clone()
    masked[..., window] = -np.inf
    expect = maximum_filter1d(masked.numpy(), size=5, axis=-1, mode="constant", cval=-np.inf)
    pooled = pool_scores(scores, "max", 5, exclude_idx=window)
    np.testing.assert_array_equal(pooled.numpy(), expect)
    assert float(pooled.max()) < 50.0  # no neighbour inherits a window score
    avg = pool_scores(scores, "avg", 5, exclude_idx=window)
    for i in (10, 13, 16):
        near = [j for j in range(i - 2, i + 3) if 0 <= j < 20 and j not in window.tolist()]
        torch.testing.assert_close(avg[..., i], scores[..., near].mean(-1))


def test_scalekv_keeps_other_positions_than_snapkv_at_equal_budgets():
    """On the shipped drafter with its calibration: every compressed scale has drafter layers, the per-layer
    budgets differ from the uniform ones, and so do the kept positions (same seeds, same mean budget)."""
    root = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist"
    vae = load_any(root / "tokenizer.safetensors", "vqvae")
    var = load_any(root / "var_drafter.safetensors", "var")
    cal = load_calibration(root / "scalekv_drafter.json", var)
    for frac in (0.10, 0.25, 0.35):
        budget = max(1, round(frac * peak_cache_len(var.patch_nums)))
        compressed = [k for k, n in enumerate(scale_lengths(var.patch_nums)[:-1]) if n > budget]
        assert compressed and all(any(cal["drafter_mask"][l][k] for l in range(var.depth)) for k in compressed)
    kept = {}
    for kind in ("scalekv", "snapkv"):
        records = []
        policy = build_policy(kind, var, 0.35, str(root / "scalekv_drafter.json"))

        class Spy(KVPolicy):
            needs_queries = True

            def compress(self, cache, model, si, queries=None, policy=policy):
                record = policy.compress(cache, model, si, queries)
                records.append((record.before != record.after, record.after, [p.clone() for p in cache.positions]))
                return record
        out = ScaleKVSampler(var, vae, policy=Spy()).sample(LABELS, cfg=1.5, top_k=20, seed=[0, 1, 2], decode=False)
        kept[kind] = (records, out)
    (sk, _), (sn, _) = kept["scalekv"], kept["snapkv"]
    compressed = [i for i, (did, _, _) in enumerate(sk) if did]
    assert compressed and compressed == [i for i, (did, _, _) in enumerate(sn) if did]
    assert any(sk[i][1] != sn[i][1] for i in compressed), "ScaleKV's per-layer budgets equal the uniform ones"
    for i in compressed:
        assert sum(sk[i][1]) == sum(sn[i][1])  # the same mean budget
    assert any(not torch.equal(a, b) for i in compressed for a, b in zip(sk[i][2], sn[i][2]))


@pytest.mark.parametrize("window_only", [False, True])
def test_policy_sees_the_queries_of_the_committed_scale_under_speculation(setup, window_only):
    """sjd+scalekv: a speculative forward covers a window of scales, of which only some may be committed. The
    policy must get the queries of the last committed scale (what its window scores), never the tail of the
    forward (a later, uncommitted scale), and they must equal a teacher-forced forward's on the final tokens:
    all of the map's rows, or only those its `query_rows` asks for (what score-based selection records)."""
    vae, var, _ = setup
    seen = []

    class Spy(KVPolicy):  # records the queries it is given and compresses nothing, so the cache stays exact
        needs_queries = True

        def query_rows(self, pn):
            return window_offsets(pn) if window_only else None

        def compress(self, cache, model, si, queries=None):
            seen.append((si, [q.clone() for q in queries]))
            return None
    sampler = build_sampler("sjd+scalekv", var=var, vae=vae, policy=Spy(), window_scales=3, max_spec_tokens=100)
    out = sampler.sample(LABELS, cfg=1.5, top_k=10, seed=3, decode=False)
    # the passes computed more positions than they committed: some forwards ran past the last committed scale
    assert sum(out.stats.tokens_processed.values()) > 2 * len(LABELS) * scale_lengths(PN)[-1]
    assert [si for si, _ in seen][-1] == len(PN) - 1
    x_tf = vae.quantize.teacher_forcing_input(out.tokens).repeat(2, 1, 1)
    cond, ref = conditions_for(var, LABELS), [None] * var.depth
    with torch.no_grad():
        var.run_blocks(var.embed(cond, x_tf, 0, len(PN)), cond, var.new_cache(), 0,
                       lambda layer, q, k: ref.__setitem__(layer, q))
    begins = [0] + scale_lengths(PN)
    for si, queries in seen:
        for layer in range(var.depth):
            expect = ref[layer][:, :, begins[si]:begins[si + 1]]
            if window_only:
                expect = expect[:, :, window_offsets(PN[si])]
            assert queries[layer].shape == expect.shape
            torch.testing.assert_close(queries[layer], expect, atol=1e-5, rtol=1e-5)


def test_window_queries_must_be_the_scales_own(setup):
    """A policy scores with scale si's queries only; a forward's whole query block (a prefill, a speculative
    window) is refused with a one-line error instead of silently scoring with another scale's tail."""
    vae, var, _ = setup
    policy = build_policy("snapkv", var, 0.4)
    q = torch.randn(2 * len(LABELS), var.config.num_heads, scale_lengths(PN)[4], var.embed_dim // var.config.num_heads)
    with pytest.raises(ValueError, match="pass that scale's queries only"):
        policy.window_queries(var, 0, 4, [q] * var.depth)
    assert policy.window_queries(var, 0, 4, [q[:, :, -25:]] * var.depth).shape[2] == 16

"""Flow map of distilled decoding (spec 4.9 item 1) and a teacher sampled through it (item 2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import samplers.dd.flow_map  # noqa: F401  (registers "flow")
from tests.conftest import make_tiny_pair
from samplers import build_sampler
from samplers.dd.flow_map import FlowMapConfig, flow_map


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: deterministic, uncontended CPU runs


def random_law(V: int, zeros: int, gen: torch.Generator) -> torch.Tensor:
    p = torch.rand(V, generator=gen) ** 3
    p[torch.randperm(V, generator=gen)[:zeros]] = 0
    return p / p.sum()


def test_token_frequencies_match_p_with_zeros():
    gen = torch.Generator().manual_seed(0)
    V, C, N = 16, 8, 100_000
    codes = torch.randn(V, C, generator=gen)
    p = random_law(V, 4, gen)
    out = flow_map(torch.randn(N, C, generator=gen), p.expand(N, V), codes)
    counts = torch.bincount(out.tokens, minlength=V).double()
    support = p > 0
    assert counts[~support].sum() == 0, "a token with p = 0 was produced"
    expected = p[support].double() / p[support].double().sum() * N
    assert stats.chisquare(counts[support].numpy(), expected.numpy()).pvalue > 0.01
    # the endpoint has collapsed onto the chosen code: residual << code spacing
    residual = (out.endpoint - codes[out.tokens]).norm(dim=-1).max()
    assert residual < 0.02 * torch.pdist(codes).min()


def test_per_token_laws_differ_and_map_is_deterministic_and_continuous():
    gen = torch.Generator().manual_seed(1)
    V, C, N = 12, 6, 20_000
    codes = torch.randn(V, C, generator=gen)
    laws = torch.stack([random_law(V, 3, gen) for _ in range(4)])  # four tokens with different p
    probs = laws.repeat(N // 4, 1)
    noise = torch.randn(N, C, generator=gen)
    out = flow_map(noise, probs, codes)
    again = flow_map(noise.clone(), probs.clone(), codes, FlowMapConfig(chunk=1000))  # other chunking
    assert torch.equal(out.tokens, again.tokens)
    for k in range(4):
        counts = torch.bincount(out.tokens[k::4], minlength=V).double()
        sup = laws[k] > 0
        assert counts[~sup].sum() == 0
        exp = laws[k][sup].double() / laws[k][sup].double().sum() * counts.sum()
        assert stats.chisquare(counts[sup].numpy(), exp.numpy()).pvalue > 0.001
    nudged = flow_map(noise + 1e-4 * torch.randn(N, C, generator=gen), probs, codes)
    assert (nudged.tokens != out.tokens).float().mean() < 0.005  # only points next to a cell boundary move
    finer = flow_map(noise[:2000], probs[:2000], codes, FlowMapConfig(steps=600))
    assert (finer.tokens != out.tokens[:2000]).float().mean() < 0.005  # ODE error is small


def test_gathered_supports_map_like_the_full_codebook():
    """Rows whose supports are gathered (sums over K <= V codes) give the full-V map's tokens and endpoints: the
    excluded codes have weight exactly zero. Supports of very different sizes share chunks."""
    gen = torch.Generator().manual_seed(2)
    V, C, N = 64, 8, 6000
    codes = torch.randn(V, C, generator=gen)
    probs = torch.stack([random_law(V, V - k, gen) for k in torch.randint(1, V // 2, (N,), generator=gen).tolist()])
    noise = torch.randn(N, C, generator=gen)
    full = flow_map(noise, probs, codes, FlowMapConfig(support_gather=0.0))
    gathered = flow_map(noise, probs, codes, FlowMapConfig(support_gather=0.5, chunk=500))
    assert (probs.gather(1, gathered.tokens[:, None]) > 0).all()
    assert (gathered.tokens != full.tokens).float().mean() < 1e-3  # float rounding next to a cell boundary only
    torch.testing.assert_close(gathered.endpoint[gathered.tokens == full.tokens],
                               full.endpoint[gathered.tokens == full.tokens], atol=1e-4, rtol=0)


def test_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match="shapes do not match"):
        flow_map(torch.randn(4, 3), torch.full((4, 5), 0.2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="positive mass"):
        flow_map(torch.randn(2, 3), torch.zeros(2, 5), torch.randn(5, 3))


def test_teacher_with_flow_sampling_has_the_multinomial_marginals_per_scale():
    var, vae = make_tiny_pair(0)
    B = 1500
    labels = torch.full((B,), 2)
    kw = dict(cfg=1.5, top_k=12, top_p=0.0, temperature=1.0, decode=False)
    flow = build_sampler("flow", var=var, vae=vae, flow_steps=64).sample(labels, seed=0, **kw)
    plain = build_sampler("default", var=var, vae=vae).sample(labels, seed=1, **kw)
    V = var.config.vocab_size
    for si in range(var.num_scales):
        # one position per image (the last): images are independent, positions of one image are not
        a = torch.bincount(flow.tokens[si][:, -1], minlength=V).numpy()
        b = torch.bincount(plain.tokens[si][:, -1], minlength=V).numpy()
        keep = (a + b) >= 10
        table = np.stack([np.append(a[keep], a[~keep].sum()), np.append(b[keep], b[~keep].sum())])
        table = table[:, table.sum(0) > 0]
        assert stats.chi2_contingency(table).pvalue > 0.01, f"scale {si}"
    assert len(build_sampler("flow", var=var, vae=vae).sample(labels[:2], seed=0, **kw).tokens) == var.num_scales
    # scale 0 has a fixed law given the label: compare with it directly
    logits = build_sampler("default", var=var, vae=vae).sample(labels[:1], seed=0, keep_logits=True, **kw).raw_logits[0]
    s = build_sampler("default", var=var, vae=vae)
    p0 = s.process_logits(logits, 0, 1.5, 12, 0.0, 1.0).softmax(-1).view(-1).double()
    counts = torch.bincount(flow.tokens[0].view(-1), minlength=V).double()
    sup = p0 > 0
    assert counts[~sup].sum() == 0
    assert stats.chisquare(counts[sup].numpy(), (p0[sup] / p0[sup].sum() * B).numpy()).pvalue > 0.01

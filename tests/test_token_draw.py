"""draw_tokens: the reference mode is bitwise today's composition; the fast mode draws from the same law.

Truth: today's torch composition (bitwise), an independent float64 numpy implementation of the
filtering rule (laws), scipy's chi-square test (empirical draws) and batch-isolation identities.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from samplers.logits_processing import (apply_temperature, candidate_law, draw_tokens, processed_probs,
                                        sample_from_logits, top_k_top_p_filter_)


def numpy_law(x_V: np.ndarray, top_k: int, top_p: float, temperature: float) -> np.ndarray:
    """The processed law of one row, written from the rule itself in float64."""
    x = x_V.astype(np.float64).copy()
    V = x.size
    if 0 < top_k < V:
        kth = np.sort(x)[-top_k]
        x[x < kth] = -np.inf  # every logit equal to the k-th largest survives
    if top_p > 0:
        order = np.argsort(x, kind="stable")
        e = np.exp(x[order] - x.max())
        remove = np.cumsum(e / e.sum()) <= 1 - top_p
        remove[-1] = False
        x[order[remove]] = -np.inf
    e = np.exp((x - x.max()) / temperature)
    return e / e.sum()


def torch_reference_law(x_BlV: torch.Tensor, top_k: int, top_p: float, temperature: float) -> torch.Tensor:
    return apply_temperature(top_k_top_p_filter_(x_BlV.clone(), top_k, top_p), temperature).softmax(dim=-1)


def old_composition(x_BlV, top_k, top_p, temperature, generator):
    return sample_from_logits(apply_temperature(top_k_top_p_filter_(x_BlV, top_k, top_p), temperature), generator)


SETTINGS = [(0, 0.0, 1.0), (900, 0.96, 1.0), (50, 0.0, 0.7), (0, 0.9, 1.3), (1, 0.0, 1.0), (17, 0.5, 0.5),
            (1000, 1.0, 2.0), (0, 1e-6, 1.0)]


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("top_k,top_p,temperature", SETTINGS)
def test_reference_mode_is_bitwise_the_old_composition(top_k, top_p, temperature):
    x = torch.randn(3, 7, 1000, generator=torch.Generator().manual_seed(5)) * 3
    for make in (lambda: torch.Generator().manual_seed(11), lambda: gens([11, 12, 13])):
        old_input, new_input = x.clone(), x.clone()
        expected = old_composition(old_input, top_k, top_p, temperature, make())
        got = draw_tokens(new_input, top_k, top_p, temperature, make(), rng="reference")
        assert got.dtype == torch.int64 and got.shape == (3, 7)
        assert torch.equal(got, expected)
        assert torch.equal(new_input, old_input)  # filtered in place, as today


LAW_CASES = [  # (top_k, top_p, temperature)
    (0, 0.0, 1.0), (0, 0.0, 0.6), (5, 0.0, 1.0), (1, 0.0, 1.0), (1, 0.9, 1.0), (64, 0.0, 1.0), (64, 0.8, 1.5),
    (63, 0.0, 1.0), (10, 0.9, 0.8), (0, 0.7, 1.0), (0, 1.0, 1.0), (12, 1.0, 0.9), (0, 1e-7, 1.0), (7, 1e-7, 3.0),
    (40, 0.99, 1.0),
]


@pytest.mark.parametrize("top_k,top_p,temperature", LAW_CASES)
def test_fast_law_equals_reference_law(top_k, top_p, temperature):
    x = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(top_k * 7 + 1)) * 2
    x_before = x.clone()
    fast = processed_probs(x, top_k, top_p, temperature)
    assert torch.equal(x, x_before), "the fast path must not write into the logits"
    torch.testing.assert_close(fast, torch_reference_law(x, top_k, top_p, temperature), atol=1e-6, rtol=0)
    truth = np.stack([numpy_law(row, top_k, top_p, temperature) for row in x.reshape(-1, 64).numpy()])
    np.testing.assert_allclose(fast.reshape(-1, 64).double().numpy(), truth, atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2, 3, 4, 5, 9, 20])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_law_keeps_every_logit_tied_with_the_kth(top_k, temperature):
    # Logits on a grid of 5 values: ties at the k-th value are the rule, not the exception.
    x = torch.randint(0, 5, (3, 8, 24), generator=torch.Generator().manual_seed(top_k)).float()
    fast = processed_probs(x, top_k, 0.0, temperature)
    truth = np.stack([numpy_law(row, top_k, 0.0, temperature) for row in x.reshape(-1, 24).numpy()])
    np.testing.assert_allclose(fast.reshape(-1, 24).double().numpy(), truth, atol=1e-6, rtol=0)
    law = candidate_law(x.reshape(-1, 24), top_k, 0.0, temperature)
    assert law.fallback_F.numel() > 0  # the grid does produce ties across the k-th value


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (0, 0.3), (4, 0.6), (3, 0.7), (0, 0.8), (6, 0.95)])
def test_fast_law_with_the_top_p_cut_inside_a_run_of_equal_logits(top_k, top_p):
    # [2, 1, 1, 1, 0]: top_p = 0.5 drops the 0 and two of the three 1s; which two is the reference sort's
    # tie order, so the law to match is the torch reference itself.
    row = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0, -1.0, 1.0, 0.0])
    x = torch.stack([row, row.flip(0), torch.randn(8, generator=torch.Generator().manual_seed(3))]).view(1, 3, 8)
    fast = processed_probs(x, top_k, top_p, 1.0)
    torch.testing.assert_close(fast, torch_reference_law(x, top_k, top_p, 1.0), atol=1e-6, rtol=0)
    if (top_k, top_p) == (0, 0.5):
        assert candidate_law(x.view(3, 8), top_k, top_p, 1.0).fallback_F.tolist()[:2] == [0, 1]


def test_fast_law_with_masked_vocabulary():
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(9))
    x[..., 20:] = float("-inf")  # more -inf entries than V - top_k: the k-th value is -inf for no row
    x[1, :, 3:] = float("-inf")  # fewer finite logits than top_k: ties at -inf across the k-th value
    for top_k, top_p in [(8, 0.0), (8, 0.9), (0, 0.9), (25, 0.0)]:
        torch.testing.assert_close(processed_probs(x, top_k, top_p, 1.0), torch_reference_law(x, top_k, top_p, 1.0),
                                   atol=1e-6, rtol=0)
        drawn = draw_tokens(x, top_k, top_p, 1.0, torch.Generator().manual_seed(0))
        assert torch.isfinite(x.gather(-1, drawn.unsqueeze(-1))).all()


EMPIRICAL = [  # (logits row, top_k, top_p, temperature)
    ([2.0, 1.5, 1.2, 0.9, 0.3, 0.0, -0.4, -1.0, -1.2, -2.0, -3.0, -5.0], 7, 0.9, 0.8),
    ([0.5, 0.1, -0.2, 0.3, -1.0, 0.8, 0.0, -0.5, 0.2, -0.3, 0.6, -0.8, 0.4, -0.1, 0.7, -0.6], 0, 0.0, 1.3),
    ([1.0, 0.2, 0.2, 0.2, 0.2, -0.5, 0.7, -1.0, 0.0, 0.2], 3, 0.0, 1.0),  # ties at the k-th: fallback rows
    ([3.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, -1.0], 0, 0.6, 1.0),  # top-p cut inside the run of 1s
]


@pytest.mark.parametrize("row,top_k,top_p,temperature", EMPIRICAL)
def test_fast_draws_fit_the_law(one_thread, row, top_k, top_p, temperature):
    n = 200_000
    x = torch.tensor(row).expand(2, n // 2, len(row)).contiguous()
    drawn = draw_tokens(x, top_k, top_p, temperature, torch.Generator().manual_seed(1234))
    counts = np.bincount(drawn.flatten().numpy(), minlength=len(row))
    law = torch_reference_law(x[:1, :1], top_k, top_p, temperature).flatten().double().numpy()
    if top_p == 0:  # no sort tie order involved: the independent rule must agree too
        np.testing.assert_allclose(law, numpy_law(np.array(row), top_k, top_p, temperature), atol=1e-6)
    support = law > 0
    assert counts[~support].sum() == 0, "a token outside the support was drawn"
    expected = law[support] / law[support].sum() * n
    assert chisquare(counts[support], expected).pvalue > 0.01
    assert 0.5 * np.abs(counts / n - law).sum() < 0.01


@pytest.mark.parametrize("top_k,top_p", [(3, 0.0), (0, 0.6), (0, 0.0), (4, 0.9)])
def test_per_row_generators_isolate_rows(top_k, top_p):
    tie_row = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, -1.0])  # falls back for both settings
    x = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(2))
    x[0, 2] = tie_row
    x[2, :3] = tie_row
    batch = draw_tokens(x, top_k, top_p, 0.9, gens([100, 101, 102]))
    for b in range(3):
        alone = draw_tokens(x[b:b + 1], top_k, top_p, 0.9, gens([100 + b]))
        assert torch.equal(batch[b:b + 1], alone)
    # Other rows' logits and seeds change; row 1 does not.
    y = x.clone()
    y[0] = torch.randn(6, 8)
    y[2] = tie_row
    other = draw_tokens(y, top_k, top_p, 0.9, gens([7, 101, 8]))
    assert torch.equal(other[1], batch[1])


def test_one_generator_is_reproducible_and_bad_mode_is_one_line():
    x = torch.randn(2, 16, 100)
    a = draw_tokens(x, 20, 0.9, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, draw_tokens(x, 20, 0.9, 1.0, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="rng must be one of"):
        draw_tokens(x, 20, 0.9, 1.0, None, rng="exact")
    with pytest.raises(ValueError, match="per-row generators"):
        draw_tokens(x, 20, 0.9, 1.0, gens([1, 2, 3]))

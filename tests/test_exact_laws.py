"""Distributional exactness on a real (tiny, random) VAR whose joint law can be enumerated.

Two scales (1x1, 2x2) and a vocabulary of 4 make 4^5 = 1024 token sequences. Their exact law is computed
independently of the engine, from the model's teacher-forced forward (block-causal mask, no cache) with CFG
ramp, top-k and temperature written out here. Every sampler is then run on 120,000 rows and compared with
a chi-square test (p > 0.01, small bins merged) and total variation (< 0.01):
  default (fast and reference RNG), Block-SJD with each draft source (jacobi, random, var, dd) and with
  adaptive windows that shrink within a run (four 1x1 scales: 256 sequences),
  CoDe (its law: the drafter's scale 0, then the refiner given that prefix), and editing (known positions
  fixed, the others from the model given the forced prefix).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from samplers import build_sampler
from samplers.dd.student import DDStudent
from tests.conftest import make_tiny_pair

V, PN, LABEL, CFG, TOP_K, TEMP = 4, (1, 2), 2, 2.0, 2, 0.9
ROWS, RUNS = 12_000, 10
SETTINGS = dict(cfg=CFG, top_k=TOP_K, temperature=TEMP, decode=False)


def processed_law(logits_2V: torch.Tensor, si: int) -> torch.Tensor:
    """CFG ramp on the scale index, top-k (ties kept), temperature, softmax: (..., V) from (2, ..., V)."""
    t = CFG * si / (len(PN) - 1)
    guided = (1 + t) * logits_2V[0] - t * logits_2V[1]
    kth = guided.sort(dim=-1, descending=True).values[..., TOP_K - 1:TOP_K]
    guided = guided.masked_fill(guided < kth, float("-inf"))
    return (guided / TEMP).softmax(-1).double()


def scale_laws(var, vae, prefix0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p(scale 0) (V,) and, for each scale-0 token, p(scale-1 token i | it) (V, 4, V), teacher-forced."""
    idx0 = torch.arange(V).view(V, 1)
    idx1 = torch.zeros(V, 4, dtype=torch.long)  # scale-1 tokens do not influence scale-1 logits
    x_tf = vae.quantize.teacher_forcing_input([idx0, idx1])
    labels = torch.tensor([LABEL] * V + [var.num_classes] * V)
    with torch.no_grad():
        logits = var(labels, x_tf.repeat(2, 1, 1)).view(2, V, 5, V)
    return processed_law(logits[:, 0, 0], 0), processed_law(logits[:, :, 1:], 1)


def joint(p0: torch.Tensor, p1: torch.Tensor, fixed: dict[int, int] | None = None) -> torch.Tensor:
    """(V^5,) law of (s0, s1_0..s1_3); `fixed` pins scale-1 positions to known tokens."""
    out = torch.zeros(V ** 5, dtype=torch.float64)
    for seq in range(V ** 5):
        digits = [(seq // V ** (4 - k)) % V for k in range(5)]
        s0, s1 = digits[0], digits[1:]
        prob = p0[s0]
        for i, tok in enumerate(s1):
            prob = prob * ((1.0 if tok == fixed[i] else 0.0) if fixed and i in fixed else p1[s0, i, tok])
        out[seq] = prob
    return out


def empirical(sample_fn) -> torch.Tensor:
    counts = torch.zeros(V ** 5, dtype=torch.float64)
    for run in range(RUNS):
        out = sample_fn(torch.full((ROWS,), LABEL), run)
        seq = torch.cat(out.tokens, dim=1)  # (rows, 5)
        index = (seq * (V ** torch.arange(4, -1, -1))).sum(-1)
        counts += torch.bincount(index, minlength=V ** 5).double()
    return counts


def assert_law(counts: torch.Tensor, law: torch.Tensor, what: str) -> None:
    assert counts[law == 0].sum() == 0, f"{what}: an outcome of probability 0 was drawn"
    n = counts.sum()
    tv = 0.5 * (counts / n - law).abs().sum().item()
    support = law > 0
    obs, exp = counts[support].numpy(), (law[support] * n).numpy()
    small = exp < 5
    obs, exp = np.append(obs[~small], obs[small].sum()), np.append(exp[~small], exp[small].sum())
    keep = exp > 0
    p_value = stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue
    assert tv < 0.01 and p_value > 0.01, f"{what}: TV {tv:.4f}, chi-square p {p_value:.4f}"


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    var, vae = make_tiny_pair(3, patch_nums=PN, vocab_size=V)
    other, _ = make_tiny_pair(4, patch_nums=PN, vocab_size=V)
    student = DDStudent.from_teacher(var, t2=1).eval()
    return var, vae, other, student


def run_sampler(name: str, **kw):
    def fn(labels, run):
        return build_sampler(name, **kw).sample(labels, seed=1000 + run, **SETTINGS)
    return fn


# reference: its draws are pinned bitwise by the golden test, so its law check runs with `pytest -m slow`
@pytest.mark.parametrize("rng", ["fast", pytest.param("reference", marks=pytest.mark.slow)])
def test_default_sampler_law(models, rng, one_thread):
    var, vae, _, _ = models
    law = joint(*scale_laws(var, vae, None))
    assert_law(empirical(run_sampler("default", var=var, vae=vae, rng=rng)), law, f"default ({rng})")


# Jacobi drafts in the default run; the other sources (random: the garbage-draft baseline) with `pytest -m slow`,
# to keep the default suite short (tests/test_sjd.py checks every source's exactness on enumerable toys there)
@pytest.mark.parametrize("draft", ["jacobi"] + [pytest.param(d, marks=pytest.mark.slow) for d in ("random", "var", "dd")])
def test_block_sjd_law_for_every_draft_source(models, draft, one_thread):
    var, vae, other, student = models
    kw = dict(var=var, vae=vae, window_scales=2, max_spec_tokens=16, draft=draft)
    if draft == "var":
        kw["draft_model"] = other
    if draft == "dd":
        kw["student"] = student
    law = joint(*scale_laws(var, vae, None))
    counts = empirical(run_sampler("sjd", **kw))
    assert_law(counts, law, f"sjd draft={draft}")


@pytest.mark.slow  # 15 s; tests/test_code.py covers CoDe's exactness in the default run
def test_code_law_is_drafter_then_refiner(models, one_thread):
    var, vae, other, _ = models
    p0, _ = scale_laws(var, vae, None)
    _, p1 = scale_laws(other, vae, None)
    counts = empirical(run_sampler("code", var=var, vae=vae, refiner=other, draft_scales=1))
    assert_law(counts, joint(p0, p1), "code N=1")


@pytest.mark.slow  # 13 s
def test_edit_law_forces_known_tokens_and_samples_the_rest(models, one_thread):
    var, vae, _, _ = models
    side = vae.config.image_size
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, side, side)
    mask[..., side // 2:, :] = 1  # regenerate the bottom half: scale 0 (covered) and the bottom row of scale 1
    known = vae.img_to_tokens(image * 2 - 1)[1][0]
    p0, p1 = scale_laws(var, vae, None)
    law = joint(p0, p1, fixed={0: int(known[0]), 1: int(known[1])})
    sampler = build_sampler("edit", var=var, vae=vae)

    def fn(labels, run):
        return sampler.edit(image, mask, labels, seed=2000 + run, **SETTINGS)
    assert_law(empirical(fn), law, "edit")


def test_block_sjd_law_when_an_adaptive_window_shrinks_to_one_scale(one_thread):
    """Four 1x1 scales (4^4 outcomes), fresh adaptive windows of 3: the first pass tries scales 0-2, its
    rejections cut the next window to one scale, whose plain step must keep the rows the first pass already
    made final at that scale (their final next scale was drawn given them). Law: teacher-forced, written
    out here (cfg 0, no top-k). The model's dependence on earlier scales is scaled up so a redrawn scale shows."""
    pn, vocab = (1, 1, 1, 1), 4
    var, vae = make_tiny_pair(3, patch_nums=pn, vocab_size=vocab)
    with torch.no_grad():
        for block in var.blocks:
            block.attn.proj.weight.mul_(30.0)
        var.word_embed.weight.mul_(40.0)
        var.head.weight.mul_(4.0)
    K = len(pn)
    seqs = torch.cartesian_prod(*[torch.arange(vocab)] * K)  # (V^K, K), first scale most significant
    with torch.no_grad():
        logits = var(torch.full((len(seqs),), LABEL), vae.quantize.teacher_forcing_input(list(seqs.split(1, dim=1))))
    law = logits.double().softmax(-1).gather(-1, seqs[..., None]).squeeze(-1).prod(-1)
    counts = torch.zeros(vocab ** K, dtype=torch.float64)
    for run in range(RUNS):
        sampler = build_sampler("sjd", var=var, vae=vae, window_scales=3, max_spec_tokens=16, window_policy="adaptive")
        out = sampler.sample(torch.full((ROWS,), LABEL), cfg=0.0, seed=3000 + run, decode=False)
        index = (torch.cat(out.tokens, dim=1) * vocab ** torch.arange(K - 1, -1, -1)).sum(-1)
        counts += torch.bincount(index, minlength=vocab ** K).double()
    assert_law(counts, law, "sjd with a shrinking adaptive window")

"""Block-SJD: exactness on a toy with known conditionals, and behaviour on a tiny random VAR.

The toy (spec 3.7 (ii)): blocks of n = (1, 2, 4) tokens over a vocabulary of 3 (3^7 = 2,187 joint
outcomes). Raw logits of block b are a random linear function of every earlier token, with a conditional
and an unconditional table, then go through the SAME processing functions as the VAR samplers (CFG ramp
on the block index, top-k, temperature). `ToyTarget` plugs it into the same Block-SJD engine,
verification and draft-source code the VAR sampler uses; only the "network" differs. Its exact joint law
is enumerated, so samples are compared with the truth, not with another sampler.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

import samplers.sjd.sampler  # noqa: F401  (registers "sjd"; samplers/__init__.py may import it too)
from samplers import build_sampler
from samplers.sjd.drafts import JacobiDraft, RandomDraft
from samplers.logits_processing import apply_temperature, cfg_strength, guide, top_k_top_p_filter_
from samplers.sjd.speculation import AcceptanceHistory, BlockSpeculation, Draft, DraftSource, SJDSettings
from tests.sjd_toy import BlockSJD, BlockTarget
from samplers.sjd.verify import AcceptRule, derive_generator, multinomial_rows, verify_block
from tests.conftest import make_tiny_pair

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: deterministic, uncontended CPU runs

N_TOY = 200_000


# ---- the toy ------------------------------------------------------------------------------------------
class ToyBlockModel:
    def __init__(self, seed: int, sizes=(1, 2, 4), vocab: int = 3, strength: float = 1.5, sign: float = 1.0,
                 cfg: float = 2.0, top_k: int = 2, temperature: float = 0.9):
        gen = torch.Generator().manual_seed(seed)
        self.sizes, self.V = tuple(sizes), vocab
        self.cfg, self.top_k, self.temperature = cfg, top_k, temperature
        self.bias, self.weight = [], []
        prev = 0
        for n in self.sizes:  # [cond, uncond] tables per block
            self.bias.append(sign * strength * torch.randn(2, n, vocab, generator=gen))
            self.weight.append(sign * strength * torch.randn(2, n, max(prev, 1), vocab, vocab, generator=gen))
            prev += n

    def raw_logits(self, b: int, prev_BP: torch.Tensor) -> torch.Tensor:
        """(2B, n_b, V): conditional rows first, then unconditional (the CFG layout of the samplers)."""
        B = prev_BP.shape[0]
        out = self.bias[b].unsqueeze(1).expand(2, B, -1, -1)
        if prev_BP.shape[1]:
            onehot_BPV = torch.nn.functional.one_hot(prev_BP, self.V).float()
            out = out + torch.einsum("bpv,cjpvw->cbjw", onehot_BPV, self.weight[b])
        return out.reshape(2 * B, self.sizes[b], self.V)

    def probs(self, b: int, prev_BP: torch.Tensor) -> torch.Tensor:
        guided = guide(self.raw_logits(b, prev_BP), cfg_strength(self.cfg, b, len(self.sizes)))
        return apply_temperature(top_k_top_p_filter_(guided, self.top_k, 0.0), self.temperature).softmax(-1)

    def ancestral(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        prev = torch.zeros(batch, 0, dtype=torch.long)
        for b in range(len(self.sizes)):
            prev = torch.cat((prev, multinomial_rows(self.probs(b, prev), generator)), 1)
        return prev

    def joint(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every outcome (M, L) and its exact probability (M,), by enumeration."""
        L = sum(self.sizes)
        seqs = torch.tensor(list(itertools.product(range(self.V), repeat=L)))
        prob = torch.ones(len(seqs), dtype=torch.float64)
        start = 0
        for b, n in enumerate(self.sizes):
            p = self.probs(b, seqs[:, :start]).double()
            prob *= p.gather(-1, seqs[:, start:start + n].unsqueeze(-1)).squeeze(-1).prod(-1)
            start += n
        return seqs, prob / prob.sum()  # float32 conditionals: renormalise the rounding away


def outcome_index(seqs_NL: torch.Tensor, vocab: int) -> torch.Tensor:
    weights = vocab ** torch.arange(seqs_NL.shape[1] - 1, -1, -1)
    return (seqs_NL * weights).sum(-1)


class ToyTarget(BlockTarget):
    def __init__(self, model: ToyBlockModel, batch: int):
        self.model, self.block_sizes, self.vocab_size, self.batch = model, model.sizes, model.V, batch
        self.committed: list[torch.Tensor] = []
        self.forwards = 0
        self.windows: list[tuple[int, int]] = []

    def prefix(self, extra: list[torch.Tensor], batch: int) -> torch.Tensor:
        parts = self.committed + extra
        return torch.cat(parts, 1) if parts else torch.zeros(batch, 0, dtype=torch.long)

    def window(self, a, input_tokens):
        self.forwards += 1
        self.windows.append((a, a + len(input_tokens) + 1))
        return [self.model.probs(a + i, self.prefix(input_tokens[:i], self.batch)) for i in range(len(input_tokens) + 1)]

    def commit(self, a, c, tokens):
        assert len(self.committed) == a
        self.committed.extend(tokens)


class ToyDrafter(DraftSource):
    """Another toy drafts autoregressively from its own processed law q; with `adversarial_of`, one-hot
    drafts of the least likely token that the TARGET's true p allows (p > 0), the worst case for acceptance."""

    def __init__(self, model: ToyBlockModel, adversarial_of: ToyBlockModel | None = None, name: str = "toy"):
        self.model, self.adversarial_of, self.name = model, adversarial_of, name

    def propose(self, a, end, tokens, final):
        drafts, extra = [], []
        for b in range(a, end):
            prev = self.target.prefix(extra, self.batch)
            if self.adversarial_of is not None:
                p = self.adversarial_of.probs(b, prev)
                d, q = p.masked_fill(p == 0, 2.0).argmin(-1), None
            else:
                q = self.model.probs(b, prev)
                d = multinomial_rows(q, self.generator)
            if tokens[b] is not None:
                d = torch.where(final[b][:, None], tokens[b], d)
            drafts.append(Draft(d, q))
            extra.append(d)
        return drafts


# ---- exactness on the toy -----------------------------------------------------------------------------



@pytest.fixture(scope="module")
def toy():
    model = ToyBlockModel(0)  # cfg 2.0 ramp, top-k 2 of 3, temperature 0.9
    seqs, prob = model.joint()
    return model, seqs, prob


def run_toy(model, source, batch, seed, window=3, rule=AcceptRule()):
    target = ToyTarget(model, batch)
    gen = torch.Generator().manual_seed(seed)
    engine = BlockSJD(target, source, SJDSettings(window, 100, rule), gen, derive_generator(gen, gen.device))
    tokens = engine.run(batch, torch.device("cpu"))
    return torch.cat(tokens, 1), engine, target


def fit(samples_NL, prob_M):
    """(TV, chi-square p-value) of the empirical law of the samples against the exact law."""
    counts = torch.bincount(outcome_index(samples_NL, 3), minlength=len(prob_M)).double()
    tv = 0.5 * (counts / counts.sum() - prob_M).abs().sum().item()
    support = prob_M > 0
    assert counts[~support].sum() == 0, "an outcome with zero probability (filtered by top-k) was produced"
    obs, exp = counts[support].numpy(), (prob_M[support] * counts.sum()).numpy()
    small = exp < 5
    obs, exp = np.append(obs[~small], obs[small].sum()), np.append(exp[~small], exp[small].sum())
    return tv, stats.chisquare(obs, exp).pvalue


SOURCES = {
    "jacobi_random_init": lambda m: JacobiDraft("random"),
    "jacobi_repeat_init": lambda m: JacobiDraft("repeat"),
    "random_one_hot": lambda m: RandomDraft(),
    "external_drafter": lambda m: ToyDrafter(ToyBlockModel(7, strength=1.0)),
    "anti_drafter": lambda m: ToyDrafter(ToyBlockModel(0, sign=-1.0)),  # q far from p, sampled
    "adversarial_least_likely": lambda m: ToyDrafter(m, adversarial_of=m),  # one-hot, worst token
    "coupled_same_model": lambda m: ToyDrafter(m),
}


def test_toy_enumeration_matches_ancestral_sampling(toy):
    model, _, prob = toy
    tv, pvalue = fit(model.ancestral(N_TOY, torch.Generator().manual_seed(11)), prob)
    assert pvalue > 0.01 and tv < 0.01


@pytest.mark.parametrize("name", list(SOURCES))
def test_block_sjd_is_exact_for_every_draft_source(toy, name):
    model, _, prob = toy
    samples, engine, target = run_toy(model, SOURCES[name](model), N_TOY, seed=3)
    tv, pvalue = fit(samples, prob)
    assert pvalue > 0.01, f"{name}: chi-square p = {pvalue:.2e}"
    assert tv < 0.01, f"{name}: TV = {tv:.4f}"
    assert engine.counters["passes"] <= len(model.sizes) and target.forwards == engine.counters["passes"]


def test_small_batches_with_multi_block_commits_stay_exact(toy):
    """Batch 4: commits of several blocks per pass and per-row final tokens beyond the commit point."""
    model, _, prob = toy
    drafter = ToyDrafter(ToyBlockModel(0, strength=1.2))  # the target's tables, shrunk: close but not equal
    runs = [run_toy(model, drafter, 4, seed=s) for s in range(2000)]
    samples = torch.cat([r[0] for r in runs])
    multi = sum(b > 1 for r in runs for b in r[1].counters["blocks_per_pass"])
    assert multi > 150, "the test needs passes that commit several blocks"
    assert fit(samples, prob)[1] > 0.01


def test_adaptive_windows_learn_from_past_passes_and_stay_exact(toy):
    """window_policy=adaptive over many batch-4 runs sharing one history: some windows are cut short, others
    kept whole, as the acceptance seen so far says, and the law stays exact."""
    model, _, prob = toy
    drafter = ToyDrafter(ToyBlockModel(0, strength=0.5))  # accepts a whole block in ~3 rows of 4
    history = AcceptanceHistory()
    settings = SJDSettings(3, 100, AcceptRule(), "adaptive", 0.1)
    samples, whole, cut = [], 0, 0
    for s in range(2000):
        target = ToyTarget(model, 4)
        gen = torch.Generator().manual_seed(s)
        engine = BlockSJD(target, drafter, settings, gen, derive_generator(gen, gen.device), history=history)
        samples.append(torch.cat(engine.run(4, torch.device("cpu")), 1))
        whole += sum(e - a == min(3, len(model.sizes) - a) for a, e in target.windows)
        cut += sum(e - a < min(3, len(model.sizes) - a) for a, e in target.windows)
    assert fit(torch.cat(samples), prob)[1] > 0.01
    assert whole > 100 and cut > 100, (whole, cut)


def test_adaptive_window_rule():
    """The window stops before the first drafted scale where prod r_b^B < min_commit_prob."""
    history = AcceptanceHistory()
    history.add(0, 9, 8)  # r_0 = (8 + 1) / (9 + 1) = 0.9
    history.add(1, 3, 1)  # r_1 = 0.5
    spec = BlockSpeculation(RandomDraft(), SJDSettings(3, 100, AcceptRule(), "adaptive", 0.25), history=history)
    spec.reset((1, 2, 4, 8), None, 2)
    assert spec.window_end(0, 4) == 2  # 0.9^2 = 0.81 keeps scale 1; x 0.5^2 = 0.2025 < 0.25 stops before scale 2
    spec.reset((1, 2, 4, 8), None, 1)
    assert spec.window_end(0, 4) == 3  # batch 1: 0.9 x 0.5 = 0.45
    assert spec.window_end(2, 4) == 4  # scale 2 never tested: tried
    history.add(2, 1, 0)
    assert spec.window_end(2, 4) == 4  # r_2 = 0.5 at batch 1 still >= 0.25
    spec.reset((1, 2, 4, 8), None, 3)
    assert spec.window_end(2, 4) == 3 and spec.window_end(1, 4) == 2  # batch 3: 0.5^3 = 0.125 < 0.25
    fixed = BlockSpeculation(RandomDraft(), SJDSettings(3, 100), history=history)
    fixed.reset((1, 2, 4, 8), None, 16)
    assert fixed.window_end(0, 4) == 3


def test_adversarial_window_two_and_relaxed_mode_is_biased(toy):
    model, _, prob = toy
    tv, pvalue = fit(run_toy(model, ToyDrafter(model, adversarial_of=model), N_TOY, 5, window=2)[0], prob)
    assert pvalue > 0.01 and tv < 0.01
    # A lenient acceptance towards a bad drafter must show up as bias: the exactness test can fail.
    lenient = AcceptRule("lenient", lenient_ratio=50.0)
    tv, pvalue = fit(run_toy(model, ToyDrafter(ToyBlockModel(0, sign=-1.0)), N_TOY, 5, rule=lenient)[0], prob)
    assert pvalue < 1e-6 and tv > 0.01


def test_coupled_drafter_equal_to_target_accepts_everything_and_equals_plain_sampling(toy):
    model, _, _ = toy
    samples, engine, target = run_toy(model, ToyDrafter(model), 5000, seed=9)
    cnt = engine.counters
    assert cnt["passes"] == 1 and target.forwards == 1
    assert cnt["tokens_accepted"] == cnt["tokens_tested"] and sum(cnt["tokens_tested"]) == 5000 * 3
    plain = model.ancestral(5000, torch.Generator().manual_seed(9))  # same draft stream, same order
    assert torch.equal(samples, plain)


def test_verify_block_one_hot_and_residual_math():
    """Single-token law of the verification step, computed exactly: P(out = x) = p(x) for q one-hot and
    for a full q, checked by simulation with many independent tokens."""
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.1, 0.1, 0.7])
    n = 400_000
    gen = torch.Generator().manual_seed(0)
    draft = torch.multinomial(q, n, replacement=True, generator=gen).view(1, n)
    out = verify_block(p.expand(1, n, 4), draft, q.expand(1, n, 4), AcceptRule(), gen)
    freq = torch.bincount(out.tokens.view(-1), minlength=4).double() / n
    assert (freq - p).abs().max() < 0.005 and freq[3] == 0
    accepted_rate = out.accepted.double().mean().item()
    assert abs(accepted_rate - (1 - 0.5 * (p - q).abs().sum().item())) < 0.005  # 1 - TV(p, q)
    one_hot = verify_block(p.expand(1, n, 4), torch.full((1, n), 1), None, AcceptRule(), gen)
    freq = torch.bincount(one_hot.tokens.view(-1), minlength=4).double() / n
    assert (freq - p).abs().max() < 0.005


# ---- the real sampler on tiny random VARs -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    var, vae = make_tiny_pair(0)
    other, _ = make_tiny_pair(1)  # same shapes and tokenizer config, other weights: a genuine drafter
    return var, vae, other


LABELS = torch.tensor([0, 3, 1, 4])


@pytest.mark.parametrize("draft", ["jacobi", "random", "var_other", "var_same"])
@pytest.mark.parametrize("window", [2, 3, 4])
def test_greedy_tokens_equal_default_sampler_and_kv_holds_committed_scales(tiny, draft, window):
    var, vae, other = tiny
    kw = {"draft": "var", "draft_model": other if draft == "var_other" else var} if draft.startswith("var") else {"draft": draft}
    sjd = build_sampler("sjd", var=var, vae=vae, window_scales=window, max_spec_tokens=100, **kw)
    base = build_sampler("default", var=var, vae=vae)
    out = sjd.sample(LABELS, cfg=1.5, top_k=1, seed=0, decode=False)
    ref = base.sample(LABELS, cfg=1.5, top_k=1, seed=0, decode=False)
    for a, b in zip(out.tokens, ref.tokens):
        assert torch.equal(a, b)
    assert torch.equal(out.f_hat, ref.f_hat) or torch.allclose(out.f_hat, ref.f_hat, atol=1e-5)
    assert out.stats.forwards["var"] <= var.num_scales
    assert out.stats.forwards["var"] == out.stats.extra["passes"]
    for record in out.stats.extra["kv_after_pass"]:
        held = var.begin_ends[record["committed_scales"] - 1][1]
        assert record["seq_len"] == held and record["layer_lens"] == [held] * var.depth
    assert sum(out.stats.extra["blocks_per_pass"]) == var.num_scales and out.stats.extra["exact"] is True


def test_drafter_equal_to_target_with_coupled_noise_reproduces_default_sampling(tiny):
    var, vae, _ = tiny
    for window in (2, 4):
        sjd = build_sampler("sjd", var=var, vae=vae, draft="var", draft_model=var, window_scales=window,
                            max_spec_tokens=100)
        out = sjd.sample(LABELS, cfg=2.0, top_k=5, top_p=0.9, temperature=0.8, seed=123, decode=False)
        ref = build_sampler("default", var=var, vae=vae).sample(LABELS, cfg=2.0, top_k=5, top_p=0.9, temperature=0.8,
                                                                seed=123, decode=False)
        assert all(torch.equal(a, b) for a, b in zip(out.tokens, ref.tokens))
        acc = [r for r in out.stats.extra["token_acceptance_per_scale"] if r is not None]
        assert acc and all(r == 1.0 for r in acc)
        assert out.stats.extra["passes"] == -(-var.num_scales // window)


def test_max_spec_tokens_limits_speculation_and_counters_are_real(tiny):
    var, vae, other = tiny
    sjd = build_sampler("sjd", var=var, vae=vae, draft="var", draft_model=other, window_scales=4, max_spec_tokens=4)
    out = sjd.sample(LABELS, cfg=1.0, seed=[1, 2, 3, 4], decode=False)  # per-row generators
    engine = sjd.engine
    # scales 2 and 3 (9 and 16 tokens) may never be computed on drafted inputs: every window ends there
    assert out.stats.extra["blocks_per_pass"][-2:] == [1, 1]
    n_tok = [p * p for p in var.patch_nums]
    assert out.stats.tokens_processed["var"] >= 2 * len(LABELS) * sum(n_tok)  # CFG doubles the rows
    assert out.stats.forwards["draft_var"] >= 1 and out.stats.kv_bytes_peak > 0
    assert engine.counters["rows_tested"][0] == len(LABELS)  # scale 0 is verified once per row


def test_adaptive_window_at_a_batch_that_never_commits_two_scales_becomes_the_default_sampler(tiny):
    """Batch 16 with a drafter from other weights: after one run the history says no pass would commit two
    scales in all 16 rows, so the next run has windows of one scale: the default sampler's draws exactly."""
    var, vae, other = tiny
    labels = torch.arange(16) % var.num_classes
    sjd = build_sampler("sjd", var=var, vae=vae, draft="var", draft_model=other, window_scales=3,
                        max_spec_tokens=100, window_policy="adaptive")
    kw = dict(cfg=1.5, top_k=5, seed=9, decode=False)
    first = sjd.sample(labels, **kw)
    assert max(first.stats.extra["blocks_per_pass"]) >= 1 and first.stats.extra["window_policy"] == "adaptive"
    assert first.stats.forwards.get("draft_var", 0) > 0  # it did speculate before it knew better
    second = sjd.sample(labels, **kw)
    ref = build_sampler("default", var=var, vae=vae).sample(labels, **kw)
    assert second.stats.forwards.get("draft_var", 0) == 0 and second.stats.extra["passes"] == var.num_scales
    assert all(torch.equal(a, b) for a, b in zip(second.tokens, ref.tokens))
    with pytest.raises(ValueError, match="window_policy must be one of"):
        build_sampler("sjd", var=var, vae=vae, window_policy="greedy")


def test_relaxed_modes_are_flagged_and_bad_options_fail_clearly(tiny):
    var, vae, other = tiny
    relaxed = build_sampler("sjd", var=var, vae=vae, draft="var", draft_model=other, accept_mode="topk", accept_top_k=3)
    out = relaxed.sample(LABELS, seed=0, decode=False)
    assert out.stats.extra["exact"] is False and "APPROXIMATE" in out.stats.extra["accept_rule"]
    assert build_sampler("sjd", var=var, vae=vae, stale_tolerance=0.1).sample(LABELS, seed=0, decode=False).stats.extra["exact"] is False
    with pytest.raises(ValueError, match="draft_model"):
        build_sampler("sjd", var=var, vae=vae, draft="var")
    with pytest.raises(ValueError, match="unknown draft source"):
        build_sampler("sjd", var=var, vae=vae, draft="nope")
    with pytest.raises(ValueError, match="lenient_ratio"):
        build_sampler("sjd", var=var, vae=vae, accept_mode="lenient")
    with pytest.raises(ValueError, match="window_scales"):
        build_sampler("sjd", var=var, vae=vae, window_scales=0)
    with pytest.raises(ValueError, match="more_smooth"):
        build_sampler("sjd", var=var, vae=vae).sample(LABELS, more_smooth=True, seed=0)
    with pytest.raises(ValueError, match="stage='refiner' names no VAR stage.*var"):  # no code: one stage, 'var'
        build_sampler("sjd", var=var, vae=vae, stage="refiner")
    with pytest.raises(ValueError, match="stage='refienr' names no VAR stage.*drafter, refiner"):
        build_sampler("code+sjd", var=var, vae=vae, refiner=other, draft_scales=2, stage="refienr")
    code_sjd = build_sampler("code+sjd", var=var, vae=vae, refiner=other, draft_scales=2, stage="refiner")
    assert code_sjd.sample(LABELS, seed=0, decode=False).stats.extra["passes"] > 0


def test_draft_interface_rejects_wrong_draft_count(toy):
    class Broken(JacobiDraft):
        def propose(self, a, end, tokens, final):
            return [Draft(torch.zeros(2, 1, dtype=torch.long), None)]

    with pytest.raises(RuntimeError, match="returned 1 drafts"):
        run_toy(toy[0], Broken(), 2, seed=0)

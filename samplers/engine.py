"""The one next-scale sampling loop. Every sampler is a `Plan` for it; accelerators only supply policies.

Shape letters (used in every tensor name of the toolkit): B rows (images), 2B rows with the CFG half,
l tokens of one scale, L tokens of several scales, V vocabulary, C transformer width, Cv latent channels,
h w map sides, H heads, c head width.

State (`ScaleState`, model independent): the accumulated latent f_hat, the committed token maps, and the
per-scale transformer inputs (area-downsampled f_hat), so any model can take over at any scale by
prefilling its own cache from the stored inputs in one forward.

Policies a `Plan` holds (each a small object with a documented interface):
  stages        which model computes which scales (`VARStage`: next-scale with its own KV cache; CoDe is
                two of them; `OneShotStage`: a model that emits several scales in one forward, the DD student);
  kv_policies   per stage name, what happens to that model's cache after a committed scale (`CachePolicy`:
                ScaleKV / SnapKV / window compression); rollback of speculative entries is the engine's;
  token_rule    how a scale's tokens are drawn from its guided logits (`TokenRule`: categorical draw, or
                the flow-map transport);
  constraint    teacher-forced known tokens (zero-shot editing), applied to every committed and drafted map;
  speculation   optional speculative windows with verification (`Speculation`: Block-SJD with any draft
                source). Without it every window is one scale and the loop is plain next-scale sampling.

With the default plan the loop performs the public VAR loop's operations in its order (same random draws
in reference-RNG mode), so degenerate configurations reduce bitwise to the plain sampler.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import nn

from samplers.logits_processing import cfg_strength, guide
from samplers.query_recorder import QueryRecorder
from samplers.stats import SamplerStats
from tokenizers import VQVAE
from var import VAR, KVCache
from var.compile import compile_blocks


@dataclass(frozen=True)
class Sampling:
    """Per-call settings of `Sampler.sample` (the CFG ramp and temperature use the global scale index)."""
    cfg: float = 1.5
    top_k: int = 0
    top_p: float = 0.0
    temperature: float | tuple[float, ...] = 1.0
    more_smooth: bool = False
    rng: str = "fast"  # "fast": exact law on the top-k candidates; "reference": the public loop's draws bitwise


# ---- policy interfaces ----------------------------------------------------------------------------------
class CachePolicy:
    """Called after scale `si` is committed to `cache` of `model`. When `needs_queries`, `queries[layer]` holds
    the rows `query_rows(pn)` (all pn*pn rows for None) of scale si's queries, (B, H, r, c), from the forward
    that computed it (a speculative forward may have run past si: its later scales are not the policy's
    business). Returns a record (or None) that the engine logs."""
    needs_queries = False

    def query_rows(self, pn: int) -> torch.Tensor | None:
        """Row-major offsets inside a pn x pn map of the queries this policy reads (None: every row)."""
        return None

    def compress(self, cache: KVCache, model: VAR, si: int, queries: list[torch.Tensor | None]):
        raise NotImplementedError


class TokenRule:
    """Draws scale si's tokens from guided logits (B, l, V). `choose` returns (idx (B, l), code vectors
    (B, l, Cv) or None = the codebook vectors of idx); `law` returns the processed probabilities the draw
    follows, which verification (Block-SJD) needs."""
    name = "draw"
    verifiable = True  # False: tokens are a deterministic function of their own noise (no law to verify)

    def start(self, engine: "Engine") -> None:
        pass

    def choose(self, engine: "Engine", guided_BlV: torch.Tensor, si: int):
        raise NotImplementedError

    def law(self, engine: "Engine", guided_BlV: torch.Tensor, si: int) -> torch.Tensor:
        raise NotImplementedError


class Constraint:
    """Known tokens: `apply(si, idx)` returns (idx with known positions forced, keep mask (B, l) or None)."""

    def start(self, engine: "Engine") -> None:
        pass

    def apply(self, si: int, idx_Bl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class Speculation:
    """Speculative windows over the scales of one stage (Block-SJD). The engine calls, per pass:
    `window_end(a, stage_end)`, `propose(a, e - 1, tokens, final)` -> drafts for scales a..e-2,
    `verify(b, p, draft, tokens, final, exact, forced)` -> updated exact-context mask (it writes final
    tokens), then `observe(a, c, probs, tokens, final)` after committing [a, c)."""

    def applies_to(self, stage: "VARStage") -> bool:
        return True

    def start(self, engine: "Engine", batch: int) -> None:
        raise NotImplementedError


# ---- stages ---------------------------------------------------------------------------------------------
@dataclass
class VARStage:
    """Scales [begin, end) computed by `model` with its own KV cache. A stage that starts after scale 0
    prefills scales 0..begin in its first forward from the stored inputs (CoDe's hand-over)."""
    name: str
    model: VAR
    begin: int
    end: int


class OneShotStage:
    """Scales [begin, end) emitted by one forward of a non-autoregressive model (the DD student).
    `generate(engine)` returns, per scale of the stage, (idx (B, l), code vectors (B, l, Cv))."""
    name: str = "student"
    begin: int = 0
    end: int = 0

    def start(self, engine: "Engine") -> None:
        pass

    def generate(self, engine: "Engine") -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        raise NotImplementedError


@dataclass
class Plan:
    stages: list
    token_rule: TokenRule
    kv_policies: dict[str, CachePolicy] = field(default_factory=dict)
    constraint: Constraint | None = None
    speculation: Speculation | None = None
    compile: str | None = None  # torch.compile mode of every VAR stage's per-scale forward
    cache_dtype: torch.dtype | None = None
    # Caches kept across calls, keyed by (stage, model, rows): cleared, not reallocated, so compiled graphs and
    # CUDA graphs see the same buffer addresses again and replay (None: a new cache per call).
    cache_pool: dict | None = None


@dataclass
class ScaleState:
    f_hat: torch.Tensor  # (B, Cv, h, w) accumulated latent of the committed scales
    tokens: list[torch.Tensor] = field(default_factory=list)  # committed maps, (B, l) per scale
    inputs: list[torch.Tensor | None] = field(default_factory=lambda: [None])  # inputs[si] (B, l_si, Cv), si >= 1


class _Running:
    """A VAR stage while it runs: its model, class conditions (2B, C), cache and forward function."""

    def __init__(self, stage: VARStage, labels_B: torch.Tensor, plan: Plan):
        model = stage.model
        self.stage, self.model = stage, model
        self.cond_2BD = conditions(model, labels_B)
        key = (stage.name, id(model), labels_B.shape[0], plan.cache_dtype)
        if plan.cache_pool is None:
            self.cache = model.new_cache(dtype=plan.cache_dtype)
        else:
            if key not in plan.cache_pool:
                plan.cache_pool[key] = model.new_cache(dtype=plan.cache_dtype)
            self.cache = plan.cache_pool[key]
            self.cache.clear()
        self.run_blocks = compile_blocks(model, plan.compile)
        self.policy = plan.kv_policies.get(stage.name)
        wants_queries = self.policy is not None and self.policy.needs_queries
        self.recorder = QueryRecorder(model, self.policy.query_rows) if wants_queries else None


def embed_maps(model: VAR, cond_2BD: torch.Tensor, maps_BlCv: list[torch.Tensor], first: int, end: int) -> torch.Tensor:
    """Embedded input tokens (2B, L, C) of scales [first, end) from their input maps (scales >= 1), identical
    for the conditional and CFG halves."""
    if not maps_BlCv:
        return model.embed(cond_2BD, None, first, end)
    x_BLCv = maps_BlCv[0] if len(maps_BlCv) == 1 else torch.cat(maps_BlCv, dim=1)
    return model.embed(cond_2BD, x_BLCv.repeat(2, 1, 1), first, end)


def embed_scales(model: VAR, cond_2BD: torch.Tensor, state: ScaleState, first: int, end: int) -> torch.Tensor:
    """Embedded inputs of scales [first, end) from the committed inputs of `state`."""
    return embed_maps(model, cond_2BD, [state.inputs[s] for s in range(max(first, 1), end)], first, end)


def conditions(model: VAR, labels_B: torch.Tensor) -> torch.Tensor:
    """(2B, C) class vectors: the requested labels, then the null class for the CFG half."""
    null = torch.full_like(labels_B, model.num_classes)
    return model.condition(torch.cat((labels_B, null)))


class Engine:
    """Runs one `Plan` for one batch. Read by policies: var (main model), vae, labels_B, sampling, stats,
    generator, state (committed f_hat / tokens / inputs), block_sizes, vocab_size, f_hat, inputs, tokens."""

    def __init__(self, plan: Plan, var: VAR, vae: VQVAE, labels_B: torch.Tensor, generator, stats: SamplerStats,
                 sampling: Sampling, kept_logits: list | None = None):
        self.plan, self.var, self.vae, self.labels_B = plan, var, vae, labels_B
        self.generator, self.stats, self.sampling, self.kept_logits = generator, stats, sampling, kept_logits
        self.num_scales = len(var.patch_nums)
        self.block_sizes = tuple(p * p for p in var.patch_nums)
        self.vocab_size = var.config.vocab_size
        side = var.patch_nums[-1]
        f_hat = torch.zeros(labels_B.shape[0], var.config.z_channels, side, side, device=labels_B.device)
        self.state = ScaleState(f_hat)
        self.running: _Running | None = None

    # views the draft sources read (the committed state)
    @property
    def f_hat(self) -> torch.Tensor:
        return self.state.f_hat

    @property
    def inputs(self) -> list:
        return self.state.inputs

    @property
    def tokens(self) -> list:
        return self.state.tokens

    def draw_with_law(self, logits_2BlV: torch.Tensor, si: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A draft model's raw logits -> (tokens drawn by the plan's token rule, their processed law (B, l, V))."""
        guided = guide(logits_2BlV, cfg_strength(self.sampling.cfg, si, self.num_scales))
        law = self.plan.token_rule.law(self, guided, si)
        return self.plan.token_rule.choose(self, guided, si)[0], law

    # ---- the loop -----------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        plan, K, B = self.plan, self.num_scales, self.labels_B.shape[0]
        if self.sampling.more_smooth and (plan.speculation is not None or not plan.token_rule.verifiable):
            raise ValueError("more_smooth is a visualisation path with soft codes: it has no token law to verify "
                             "(sjd) or transport (flow); use it with the plain draw, or set more_smooth=False")
        if self.sampling.more_smooth and any(isinstance(st, OneShotStage) for st in plan.stages):
            raise ValueError("more_smooth has no meaning for the distilled student (no categorical draws); "
                             "use more_smooth=False")
        for stage in plan.stages:
            if isinstance(stage, OneShotStage):
                stage.start(self)
        plan.token_rule.start(self)
        if plan.constraint is not None:
            plan.constraint.start(self)
        if plan.speculation is not None:
            plan.speculation.start(self, B)
        device = self.labels_B.device
        tokens: list[torch.Tensor | None] = [None] * K  # per scale; rows may hold final tokens beyond the commit
        final = [torch.zeros(B, dtype=torch.bool, device=device) for _ in range(K)]
        a = 0
        for stage in plan.stages:
            if stage.begin != a:
                raise ValueError(f"stages must cover the scales in order: {type(stage).__name__} {stage.name!r} "
                                 f"starts at {stage.begin}, expected {a}")
            if isinstance(stage, OneShotStage):
                outputs = stage.generate(self)
                self._commit_block(a, outputs, tokens, final)
                a = stage.end
                continue
            self._begin_stage(stage)
            spec = plan.speculation if plan.speculation is not None and plan.speculation.applies_to(stage) else None
            while a < stage.end:
                a = self._pass(a, stage, spec, tokens, final) if spec is not None else self._step(a, tokens, final)
            self._end_stage()
        if a != K:
            raise ValueError(f"the stages cover scales 0..{a - 1}, not all {K} scales")
        return self.state.tokens, self.state.f_hat

    def _step(self, a: int, tokens, final) -> int:
        """Plain next-scale step: one forward over scale a, the token rule draws it, it is committed. Rows an
        earlier speculative pass made final at a keep their tokens: their final later scales were drawn given
        them (a shrinking adaptive window steps over such scales)."""
        logits = self._forward(a, [])[0]
        guided = guide(logits, cfg_strength(self.sampling.cfg, a, self.num_scales))
        idx, vec = self._forced(a, *self.plan.token_rule.choose(self, guided, a))
        if tokens[a] is not None:  # only under speculation, which refuses soft codes: vec is None
            idx = torch.where(final[a][:, None], tokens[a], idx)
        tokens[a], final[a] = idx, torch.ones_like(final[a])
        if self.kept_logits is not None:
            self.kept_logits.append(logits)
        self._commit(a, a + 1, [idx], [vec])
        return a + 1

    def _pass(self, a: int, stage: VARStage, spec, tokens, final) -> int:
        """Speculative pass: one forward over the window a..e-1; drafts verified scale by scale while a row's
        context is exact, the last scale drawn directly; commits the scales final in every row."""
        K = self.num_scales
        e = spec.window_end(a, stage.end)
        if e == a + 1:  # a window of one scale (the next one is too large to speculate): a plain step
            c = self._step(a, tokens, final)
            spec.observe(a, c, [], tokens, final)
            return c
        drafts = spec.propose(a, e - 1, tokens, final)
        inputs, forced = [], []  # forced[i]: the constraint's keep mask (B, l) of draft i, or None
        for b, d in zip(range(a, e - 1), drafts):
            d.tokens, keep = self._constrain(b, d.tokens)
            forced.append(keep)
            inputs.append(d.tokens if tokens[b] is None else torch.where(final[b][:, None], tokens[b], d.tokens))
        logits = self._forward(a, inputs)
        exact_B = torch.ones(self.labels_B.shape[0], dtype=torch.bool, device=self.labels_B.device)
        probs = []
        for b in range(a, e):
            guided = guide(logits[b - a], cfg_strength(self.sampling.cfg, b, K))
            probs.append(self.plan.token_rule.law(self, guided, b))
            if b < e - 1:
                exact_B = spec.verify(b, probs[-1], drafts[b - a], tokens, final, exact_B, forced[b - a],
                                      self._constrain)
            else:  # rows whose context is exact draw the last scale directly
                idx, _ = self._constrain(b, self.plan.token_rule.choose(self, guided, b)[0])
                take = exact_B & ~final[b]
                tokens[b] = idx if tokens[b] is None else torch.where(take[:, None], idx, tokens[b])
                final[b] = final[b] | exact_B
        c = a
        while c < min(K, stage.end) and bool(final[c].all()):
            c += 1
        if self.kept_logits is not None:
            self.kept_logits.extend(logits[: c - a])
        self._commit(a, c, [tokens[s] for s in range(a, c)], [None] * (c - a))
        spec.observe(a, c, probs, tokens, final)
        return c

    def _forced(self, si: int, idx_Bl: torch.Tensor, vec_BlC: torch.Tensor | None):
        """Apply the constraint to drawn tokens, and to their vectors when the rule made its own (soft codes)."""
        idx_Bl, keep_Bl = self._constrain(si, idx_Bl)
        if vec_BlC is not None and keep_Bl is not None:
            known = self.vae.quantize.embedding(idx_Bl).to(vec_BlC.dtype)
            vec_BlC = torch.where(keep_Bl[..., None], known, vec_BlC)
        return idx_Bl, vec_BlC

    # ---- model forwards -------------------------------------------------------------------------------
    def _begin_stage(self, stage: VARStage) -> None:
        self.running = _Running(stage, self.labels_B, self.plan)
        self.stats.kv_stage_begin(stage.name)

    def _end_stage(self) -> None:
        run = self.running
        self.stats.kv_stage_end(run.stage.name)
        run.cache.clear()
        self.running = None  # the next model cannot reuse this cache (other width): dropping it frees it (a
        # pooled cache of a compiled sampler stays allocated on purpose, for the next call)

    def _forward(self, a: int, input_tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw logits (2B, l_b, V) of scales a..a+len(input_tokens): one forward from the committed inputs
        (all of them when the stage's cache is empty: the hand-over prefill) and the drafted maps."""
        run, q = self.running, self.vae.quantize
        model, e = run.model, a + len(input_tokens) + 1
        first = a if run.cache.seq_len > 0 or a == 0 else 0
        maps = [self.state.inputs[s] for s in range(max(first, 1), a + 1)]
        f_hat = self.state.f_hat
        for i, tok in enumerate(input_tokens):
            f_hat, nxt = q.next_input(a + i, f_hat, q.lookup(tok, model.patch_nums[a + i]))
            maps.append(rearrange(nxt, "b c h w -> b (h w) c"))
        x_2BLC = embed_maps(model, run.cond_2BD, maps, first, e)
        self.stats.count_forward(run.stage.name, x_2BLC)
        if run.recorder is not None:
            run.recorder.start(first, e, x_2BLC.device)
        hidden = run.run_blocks(x_2BLC, run.cond_2BD, run.cache, first, run.recorder)
        self.stats.record_kv(run.cache)  # held during this forward: history + every map of the window
        skip = model.begin_ends[a][0] - model.begin_ends[first][0]  # prefill: only scales a.. are sampled
        logits = model.logits(hidden[:, skip:], run.cond_2BD)
        out, start = [], 0
        for b in range(a, e):
            n = self.block_sizes[b]
            out.append(logits[:, start:start + n])
            start += n
        return out

    # ---- committing -----------------------------------------------------------------------------------
    def _constrain(self, si: int, idx_Bl: torch.Tensor):
        if self.plan.constraint is None:
            return idx_Bl, None
        return self.plan.constraint.apply(si, idx_Bl)

    def _commit_block(self, a: int, outputs, tokens, final) -> None:
        """A one-shot stage's scales, committed for every row."""
        idx_list, vec_list = [], []
        for i, (idx, vec) in enumerate(outputs):
            idx, vec = self._forced(a + i, idx, vec)
            tokens[a + i], final[a + i] = idx, torch.ones_like(final[a + i])
            idx_list.append(idx)
            vec_list.append(vec)
        self._commit(a, a + len(outputs), idx_list, vec_list)

    def _commit(self, a: int, c: int, maps: list[torch.Tensor], vecs: list) -> None:
        """Scales a..c-1 are final for every row: keep their KV, roll back the rest, update the state,
        then let the stage's cache policy act on the cache after scale c-1."""
        st, q, K = self.state, self.vae.quantize, self.num_scales
        run = self.running
        if run is not None:
            run.cache.truncate(run.model.begin_ends[c - 1][1])
        for si, idx, vec in zip(range(a, c), maps, vecs):
            pn = self.var.patch_nums[si]
            code_BChw = q.lookup(idx, pn) if vec is None else rearrange(vec, "b (h w) c -> b c h w", h=pn, w=pn)
            st.f_hat, nxt = q.next_input(si, st.f_hat, code_BChw)
            st.tokens.append(idx)
            if si + 1 < K:
                st.inputs.append(rearrange(nxt, "b c h w -> b (h w) c"))
        if run is not None and run.policy is not None:
            queries = None if run.recorder is None else run.recorder.for_scale(c - 1)
            record = run.policy.compress(run.cache, run.model, c - 1, queries)
            self.stats.record_compression(run.stage.name, run.cache, record)
            if run.recorder is not None:
                run.recorder.clear()
        if self.plan.speculation is not None and run is not None:
            cache = run.cache
            self.stats.extra.setdefault("kv_after_pass", []).append(
                {"committed_scales": c, "seq_len": cache.seq_len,
                 "layer_lens": [cache.layer_len(i) for i in range(cache.num_layers)]})


def model_modules(models: dict[str, nn.Module | None]) -> nn.ModuleDict:
    """The extra models of a plan as submodules, so `sampler.to(device)` moves them."""
    return nn.ModuleDict({k: m for k, m in models.items() if m is not None})

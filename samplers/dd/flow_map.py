"""Per-token flow map of distilled decoding (spec accelerators.md 4.2): Gaussian noise -> token, deterministic.

For a token with processed probabilities p over codebook vectors c_1..c_V, the rectified-flow path
x_t = (1 - t) x_0 + t eps joins the discrete law pi_0 = sum_j p_j delta(c_j) (t = 0) to N(0, I) (t = 1).
Its probability-flow ODE dx/dt = (x_t - E[x_0 | x_t]) / t, with posterior weights
w_j ∝ p_j N(x_t; (1 - t) c_j, t^2 I), transports N(0, I) onto pi_0; integrating it from eps at t = 1 down
to t ≈ 0 lands on one code, whose index is the token. Mapping eps ~ N(0, I) therefore draws exactly from
p (up to ODE error near cell boundaries), but as a deterministic function of eps.

Solver: data-prediction DPM-Solver++(2M) on a log-SNR grid (lambda = log((1 - t) / t)), all in float32,
no network evaluation (only V-way weighted sums). The first step leaves t = 1 exactly (where the
posterior is p itself). Codes with p_j = 0 (removed by top-k/top-p) are excluded from the mixture: when every
row of a chunk has at most `support_gather` x V non-zero entries, each row's support is gathered first and the
sums run over K = the chunk's largest support instead of V (top-k 225 of 1024 codes: >= 4.5x fewer
operations; the excluded terms are exactly zero, so only float rounding differs). Rows are chunked in order
of support size, so confident tokens (supports of a few codes) cost a few codes each.

`FlowSampler` ("flow") is the default VAR loop with this map as its token-drawing rule: each token draws
eps ~ N(0, I_Cvae) from the generator and maps it through the processed distribution of the default
sampler, so every token keeps the teacher's law (spec 4.9 item 2) while noise -> tokens is deterministic;
the (label, eps, tokens) triples it produces are the training pairs of a DD student. `last_noise` keeps
the noise of the last call, one (B, n_k, Cvae) tensor per scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from samplers.base import Accelerator, register_sampler, sampler_class
from samplers.engine import Plan, TokenRule
from samplers.rules import CategoricalDraw


@dataclass(frozen=True)
class FlowMapConfig:
    steps: int = 128  # solver steps after the first one from t = 1
    t_first: float = 0.98  # end of the first (exact-from-t=1) step
    t_end: float = 2e-3  # final time; the posterior is already collapsed onto one code there
    chunk: int = 1024  # tokens per chunk (memory: chunk x V floats, or chunk x K x C when the support is gathered)
    support_gather: float = 0.5  # gather each row's support when it is at most this fraction of V (0: never)

    def __post_init__(self) -> None:
        if self.steps < 1 or not 0 < self.t_end < self.t_first < 1 or self.chunk < 1 or not 0 <= self.support_gather <= 1:
            raise ValueError(f"invalid flow-map settings {self}: need steps >= 1, 0 < t_end < t_first < 1, chunk >= 1, "
                             f"0 <= support_gather <= 1")


@dataclass
class FlowResult:
    tokens: torch.Tensor  # (N,) int64
    endpoint: torch.Tensor  # (N, C) the ODE state mapped to t = 0 by the last denoised estimate


def _denoise(x_NC: torch.Tensor, t: float, logp_NV: torch.Tensor, codes: torch.Tensor, sq: torch.Tensor):
    """Posterior mean E[x_0 | x_t] and posterior logits (N, V). codes: (V, C) shared by every row, or (N, K, C)
    per row (gathered supports, then logp and sq are (N, K))."""
    a = 1.0 - t
    dots = x_NC @ codes.T if codes.ndim == 2 else torch.einsum("nc,nkc->nk", x_NC, codes)
    # log p_j - |x - a c_j|^2 / (2 t^2), dropping |x|^2 (constant over j)
    logits = logp_NV + (2 * a * dots - a * a * sq) / (2 * t * t)
    weights = logits.softmax(-1)
    mean = weights @ codes if codes.ndim == 2 else torch.einsum("nk,nkc->nc", weights, codes)
    return mean, logits


def log_snr_grid(cfg: FlowMapConfig) -> list[float]:
    """Times t from 1 down to t_end: one step to t_first, then uniform in log-SNR."""
    lam = torch.linspace(torch.logit(torch.tensor(1 - cfg.t_first)).item(),
                         torch.logit(torch.tensor(1 - cfg.t_end)).item(), cfg.steps + 1, dtype=torch.float64)
    return [1.0] + torch.sigmoid(-lam).tolist()


def _gathered(logp_NV: torch.Tensor, codes_VC: torch.Tensor, sq_V: torch.Tensor, fraction: float):
    """(logp (N, K), codes (N, K, C), sq (N, K), index (N, K)) over each row's K most likely codes, K = the
    largest support in the chunk, when K <= fraction x V; None otherwise. Padding entries keep logp = -inf."""
    V = codes_VC.shape[0]
    K = int(torch.isfinite(logp_NV).sum(-1).max())
    if K > fraction * V:
        return None
    logp_NK, index_NK = logp_NV.topk(K, dim=-1)
    return logp_NK, codes_VC[index_NK], sq_V[index_NK], index_NK


def _flow_chunk(noise_NC, logp_NV, codes_VC, sq_V, ts: list[float], support_gather: float) -> FlowResult:
    gathered = _gathered(logp_NV, codes_VC, sq_V, support_gather)
    if gathered is not None:
        logp_NK, codes_NKC, sq_NK, index_NK = gathered
        out = _integrate(noise_NC, logp_NK, codes_NKC, sq_NK, ts)
        return FlowResult(index_NK.gather(1, out.tokens[:, None])[:, 0], out.endpoint)
    return _integrate(noise_NC, logp_NV, codes_VC, sq_V, ts)


def _integrate(noise_NC, logp_NV, codes_VC, sq_V, ts: list[float]) -> FlowResult:
    """The ODE from t = 1 to ts[-1]; tokens index the columns of logp (the codes given)."""
    x = noise_NC
    prev_d, prev_h = None, None
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        d, _ = _denoise(x, t, logp_NV, codes_VC, sq_V)
        if t == 1.0:  # alpha = 0: x_{t'} = t' eps + (1 - t') x0_hat exactly (DDIM from pure noise)
            x = t_next * x + (1 - t_next) * d
            continue
        lam, lam_next = torch.logit(torch.tensor(1 - t, dtype=torch.float64)), torch.logit(torch.tensor(1 - t_next, dtype=torch.float64))
        h = float(lam_next - lam)
        if prev_d is not None:  # second-order multistep correction of the denoised estimate
            r = prev_h / h
            d_eff = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * prev_d
        else:
            d_eff = d
        x = (t_next / t) * x + (1 - t_next) * (-torch.expm1(torch.tensor(-h)).item()) * d_eff
        prev_d, prev_h = d, h
    endpoint, logits = _denoise(x, ts[-1], logp_NV, codes_VC, sq_V)
    return FlowResult(logits.argmax(-1), endpoint)


@torch.no_grad()
def flow_map(noise_NC: torch.Tensor, probs_NV: torch.Tensor, codebook_VC: torch.Tensor,
             config: FlowMapConfig = FlowMapConfig()) -> FlowResult:
    """Map Gaussian noise (N, C) to tokens drawn from probs (N, V) over codebook vectors (V, C)."""
    N, C = noise_NC.shape
    V = codebook_VC.shape[0]
    if probs_NV.shape != (N, V) or codebook_VC.shape[1] != C:
        raise ValueError(f"shapes do not match: noise {tuple(noise_NC.shape)}, probs {tuple(probs_NV.shape)}, "
                         f"codebook {tuple(codebook_VC.shape)}; need (N, C), (N, V), (V, C)")
    with torch.autocast(device_type=noise_NC.device.type, enabled=False):
        codes = codebook_VC.detach().float()
        sq_V = codes.square().sum(-1)
        probs = probs_NV.float()
        if bool((probs.sum(-1) <= 0).any()) or bool((probs < 0).any()):
            raise ValueError("every token needs a probability vector with non-negative entries and positive mass")
        logp = (probs / probs.sum(-1, keepdim=True)).log()  # zeros -> -inf: excluded from the mixture
        ts = log_snr_grid(config)
        # rows in order of support size, so a chunk's K (its largest support) is close to each row's own:
        # background tokens of a confident teacher have supports of a few codes, others of hundreds
        order_N = torch.isfinite(logp).sum(-1).argsort(stable=True)
        parts = [_flow_chunk(noise_NC[rows].float(), logp[rows], codes, sq_V, ts, config.support_gather)
                 for rows in order_N.split(config.chunk)]
        tokens_N = torch.empty(N, dtype=torch.long, device=noise_NC.device)
        endpoint_NC = torch.empty(N, C, dtype=torch.float32, device=noise_NC.device)
        tokens_N[order_N] = torch.cat([p.tokens for p in parts])
        endpoint_NC[order_N] = torch.cat([p.endpoint for p in parts])
    return FlowResult(tokens_N, endpoint_NC)


def flow_tokens(noise_BlC: torch.Tensor, probs_BlV: torch.Tensor, codebook_VC: torch.Tensor,
                config: FlowMapConfig = FlowMapConfig()) -> torch.Tensor:
    """Batched convenience: (B, l, C) noise and (B, l, V) probabilities -> (B, l) tokens."""
    B, l, C = noise_BlC.shape
    out = flow_map(noise_BlC.reshape(B * l, C), probs_BlV.reshape(B * l, -1), codebook_VC, config)
    return out.tokens.view(B, l)


def gaussian_rows(shape: tuple[int, ...], generator, device: torch.device) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


class FlowTransport(TokenRule):
    """The flow-map token rule: eps ~ N(0, I_Cv) per token from the generator, mapped through the processed
    distribution of the plain draw. The noise of the last run is kept in `last_noise` (per scale)."""
    name = "flow"
    verifiable = False

    def __init__(self, config: FlowMapConfig, owner: "Flow"):
        self.config, self.owner = config, owner

    def start(self, engine) -> None:
        self.owner.last_noise = []

    def law(self, engine, guided_BlV, si):
        return self.owner.draw.law(engine, guided_BlV, si)

    def choose(self, engine, guided_BlV, si):
        B, l, _ = guided_BlV.shape
        codebook_VC = engine.vae.quantize.embedding.weight
        noise_BlC = gaussian_rows((B, l, codebook_VC.shape[1]), engine.generator, guided_BlV.device)
        self.owner.last_noise.append(noise_BlC)
        return flow_tokens(noise_BlC, self.law(engine, guided_BlV, si), codebook_VC, self.config), None


@register_sampler("flow")
class Flow(Accelerator):
    """options: flow_steps (ODE solver steps after the first). Owns the engine's token rule."""
    slots = ("token_rule",)

    def __init__(self, *, flow_steps: int = FlowMapConfig.steps):
        self.flow_config = FlowMapConfig(steps=flow_steps)
        self.draw = CategoricalDraw()
        self.last_noise: list[torch.Tensor] = []

    def configure(self, plan: Plan, sampler) -> None:
        plan.token_rule = FlowTransport(self.flow_config, self)


FlowSampler = sampler_class("flow")

"""Turning raw logits into the "processed distribution" every sampler draws from, and drawing from it.

Order (as the reference): classifier-free guidance with a linear ramp over scales, top-k, top-p,
then temperature. Accelerators that verify or transport tokens must use exactly this distribution.

`draw_tokens` has two random-number modes over that same law:

- rng="reference": today's operations in today's order over the whole vocabulary (filter in place,
  temperature, softmax, one multinomial call, or one per row with per-row generators). Bitwise the draws of
  the public VAR loop for a given generator state; costs a full sort and V exponentials per token.
- rng="fast" (default): the law computed on the top-k candidates only (one sorted `topk`, top-p on the k
  sorted candidates with the reference keep rule, temperature), then an inverse-CDF draw with one uniform
  per token over a float64 cumulative sum of the k candidate probabilities. Same distribution, another
  random stream. Rows where a tie crosses a cut (the k-th logit equals the (k+1)-th, or the top-p cut falls
  inside a run of equal logits) have a law that depends on which equal logits the reference keeps; those
  rows take the reference filter exactly, over the whole vocabulary.

Per-row generators (a list of B generators): row b consumes only generator b, in both modes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange


def cfg_strength(cfg: float, si: int, num_scales: int) -> float:
    """Guidance ramps linearly from 0 at the first scale to `cfg` at the last (global scale index)."""
    return cfg * si / (num_scales - 1)


def guide(logits_2BlV: torch.Tensor, t: float) -> torch.Tensor:
    """Rows [:B] conditional, [B:] unconditional -> (1 + t) cond - t uncond. t = 0 is not "no CFG" only
    in cost: the unconditional half is still computed, as in the reference."""
    B = logits_2BlV.shape[0] // 2
    return (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]


def top_k_top_p_filter_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """In place: -inf for every logit below the k-th largest (ties at the threshold survive), then for the
    low-probability tail whose cumulative mass is <= 1 - top_p (the arg-max always survives)."""
    V = logits_BlV.shape[-1]
    if top_k > 0 and top_k < V:
        kth_largest = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_largest, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits_BlV.masked_fill_(remove, float("-inf"))
    return logits_BlV


def apply_temperature(logits_BlV: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits_BlV if temperature == 1.0 else logits_BlV / temperature


Generators = torch.Generator | list[torch.Generator] | None


def sample_from_logits(logits_BlV: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One categorical draw per token: (B, l, V) -> (B, l).

    With one generator, a single multinomial call per scale keeps the random stream identical to the
    reference implementation. With a list of B generators row b draws only from generator b, so an
    image does not depend on which batch it was generated in.
    """
    B, l, V = logits_BlV.shape
    probs = logits_BlV.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.multinomial(probs[b], 1, replacement=True, generator=g).view(l)
                            for b, g in enumerate(generator)])
    return torch.multinomial(probs.view(-1, V), num_samples=1, replacement=True, generator=generator).view(B, l)


def _exponential_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.empty_like(x[b]).exponential_(generator=g) for b, g in enumerate(generator)])
    return torch.empty_like(x).exponential_(generator=generator)


def gumbel_soft_codes(logits_BlV: torch.Tensor, ratio: float, codebook_VC: torch.Tensor,
                      generator: Generators) -> torch.Tensor:
    """"more smooth" visualisation path: a Gumbel-softmax mixture of codes instead of the one-hot lookup.
    Sharper at fine scales (tau shrinks with the scale ratio). Returns (B, l, Cvae)."""
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    gumbels = -_exponential_like(logits_BlV, generator).log()
    weights = ((logits_BlV * (1 + ratio) + gumbels) / tau).softmax(dim=-1)
    return weights @ codebook_VC.unsqueeze(0)


# Guidance beyond this has no use, and a large enough cfg overflows the guided logits to inf (a NaN law)
MAX_CFG = 10_000


def check_sampling_args(cfg: float, top_k: int, top_p: float, temperature, vocab_size: int, num_scales: int) -> None:
    problems = []
    if not isinstance(cfg, (int, float)) or not 0 <= cfg <= MAX_CFG:  # NaN fails the comparison too
        problems.append(f"cfg must be a number in [0, {MAX_CFG:g}] (0 disables guidance), got {cfg!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= vocab_size:
        problems.append(f"top_k must be an integer in [0, {vocab_size}] (0 disables it), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
        problems.append(f"top_p must be in [0, 1] (0 disables it), got {top_p!r}")
    temps = temperature if isinstance(temperature, (list, tuple)) else [temperature]
    if isinstance(temperature, (list, tuple)) and len(temperature) != num_scales:
        problems.append(f"a per-scale temperature needs {num_scales} values, got {len(temperature)}")
    if any(not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)) for t in temps):
        problems.append(f"temperature must be a finite number > 0, got {temperature!r}")
    if problems:
        raise ValueError("; ".join(problems))


def temperature_at(temperature, si: int) -> float:
    return float(temperature[si]) if isinstance(temperature, (list, tuple)) else float(temperature)


# ---- drawing tokens: reference and fast modes -----------------------------------------------------
RNG_MODES = ("fast", "reference")


@dataclass
class CandidateLaw:
    """The processed law of N = B*l flattened rows, kept on K candidates per row."""
    probs_NK: torch.Tensor  # float32, candidates in descending logit order; 0 for the top-p tail
    idx_NK: torch.Tensor | None  # int64 vocabulary ids of the candidates; None: the candidates are the vocab
    fallback_F: torch.Tensor  # int64 ids (ascending) of the rows whose law is given over the whole vocab
    fallback_probs_FV: torch.Tensor | None  # the reference law of those rows (top_k_top_p_filter_ exactly)
    vocab_size: int

    def dense(self) -> torch.Tensor:
        """(N, V) probabilities over the whole vocabulary."""
        if self.idx_NK is None:
            probs_NV = self.probs_NK.clone()
        else:
            probs_NV = self.probs_NK.new_zeros(self.probs_NK.shape[0], self.vocab_size)
            probs_NV.scatter_(-1, self.idx_NK, self.probs_NK)
        if self.fallback_probs_FV is not None:
            probs_NV[self.fallback_F] = self.fallback_probs_FV
        return probs_NV


def candidate_law(guided_NV: torch.Tensor, top_k: int, top_p: float, temperature: float) -> CandidateLaw:
    """The processed law of each row of (N, V) logits, computed on its top-k candidates. Reads, never
    writes, the logits."""
    N, V = guided_NV.shape
    K = top_k if 0 < top_k < V else V
    tied_N = torch.zeros(N, dtype=torch.bool, device=guided_NV.device)
    if K < V:
        # One extra value tells whether logits outside the candidates equal the k-th (the reference keeps them).
        vals_NK1, idx_NK1 = guided_NV.topk(K + 1, dim=-1, largest=True, sorted=True)
        tied_N = vals_NK1[:, K] == vals_NK1[:, K - 1]
        vals_NK, idx_NK = vals_NK1[:, :K], idx_NK1[:, :K]
    elif top_p > 0:
        vals_NK, idx_NK = guided_NV.sort(dim=-1, descending=True)
    else:
        vals_NK, idx_NK = guided_NV, None
    if top_p > 0:
        # The reference keep rule on the ascending order: drop the tail whose cumulative mass is <= 1 - top_p.
        drop_asc_NK = vals_NK.softmax(dim=-1).flip(-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_asc_NK[:, -1] = False  # the arg-max always survives
        drop_NK = drop_asc_NK.flip(-1)
        n_keep_N = K - drop_NK.sum(dim=-1)
        if K > 1:
            # A cut between two equal logits: which of them survives is the reference sort's tie order.
            last_kept = vals_NK.gather(-1, (n_keep_N - 1).unsqueeze(-1)).squeeze(-1)
            first_dropped = vals_NK.gather(-1, n_keep_N.clamp(max=K - 1).unsqueeze(-1)).squeeze(-1)
            tied_N |= (n_keep_N < K) & (last_kept == first_dropped)
        vals_NK = vals_NK.masked_fill(drop_NK, float("-inf"))
    probs_NK = apply_temperature(vals_NK, temperature).softmax(dim=-1)
    fallback_probs_FV = None
    if K == V and top_p == 0:  # no cut, hence no tie across one: skip the host sync below
        return CandidateLaw(probs_NK, idx_NK, torch.empty(0, dtype=torch.long, device=guided_NV.device), None, V)
    fallback_F = tied_N.nonzero().squeeze(-1)  # one host sync: the rare fallback rows need the whole vocab
    if fallback_F.numel():
        filtered_FV = top_k_top_p_filter_(guided_NV[fallback_F].clone(), top_k, top_p)
        fallback_probs_FV = apply_temperature(filtered_FV, temperature).softmax(dim=-1)
    return CandidateLaw(probs_NK, idx_NK, fallback_F, fallback_probs_FV, V)


def processed_probs(guided_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                    temperature: float = 1.0) -> torch.Tensor:
    """(B, l, V) probabilities of the law draw_tokens(rng="fast") draws from, over the whole vocabulary,
    for verification code (speculative acceptance, tests). Reads, never writes, the logits."""
    B, l, V = guided_BlV.shape
    law = candidate_law(rearrange(guided_BlV, "b l v -> (b l) v"), top_k, top_p, temperature)
    return rearrange(law.dense(), "(b l) v -> b l v", b=B, l=l)


def _uniforms(shape: tuple[int, ...], rows: int, generator: Generators, device: torch.device) -> torch.Tensor:
    """float64 uniforms; with per-row generators the first dimension is `rows` blocks, block b from generator b."""
    if isinstance(generator, (list, tuple)):
        per_row = shape[0] // rows
        return torch.cat([torch.rand((per_row, *shape[1:]), dtype=torch.float64, device=device, generator=g)
                          for g in generator])
    return torch.rand(shape, dtype=torch.float64, device=device, generator=generator)


def _inverse_cdf(probs_NK: torch.Tensor, u_N: torch.Tensor) -> torch.Tensor:
    """Index j with cum[j-1] <= u * total < cum[j], so zero-probability entries (cum[j] == cum[j-1]) are
    never picked. float64 keeps the mass of tiny probabilities that a float32 running sum would round away."""
    cum_NK = probs_NK.double().cumsum_(dim=-1)
    total_N = cum_NK[:, -1]
    # u < 1, but u * total can still round up to total: keep the target strictly below it.
    target_N = torch.minimum(u_N * total_N, torch.nextafter(total_N, torch.zeros_like(total_N)))
    return torch.searchsorted(cum_NK, target_N.unsqueeze(-1), right=True).squeeze(-1)


def _draw_fallback(law: CandidateLaw, generator: Generators, l: int) -> torch.Tensor:
    """Draws of the fallback rows over the whole vocabulary; per-row generator b serves only its own rows."""
    probs_FV = law.fallback_probs_FV
    if isinstance(generator, (list, tuple)):
        owners = (law.fallback_F // l).tolist()
        u_F = torch.cat([torch.rand(owners.count(b), dtype=torch.float64, device=probs_FV.device, generator=g)
                         for b, g in enumerate(generator) if b in owners])
    else:
        u_F = torch.rand(probs_FV.shape[0], dtype=torch.float64, device=probs_FV.device, generator=generator)
    return _inverse_cdf(probs_FV, u_F)


def draw_from_law(law: CandidateLaw, generator: Generators, B: int, l: int) -> torch.Tensor:
    """One token per flattened row of `law` -> (B, l) int64. Consumes one float64 uniform per row (then one
    per fallback row), from generator b for row b's tokens when given a list of B generators."""
    N = law.probs_NK.shape[0]
    u_N = _uniforms((N,), B, generator, law.probs_NK.device)
    j_N = _inverse_cdf(law.probs_NK, u_N)
    idx_N = j_N if law.idx_NK is None else law.idx_NK.gather(-1, j_N.unsqueeze(-1)).squeeze(-1)
    if law.fallback_probs_FV is not None:
        idx_N[law.fallback_F] = _draw_fallback(law, generator, l)
    return rearrange(idx_N, "(b l) -> b l", b=B, l=l)


def draw_tokens(guided_BlV: torch.Tensor, top_k: int, top_p: float, temperature: float,
                generator: Generators, rng: str = "fast") -> torch.Tensor:
    """Guided logits (B, l, V) -> one token per position (B, l) int64.

    top_k / top_p: 0 disables; temperature: the float of this scale (> 0), applied after filtering.
    generator: one torch.Generator for the batch, a list of B (row b draws only from generator b), or None.
    rng="reference" filters `guided_BlV` IN PLACE and reproduces the public loop's draws bitwise;
    rng="fast" leaves it untouched and draws from the same law with another random stream.
    """
    if rng == "reference":
        return sample_from_logits(apply_temperature(top_k_top_p_filter_(guided_BlV, top_k, top_p), temperature),
                                  generator)
    if rng != "fast":
        raise ValueError(f"rng must be one of {RNG_MODES}, got {rng!r}; use 'reference' for the public loop's draws")
    B, l, V = guided_BlV.shape
    if isinstance(generator, (list, tuple)) and len(generator) != B:
        raise ValueError(f"{len(generator)} per-row generators for {B} rows; give one generator per row")
    law = candidate_law(rearrange(guided_BlV, "b l v -> (b l) v"), top_k, top_p, temperature)
    return draw_from_law(law, generator, B, l)

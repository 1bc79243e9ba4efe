"""Turning raw logits into the "processed distribution" every sampler draws from.

Order (as the reference): classifier-free guidance with a linear ramp over scales, top-k, top-p,
then temperature. Accelerators that verify or transport tokens must use exactly this distribution.
"""
from __future__ import annotations

import torch


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


def check_sampling_args(cfg: float, top_k: int, top_p: float, temperature, vocab_size: int, num_scales: int) -> None:
    problems = []
    if not isinstance(cfg, (int, float)) or cfg < 0:
        problems.append(f"cfg must be a number >= 0 (0 disables guidance), got {cfg!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= vocab_size:
        problems.append(f"top_k must be an integer in [0, {vocab_size}] (0 disables it), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
        problems.append(f"top_p must be in [0, 1] (0 disables it), got {top_p!r}")
    temps = temperature if isinstance(temperature, (list, tuple)) else [temperature]
    if isinstance(temperature, (list, tuple)) and len(temperature) != num_scales:
        problems.append(f"a per-scale temperature needs {num_scales} values, got {len(temperature)}")
    if any(not isinstance(t, (int, float)) or t <= 0 for t in temps):
        problems.append(f"temperature must be > 0, got {temperature!r}")
    if problems:
        raise ValueError("; ".join(problems))


def temperature_at(temperature, si: int) -> float:
    return float(temperature[si]) if isinstance(temperature, (list, tuple)) else float(temperature)

"""Speculative verification of drafted tokens against the processed target distribution.

Modified rejection sampling (Leviathan et al.; SJD, Teng et al.): a draft token d drawn from q is kept
with probability min(1, p(d)/q(d)); otherwise a replacement is drawn from norm(max(0, p - q)). The
result is an exact sample of p for ANY draft law q, provided (a) q is the law d was really drawn from
and (b) the acceptance uniform and the residual draw are independent of the draft. q = None means a
point mass at the draft ("one-hot q"), exact for drafts of unknown law: accept with probability p(d),
otherwise draw from p with d removed.

Relaxed rules (opt-in, biased) live here too so that every mode shares one code path; `AcceptRule.exact`
tells the sampler whether its output may be reported as an exact sample.

Randomness helpers accept one generator or a list of per-row generators (row b only uses generator b),
like `samplers.logits_processing.sample_from_logits`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

Generators = torch.Generator | list[torch.Generator] | None

ACCEPT_MODES = ("exact", "lenient", "topk")


@dataclass(frozen=True)
class AcceptRule:
    """How a drafted token is accepted.

    exact:   u < p(d)/q(d) (lossless).
    lenient: u < lenient_ratio * p(d)/q(d) with lenient_ratio > 1 (biased towards the drafter).
    topk:    the exact test, or d is among the `accept_top_k` most likely tokens of p (GSD-like, biased).
    stale_tolerance (R1 of spec 3.6, biased when > 0): a block whose replaced-token fraction is at most this
    still counts as "accepted", so the next block's p, computed on the stale drafts, is verified as if exact.
    """
    mode: str = "exact"
    lenient_ratio: float = 1.0
    accept_top_k: int = 0
    stale_tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ACCEPT_MODES:
            raise ValueError(f"accept_mode must be one of {ACCEPT_MODES}, got {self.mode!r}")
        if self.mode == "lenient" and not self.lenient_ratio > 1.0:
            raise ValueError(f"accept_mode='lenient' needs lenient_ratio > 1 (1 is the exact test), got {self.lenient_ratio}")
        if self.mode == "topk" and self.accept_top_k < 1:
            raise ValueError(f"accept_mode='topk' needs accept_top_k >= 1, got {self.accept_top_k}")
        if not 0.0 <= self.stale_tolerance < 1.0:
            raise ValueError(f"stale_tolerance must be in [0, 1) (0 = exact), got {self.stale_tolerance}")

    @property
    def exact(self) -> bool:
        return self.mode == "exact" and self.stale_tolerance == 0.0

    def describe(self) -> str:
        if self.exact:
            return "exact (modified rejection sampling)"
        parts = []
        if self.mode == "lenient":
            parts.append(f"lenient ratio x{self.lenient_ratio:g}")
        if self.mode == "topk":
            parts.append(f"accept if in top-{self.accept_top_k} of p")
        if self.stale_tolerance > 0:
            parts.append(f"stale-context acceptance if <= {self.stale_tolerance:g} of a block is replaced")
        return "APPROXIMATE: " + ", ".join(parts)


# ---- randomness -----------------------------------------------------------------------------------------
def rand_rows(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """U[0, 1) of `shape` (rows first); per-row generators fill their own row."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in generator])
    return torch.rand(shape, generator=generator, device=device)


def multinomial_rows(probs_BlV: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One categorical draw per token from probabilities (B, l, V) -> (B, l)."""
    B, l, V = probs_BlV.shape
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.multinomial(probs_BlV[b], 1, replacement=True, generator=g).view(l)
                            for b, g in enumerate(generator)])
    return torch.multinomial(probs_BlV.reshape(-1, V), 1, replacement=True, generator=generator).view(B, l)


def _derived(g: torch.Generator | None, salt: bytes, device: torch.device) -> torch.Generator:
    if g is None:  # the global RNG: one draw from it seeds the derived stream, made on the device it draws on
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    else:
        digest = hashlib.sha256(salt + g.get_state().cpu().numpy().tobytes()).digest()
        seed, device = int.from_bytes(digest[:8], "little") >> 1, g.device
    out = torch.Generator(device=device)
    out.manual_seed(seed)
    return out


def derive_generator(generator: Generators, device: torch.device, salt: bytes = b"block-sjd-verify") -> Generators:
    """An independent stream for acceptance tests, derived from the caller's generator(s) WITHOUT consuming
    them: drafts keep using the caller's stream in the default sampler's order (this is the coupling that
    makes a drafter equal to the target reproduce plain sampling), while acceptance uniforms and residual
    draws come from a hash-seeded stream that is statistically independent of the drafts. A caller's
    generator keeps its own device; without one (the global RNG) the stream is made on `device`, the one
    the draws happen on (CUDA ops refuse a CPU generator)."""
    if isinstance(generator, (list, tuple)):
        return [_derived(g, salt, device) for g in generator]
    return _derived(generator, salt, torch.device(device))


# ---- acceptance math ------------------------------------------------------------------------------------
def draft_ratio(p_BlV: torch.Tensor, draft_Bl: torch.Tensor, q_BlV: torch.Tensor | None) -> torch.Tensor:
    """p(d)/q(d) per token (inf where q(d) = 0 < p(d): such a draft could not have come from q)."""
    p_d = p_BlV.gather(-1, draft_Bl.unsqueeze(-1)).squeeze(-1)
    if q_BlV is None:
        return p_d
    q_d = q_BlV.gather(-1, draft_Bl.unsqueeze(-1)).squeeze(-1)
    return torch.where(q_d > 0, p_d / q_d.clamp_min(torch.finfo(q_d.dtype).tiny), torch.where(p_d > 0, torch.inf, 0.0))


def accept_tokens(p_BlV: torch.Tensor, draft_Bl: torch.Tensor, q_BlV: torch.Tensor | None, u_Bl: torch.Tensor,
                  rule: AcceptRule) -> torch.Tensor:
    """Boolean (B, l): which drafts are kept. u must be U[0,1) independent of the drafts."""
    ratio = draft_ratio(p_BlV, draft_Bl, q_BlV)
    if rule.mode == "lenient":
        ratio = ratio * rule.lenient_ratio
    accept = u_Bl < ratio  # u < 1 always, so this is u < min(1, ratio)
    if rule.mode == "topk":
        k = min(rule.accept_top_k, p_BlV.shape[-1])
        kth = p_BlV.topk(k, dim=-1).values[..., -1]
        p_d = p_BlV.gather(-1, draft_Bl.unsqueeze(-1)).squeeze(-1)
        accept = accept | ((p_d >= kth) & (p_d > 0))
    return accept


def residual_probs(p_BlV: torch.Tensor, draft_Bl: torch.Tensor, q_BlV: torch.Tensor | None) -> torch.Tensor:
    """norm(max(0, p - q)); for one-hot q: p with the draft removed. Where the residual has no mass (p <= q
    everywhere, i.e. p == q, so a rejection has probability 0) p itself is returned to keep draws defined."""
    if q_BlV is None:
        resid = p_BlV.scatter(-1, draft_Bl.unsqueeze(-1), 0.0)
    else:
        resid = (p_BlV - q_BlV).clamp_min_(0.0)
    mass = resid.sum(-1, keepdim=True)
    empty = mass <= 1e-12
    return torch.where(empty, p_BlV, resid / torch.where(empty, 1.0, mass))


@dataclass
class Verdict:
    tokens: torch.Tensor  # (B, l) final tokens: kept drafts or residual draws
    accepted: torch.Tensor  # (B, l) bool: the draft was kept


def verify_block(p_BlV: torch.Tensor, draft_Bl: torch.Tensor, q_BlV: torch.Tensor | None, rule: AcceptRule,
                 generator: Generators) -> Verdict:
    """Verify every token of one block independently (tokens of a block are conditionally independent).

    Uniforms and residual draws are taken for every token (a fixed amount of randomness per block), from
    `generator`, which must be independent of how the drafts were drawn.
    """
    if p_BlV.shape[:-1] != draft_Bl.shape or (q_BlV is not None and q_BlV.shape != p_BlV.shape):
        raise ValueError(f"shapes do not match: p {tuple(p_BlV.shape)}, draft {tuple(draft_Bl.shape)}, "
                         f"q {None if q_BlV is None else tuple(q_BlV.shape)}")
    u_Bl = rand_rows(tuple(draft_Bl.shape), generator, p_BlV.device)
    accepted = accept_tokens(p_BlV, draft_Bl, q_BlV, u_Bl, rule)
    replacement = multinomial_rows(residual_probs(p_BlV, draft_Bl, q_BlV), generator)
    return Verdict(torch.where(accepted, draft_Bl, replacement), accepted)

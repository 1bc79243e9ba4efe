"""ScaleKV offline identification: attention statistics per (layer, scale), ASI, drafter selection.

For every query of the current map (attention after softmax, averaged over heads):
  current ratio  = attention mass on keys of the current map;
  history conc.  = sum of the `hist_topk` (K') largest weights on keys of earlier maps.
ASI(l, k) = mean(current ratio) * mean(history conc.) over queries, rows and calibration samples.
Low ASI = attention diffuse over the history = "drafter" layer (needs a large cache). Scores are
z-normalised over layers within each scale. Selection "pooled" (the paper's rule, the default): over all
ranked (layer, scale) pairs, the N_d of smallest z are drafters, N_d = max(1, round(drafter_frac * layers))
per ranked scale on average, so a scale may get none or several. Selection "per_scale": exactly that many
at every scale (every compressed scale then has both kinds). Only scales 1..K-2 are ranked: scale 0 has no
history and the cache after the last scale is never reused.

The result is a small JSON tied to the model by a hash of its config and weights; loading it for
another model is refused. CLI: python -m samplers.scalekv.calibration --var V.safetensors --tokenizer T.safetensors --out cal.json
"""
from __future__ import annotations

import sys

import torch

from samplers.base import Sampler
from samplers.scalekv.calibration_file import FORMAT, VERSION, load_calibration, model_fingerprint, save_calibration  # noqa: F401
from samplers.scalekv.policies import CompressionRecord, KVPolicy
from samplers.scalekv.sampler import ScaleKV
from training.checkpoint import load_any
from training.errors import make_parser, run_cli


def asi_terms(attn_BHqL: torch.Tensor, n_current: int, hist_topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query (current ratio, history concentration), each (B, q), of head-averaged attention whose
    last `n_current` keys are the current map."""
    A_BqL = attn_BHqL.float().mean(dim=1)
    L = A_BqL.shape[-1]
    current = A_BqL[..., L - n_current:].sum(-1)
    history = A_BqL[..., : L - n_current]
    if history.shape[-1] == 0:
        return current, torch.zeros_like(current)
    conc = history.topk(min(hist_topk, history.shape[-1]), dim=-1).values.sum(-1)
    return current, conc


def zscore_per_scale(asi_LK: torch.Tensor, scales: list[int], eps: float = 1e-6) -> torch.Tensor:
    """(L, K) z-scores over layers within each listed scale (population std); NaN elsewhere."""
    z = torch.full_like(asi_LK, float("nan"))
    for k in scales:
        col = asi_LK[:, k]
        z[:, k] = (col - col.mean()) / (col.std(unbiased=False) + eps)
    return z


def drafters_per_scale(num_layers: int, drafter_frac: float) -> int:
    """Drafter layers at every ranked scale: round(drafter_frac * layers), at least one when drafter_frac > 0
    (the released ScaleKV budgets: 2 of 32 layers per scale for Infinity-2B, 3 for 8B)."""
    return 0 if drafter_frac == 0 else max(1, round(drafter_frac * num_layers))


SELECTIONS = ("pooled", "per_scale")


def identify_drafters(asi_LK: torch.Tensor, scales: list[int], drafter_frac: float,
                      selection: str = "pooled") -> list[list[bool]]:
    """Boolean (L, K) mask of drafter (layer, scale) pairs: the `drafters_per_scale x len(scales)` pairs of
    smallest z over every listed scale ("pooled", the paper's rule), or the `drafters_per_scale` layers of
    smallest z at each listed scale ("per_scale"). Ties: lower scale, then lower layer first."""
    if not 0.0 <= drafter_frac <= 1.0:
        raise ValueError(f"drafter_frac must be in [0, 1], got {drafter_frac}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    L, K = asi_LK.shape
    z = zscore_per_scale(asi_LK, scales)
    n = drafters_per_scale(L, drafter_frac)
    groups = [scales] if selection == "pooled" else [[k] for k in scales]
    mask = [[False] * K for _ in range(L)]
    for group in groups:
        ranked = sorted(((float(z[l, k]), k, l) for k in group for l in range(L)))
        for _, k, l in ranked[: n * len(group)]:
            mask[l][k] = True
    return mask


class ASIRecorder(KVPolicy):
    """A no-op 'policy' that measures the layer's real attention of the current map after every scale."""
    name = "asi-recorder"
    needs_queries = True

    def __init__(self, num_layers: int, num_scales: int, hist_topk: int):
        self.hist_topk = hist_topk
        self.sums = torch.zeros(2, num_layers, num_scales, dtype=torch.float64)  # current, concentration
        self.counts = torch.zeros(num_layers, num_scales, dtype=torch.float64)

    @torch.no_grad()
    def compress(self, cache, model, si, queries=None) -> CompressionRecord:
        n = model.patch_nums[si] ** 2
        lens = [cache.layer_len(i) for i in range(cache.num_layers)]
        for layer in range(cache.num_layers):
            q = queries[layer].float()  # scale si's queries (the engine passes exactly those)
            k = cache.layer_keys(layer).float()
            attn = model.blocks[layer].attn.attention_logits(q, k).softmax(-1)
            current, conc = asi_terms(attn, n, self.hist_topk)
            self.sums[0, layer, si] += current.sum().double().cpu()  # the sums stay on the CPU, the model may not
            self.sums[1, layer, si] += conc.sum().double().cpu()
            self.counts[layer, si] += current.numel()
        return CompressionRecord(si, lens, lens)

    def asi(self) -> torch.Tensor:
        means = self.sums / self.counts.clamp_min(1)
        return means[0] * means[1]


@torch.no_grad()
def calibrate(var, vae, labels, seeds, *, drafter_frac: float = 0.08, hist_topk: int = 16, cfg: float = 1.5,
              top_k: int = 0, top_p: float = 0.0, selection: str = "pooled") -> dict:
    """Run the uncompressed sampler on `labels` x `seeds` (one generation per seed, all labels in a batch)."""
    K = var.num_scales
    recorder = ASIRecorder(var.depth, K, hist_topk)
    sampler = Sampler(var, vae, ScaleKV(policy=recorder))
    labels = torch.as_tensor(labels, dtype=torch.long)
    for seed in seeds:
        sampler.sample(labels, cfg=cfg, top_k=top_k, top_p=top_p, seed=int(seed), decode=False)
    asi = recorder.asi()
    scales = list(range(1, K - 1))
    mask = identify_drafters(asi, scales, drafter_frac, selection)
    z = zscore_per_scale(asi, scales)
    return {"format": FORMAT, "version": VERSION, "model": model_fingerprint(var),
            "settings": {"labels": labels.tolist(), "seeds": [int(s) for s in seeds], "cfg": cfg, "top_k": top_k,
                         "top_p": top_p, "hist_topk": hist_topk, "drafter_frac": drafter_frac,
                         "selection": selection},
            "scales": scales, "asi": asi.tolist(),
            "z": [[None if v != v else v for v in row] for row in z.tolist()],
            "drafters": [[l, k] for l in range(var.depth) for k in range(K) if mask[l][k]],
            "drafter_mask": mask}


def main(argv=None) -> None:
    p = make_parser(description="ScaleKV calibration of one VAR model")
    p.add_argument("--var", required=True, help="VAR checkpoint (.safetensors or official .pth)")
    p.add_argument("--tokenizer", required=True, help="its tokenizer checkpoint")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--classes", type=int, default=10, help="calibration labels 0..classes-1 (spaced over the label range)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--drafter-frac", type=float, default=0.08,
                   help="drafter (layer, scale) pairs per ranked scale, as a fraction of the layers")
    p.add_argument("--selection", choices=SELECTIONS, default="pooled",
                   help="pooled: the paper's rule (smallest z over all pairs); per_scale: the same count at every scale")
    p.add_argument("--hist-topk", type=int, default=16)
    p.add_argument("--cfg", type=float, default=1.5)
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    vae = load_any(args.tokenizer, "vqvae").eval()
    var = load_any(args.var, "var", patch_nums=vae.patch_nums).eval()
    n = min(args.classes, var.num_classes)
    labels = torch.linspace(0, var.num_classes - 1, n).round().long()
    result = calibrate(var, vae, labels, args.seeds, drafter_frac=args.drafter_frac, hist_topk=args.hist_topk,
                       cfg=args.cfg, selection=args.selection)
    print(f"drafters (layer, scale): {result['drafters']} -> {save_calibration(result, args.out)}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

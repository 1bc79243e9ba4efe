"""Timing check of the transformer forward loop: the old torch.cat KV cache vs the static cache, eager vs compiled.

  python benchmarks/engine_kernels.py                      # eager, both models, batch 16
  python benchmarks/engine_kernels.py --compile default    # also torch.compile (CPU: ~1 min of gcc per scale)

Tokenizer-free: random input maps are embedded once; one pass = `run_blocks` scale by scale (1 + 1 CFG
half is the caller's business; rows here are just the batch) with a fresh cache, as a sampler does.
Models: the shipped Fashion-MNIST drafter, and a random depth-4 width-128 VAR on the 10-scale 256px schedule.
Reports the median pass time over --repeats (after one warm-up pass) and writes/updates the JSON; entries
are keyed by model, batch and mode, so runs with different flags accumulate in one file.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere inside the repo

from training.atomic import atomic_write_json  # noqa: E402
from training.checkpoint import load_any  # noqa: E402
from var import VAR, VARConfig  # noqa: E402
from var.compile import MODES as COMPILE_MODES, compile_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE_10 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class ConcatCache:
    """The pre-static cache (torch.cat at every append), enough of it for a forward loop."""

    def __init__(self, num_layers: int):
        self.keys, self.values = [None] * num_layers, [None] * num_layers
        self.record_queries, self.seq_len = False, 0

    def append(self, layer, k, v, start):
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat((self.keys[layer], k), 2)
            self.values[layer] = torch.cat((self.values[layer], v), 2)
        return self.keys[layer], self.values[layer]

    def layer_len(self, layer):
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]


def build(name: str) -> VAR:
    if name == "drafter":
        return load_any(ROOT / "checkpoints" / "fmnist" / "var_drafter.safetensors", "var").eval()
    torch.manual_seed(0)
    return VAR(VARConfig(num_classes=10, depth=4, embed_dim=128, num_heads=4, patch_nums=SCHEDULE_10,
                         vocab_size=512, z_channels=16, cond_drop_rate=0.0)).eval()


def one_pass(var: VAR, run, new_cache, x_all, cond) -> None:
    cache = new_cache()
    for si, (b, e) in enumerate(var.begin_ends):
        run(x_all[:, b:e], cond, cache, si)


@torch.no_grad()
def time_mode(var: VAR, mode: str, batch: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    cond = var.condition(torch.randint(0, var.num_classes, (batch,), generator=g))
    x_all = var.embed(cond, torch.randn(batch, var.seq_len - var.first_l, var.config.z_channels, generator=g),
                      0, var.num_scales)
    if mode == "eager_concat":
        run, new_cache = var.run_blocks, lambda: ConcatCache(var.depth)
    elif mode == "eager_static":
        run, new_cache = var.run_blocks, var.new_cache
    else:
        run, new_cache = compile_blocks(var, mode.removeprefix("compiled_")), var.new_cache
    t0 = time.perf_counter()
    one_pass(var, run, new_cache, x_all, cond)  # warm-up; for compiled modes it compiles every scale
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_pass(var, run, new_cache, x_all, cond)
        times.append(time.perf_counter() - t0)
    return {"first_pass_s": round(first, 4), "median_pass_s": round(statistics.median(times), 5),
            "min_pass_s": round(min(times), 5), "repeats": repeats}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["drafter", "d4w128"], choices=["drafter", "d4w128"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--compile", nargs="*", default=[], choices=COMPILE_MODES,
                   help="also time compile_blocks with these modes (static cache)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engine_kernels_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    result["env"] = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                     "threads": args.threads, "note": "shared CPU machine; ratios are indicative"}
    modes = ["eager_concat", "eager_static"] + [f"compiled_{m}" for m in args.compile]
    for name in args.models:
        var = build(name)
        for mode in modes:
            r = time_mode(var, mode, args.batch, args.repeats)
            r.update(model=name, batch=args.batch, mode=mode, patch_nums=list(var.patch_nums), depth=var.depth,
                     embed_dim=var.embed_dim)
            result["runs"][f"{name}/b{args.batch}/{mode}"] = r
            print(f"{name:8s} b{args.batch:<3d} {mode:26s} median {r['median_pass_s'] * 1e3:8.1f} ms/pass "
                  f"(first pass {r['first_pass_s']:.1f} s)", flush=True)
        base = result["runs"].get(f"{name}/b{args.batch}/eager_concat")
        for mode in modes[1:]:
            r = result["runs"][f"{name}/b{args.batch}/{mode}"]
            r["speedup_vs_eager_concat"] = round(base["median_pass_s"] / r["median_pass_s"], 3)
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

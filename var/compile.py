"""torch.compile of the per-scale transformer forward (`VAR.run_blocks`) over the static KV cache.

With the static cache every scale's forward has fixed shapes: the new tokens of the scale, and an
attended length that is a fixed function of the scale (and of the per-layer budgets, if a policy
compressed the cache). `compile_blocks` therefore compiles with dynamic=False and lets Dynamo
specialise one graph per scale (the cache's per-layer lengths are Python ints it guards on).

Modes: None (eager), "default", "reduce-overhead" and "max-autotune" (both CUDA graphs on CUDA), and
"max-autotune-no-cudagraphs". CUDA graphs
replay at fixed addresses: the cache buffers are allocated before the first traced call and marked as
static inputs (`prepare_cache`), and each call starts a new CUDA-graph step, so outputs are cloned
out of the graph pool before being handed back. A cache that is reused (`clear()`) keeps its addresses
and replays the recorded graphs; a new cache makes them re-record once.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from var.kv_cache import KVCache
from var.model import VAR

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Inductor captures these modes in CUDA graphs on CUDA (torch._inductor.list_mode_options(): triton.cudagraphs)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# One graph per (scale, span, per-layer lengths, batch, grad mode): far more than Dynamo's default of 8.
RECOMPILE_LIMIT = 256


def key_dtype(model: VAR, device_type: str) -> torch.dtype:
    """The dtype the attention layers produce keys in: the autocast dtype if autocast is on, else the weights'."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return model.blocks[0].attn.mat_qkv.weight.dtype


def prepare_cache(model: VAR, cache: KVCache, x_BLC: torch.Tensor) -> None:
    """Allocate the cache's buffers eagerly, so a traced forward only ever writes into existing tensors."""
    attn = model.blocks[0].attn
    cache.allocate(x_BLC.shape[0], attn.num_heads, attn.head_dim, key_dtype(model, x_BLC.device.type), x_BLC.device)
    for t in cache.buffers():
        # Unguarded: CUDA graphs treat the buffers as static inputs (mutation allowed, no copy); a new
        # cache re-records the graphs instead of recompiling them.
        torch._dynamo.mark_static_address(t)


def compile_blocks(model: VAR, mode: str | None, *, backend="inductor") -> Callable[..., torch.Tensor]:
    """A function with the signature of `model.run_blocks(x_BLC, cond_BD, cache=None, scale_begin=0, observer=None)`.

    mode None returns `model.run_blocks` itself. A call with an observer runs eagerly: the observer is
    arbitrary Python (it usually stores tensors), which a graph cannot replay.
    backend: the torch.compile backend; `mode` only tunes "inductor" (tests trace with cheap backends).
    """
    if mode is None:
        return model.run_blocks
    if mode not in MODES:
        raise ValueError(f"compile mode must be None or one of {MODES}, got {mode!r}")
    device_type = model.pos_1LC.device.type
    if mode == "reduce-overhead" and device_type != "cuda":
        warnings.warn(f"compile mode 'reduce-overhead' uses CUDA graphs, which need CUDA; the model is on "
                      f"{device_type}, so the forward is compiled with mode 'default' instead", stacklevel=2)
        mode = "default"
    inductor = backend == "inductor"
    cuda_graphs = inductor and device_type == "cuda" and mode in CUDA_GRAPH_MODES
    compiled = torch.compile(model.run_blocks, backend=backend, mode=mode if inductor else None, dynamic=False,
                             fullgraph=True)

    def run_blocks(x_BLC: torch.Tensor, cond_BD: torch.Tensor, cache: KVCache | None = None, scale_begin: int = 0,
                   observer=None) -> torch.Tensor:
        if observer is not None:
            return model.run_blocks(x_BLC, cond_BD, cache, scale_begin, observer)
        if cache is not None:
            prepare_cache(model, cache, x_BLC)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
            out = compiled(x_BLC, cond_BD, cache, scale_begin)
        if cuda_graphs:  # graph outputs live in the CUDA-graph pool and are overwritten by the next replay
            out = out.clone()
        return out

    run_blocks.__doc__ = f"model.run_blocks compiled with torch.compile(mode={mode!r}, backend={backend!r}, dynamic=False)."
    return run_blocks

"""Launched by tests/test_dist_state.py: `python -m tests.dist_scripts.sharded_var OUT PORT MODE STEPS` (spawns
two gloo processes), or under `accelerate launch` with 2 processes (then PORT is unused).

The two processes train the tiny VAR for STEPS AdamW steps, each on its half of every batch, with MODE =
  fsdp2             torch's `fully_shard` per block + root, outside accelerate;
  accelerate_fsdp2  accelerate's own FSDP2 `prepare` (wrap policy on AdaLNBlock, as
                    configs/accelerate/fsdp_1node_8gpu.yaml): the optimizer is built over the unsharded
                    model and prepared with it, in one call, as accelerate 1.15 requires. accelerate 1.15
                    falls back to DDP on CPU, so this run switches it to FSDP2 (force_fsdp.py);
  ddp               DDP from `accelerator.prepare` (MULTI_CPU, gloo).
The main process writes, pickle-free (training/run_state.py), to OUT:
  gathered      the full model / optimizer / EMA (training.dist_state.ShardedEMA) state after the steps
  roundtrip     the same, gathered again from a fresh sharded model after loading `gathered` into it
  roundtrip0    (FSDP modes) as roundtrip, loaded with from_rank0 (only rank 0 holds the state; broadcast)
  next          one more step from the trained model, and from the reloaded one (next_orig / next_loaded)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.conftest import make_tiny_pair
from training.optim import param_groups

WORLD = 2
BATCH = 8
LR, WD = 1e-3, 0.05
EMA_DECAY = 0.9  # far from 1, so that the EMA differs visibly from both the initial and the trained weights


def make_model(seed: int):
    var, _ = make_tiny_pair(seed=seed)
    return var.train()


def batch(step: int, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels_B, x_tf_BlC, targets_BL) of the global batch of `step`: random but fixed by the step."""
    gen = torch.Generator().manual_seed(1000 + step)
    c = model.config
    L, first = sum(p * p for p in c.patch_nums), c.patch_nums[0] ** 2
    labels_B = torch.randint(0, c.num_classes, (BATCH,), generator=gen)
    x_tf_BlC = torch.randn(BATCH, L - first, c.z_channels, generator=gen)
    targets_BL = torch.randint(0, c.vocab_size, (BATCH, L), generator=gen)
    return labels_B, x_tf_BlC, targets_BL


def loss_of(model, labels_B, x_tf_BlC, targets_BL) -> torch.Tensor:
    logits_BLV = model(labels_B, x_tf_BlC)
    return F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten())


def make_optimizer(model) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)


def _accelerator(mode: str):
    from accelerate import Accelerator
    from tests.dist_scripts.force_fsdp import force_fsdp2
    acc = Accelerator(cpu=True)
    return force_fsdp2(acc) if mode == "accelerate_fsdp2" else acc


def _setup(acc, mode: str, seed: int):
    from torch.distributed.fsdp import fully_shard
    from training.dist_state import ShardedEMA
    model = make_model(seed)
    if mode == "fsdp2":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        opt = make_optimizer(model)
    else:
        # accelerate's FSDP2 needs the model and its optimizer in ONE prepare call (it refuses a model alone,
        # and more than one model per call) and swaps the optimizer's parameters for the shards
        model, opt = acc.prepare(model, make_optimizer(model))
    return model, opt, ShardedEMA(acc.unwrap_model(model), EMA_DECAY)


def _step(acc, model, opt, ema, step: int) -> None:
    rank, half = acc.process_index, BATCH // WORLD
    labels_B, x_tf_BlC, targets_BL = (t[rank * half: (rank + 1) * half] for t in batch(step, acc.unwrap_model(model)))
    acc.backward(loss_of(model, labels_B, x_tf_BlC, targets_BL))
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update()


def _worker(rank: int, out: str, port: int, mode: str, steps: int) -> None:
    if port:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from training.dist_state import (distributed_kind, full_model_state, full_optimizer_state, load_model_state,
                                     load_optimizer_state)
    from training.run_state import load_tree, save_tree
    acc = _accelerator(mode)
    assert acc.num_processes == WORLD, acc.num_processes
    out = Path(out)
    model, opt, ema = _setup(acc, mode, seed=0)
    assert distributed_kind(acc, model) == ("ddp" if mode == "ddp" else "fsdp"), distributed_kind(acc, model)
    if mode != "ddp":  # really sharded: each process holds part of every parameter (dim 0 split)
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
        assert isinstance(model, FSDPModule) and isinstance(model.blocks[0], FSDPModule), type(model)
        assert all(isinstance(p, DTensor) and p.to_local().numel() < p.numel()
                   for p in model.parameters() if p.shape[0] >= WORLD)
    for step in range(steps):
        _step(acc, model, opt, ema, step)

    def gather(m, o, e) -> dict:
        return {"model": full_model_state(acc, m), "opt": full_optimizer_state(acc, m, o), "ema": e.state_dict()}

    def save(stem: str, tree) -> None:
        if acc.is_main_process:
            save_tree(out, stem, tree)
        acc.wait_for_everyone()

    save("gathered", gather(model, opt, ema))
    state = load_tree(out, "gathered")  # every process reads the full state, as the trainer's resume does
    fresh, fresh_opt, fresh_ema = _setup(acc, mode, seed=7)
    load_model_state(acc, fresh, state["model"])
    load_optimizer_state(acc, fresh, fresh_opt, state["opt"])
    fresh_ema.load_state_dict(state["ema"])
    save("roundtrip", gather(fresh, fresh_opt, fresh_ema))
    if mode != "ddp":
        only0, only0_opt, only0_ema = _setup(acc, mode, seed=8)
        mine = state if acc.is_main_process else {"model": {}, "opt": {}}
        load_model_state(acc, only0, mine["model"], from_rank0=True)
        load_optimizer_state(acc, only0, only0_opt, mine["opt"], from_rank0=True)
        only0_ema.load_state_dict(state["ema"])
        save("roundtrip0", gather(only0, only0_opt, only0_ema))
    _step(acc, model, opt, ema, steps)
    _step(acc, fresh, fresh_opt, fresh_ema, steps)
    save("next", {"orig": gather(model, opt, ema), "loaded": gather(fresh, fresh_opt, fresh_ema)})
    acc.end_training()
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    out_dir, port_arg, mode_arg, steps_arg = sys.argv[1:5]
    if "LOCAL_RANK" in os.environ:  # started by accelerate launch / torchrun
        _worker(int(os.environ["RANK"]), out_dir, 0, mode_arg, int(steps_arg))
    else:
        mp.spawn(_worker, args=(out_dir, int(port_arg), mode_arg, int(steps_arg)), nprocs=WORLD)

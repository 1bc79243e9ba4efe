"""Full (unsharded) model and optimizer state under plain, DDP and FSDP training, in one format.

Checkpoints stay in the pickle-free format of training/run_state.py (JSON skeleton + safetensors) instead of
`accelerator.save_state`, which in accelerate 1.15 pickles the RNG states (random_states_N.pkl) and loads
objects registered with `register_for_checkpointing` through `torch.load(weights_only=False)`: a crafted
checkpoint could run code. So the distributed state is gathered to / scattered from the plain torch format:

- model: `{name: tensor}` exactly as `unwrap_model(model).state_dict()` of the unsharded model;
- optimizer: `torch.optim.Optimizer.state_dict()` format, keyed by parameter *index*: index i is the i-th
  parameter in the concatenation of `optimizer.param_groups[g]["params"]`, g = 0, 1, ... That is the order
  in which the trainer builds the groups from `model.named_parameters()` (training/optim.py), and FSDP keeps
  it (accelerate swaps each parameter for its shard in place), so the i-th entry of the FQN-keyed list that
  `get_optimizer_state_dict` returns is the i-th parameter of the plain optimizer.

A checkpoint written under FSDP therefore resumes without FSDP and the other way round. Plain and DDP runs
return `state_dict()` itself (bitwise what the trainer stored before). Every function here is collective
under FSDP: every process must call it, in the same order.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

# Module names that wrappers insert into parameter names; a checkpoint's names never contain them.
WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
DEEPSPEED_ERROR = ("DeepSpeed is not supported by this checkpoint format: its engine shards the optimizer and "
                   "only its own pickled save_checkpoint writes it; train with DDP or FSDP instead "
                   "(configs/accelerate/fsdp_1node_8gpu.yaml, README 'From one CPU to N GPUs to N nodes')")


def _is_fsdp_module(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    return isinstance(model, (FSDPModule, FullyShardedDataParallel))


def distributed_kind(accelerator: Accelerator, model: nn.Module | None = None) -> str:
    """"none", "ddp", "fsdp" or "deepspeed". A model sharded by `fully_shard` outside accelerate counts as
    FSDP too: accelerate 1.15 drops its FSDP plugin on CPU (DistributedType.FSDP is set for GPU-like devices
    only), so that is how FSDP runs on CPU (tests/test_dist_state.py)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP or (model is not None and _is_fsdp_module(model)):
        return "fsdp"
    if kind == DistributedType.NO:
        return "none"
    return "ddp"


def check_supported(accelerator: Accelerator, model: nn.Module, from_rank0: bool = False) -> str:
    """distributed_kind, or the one-line error for a setup these checkpoints cannot hold (call it right after
    `accelerator.prepare`, so a DeepSpeed run stops before training rather than at its first checkpoint)."""
    kind = distributed_kind(accelerator, model)
    if from_rank0 and kind == "ddp":
        raise ValueError("from_rank0 loading is for FSDP (which broadcasts the shards); under DDP every process "
                         "must pass the full state (read the checkpoint on every process)")
    if kind == "deepspeed":
        raise NotImplementedError(DEEPSPEED_ERROR)
    if kind == "fsdp" and not getattr(model, "_use_orig_params", True):
        # FSDP1 flat parameters mix decayed and non-decayed weights of one layer, so the two AdamW groups
        # (training/optim.py) cannot be kept, and the index mapping above has no per-parameter entries.
        raise ValueError("FSDP1 needs use_orig_params: set fsdp_use_orig_params: true in the accelerate config, "
                         "or use FSDP2 (fsdp_version: 2, configs/accelerate/fsdp_1node_8gpu.yaml)")
    return kind


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kwargs)


def _clean(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def _param_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The checkpoint name of each optimizer parameter, in index order (see the module docstring)."""
    name_of = {id(p): _clean(name) for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in name_of]
    if missing:
        raise ValueError(f"optimizer parameter {missing[0]} is not a parameter of the model; build the optimizer "
                         f"from the model that is passed (after FSDP sharding, accelerate.prepare swaps them)")
    return [name_of[id(p)] for p in params]


def _raw(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (whose param_groups are the same)."""
    return getattr(optimizer, "optimizer", optimizer)


# ---- model -------------------------------------------------------------------------------------------------
def full_model_state(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU. Under FSDP only the main process gets it ({} elsewhere)."""
    if check_supported(accelerator, model) != "fsdp":
        return accelerator.unwrap_model(model).state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_model_state(accelerator: Accelerator, model: nn.Module, sd: dict[str, torch.Tensor],
                     from_rank0: bool = False) -> None:
    """Inverse of full_model_state. `from_rank0`: only the main process holds `sd` (others pass {}); under
    FSDP it is broadcast. Without it every process passes the full dict (the trainer reads it from disk on
    every process) and each keeps its own shard, with no communication."""
    if check_supported(accelerator, model, from_rank0) != "fsdp":
        accelerator.unwrap_model(model).load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    # a copy: torch writes the local shards into the dict it is given (state_dict.update in torch 2.14)
    set_model_state_dict(model, dict(sd), options=_options(broadcast_from_rank0=from_rank0))


# ---- optimizer ---------------------------------------------------------------------------------------------
def full_optimizer_state(accelerator: Accelerator, model: nn.Module, optimizer) -> dict:
    """`optimizer.state_dict()` of the unsharded run (index-keyed). Under FSDP only the main process gets it."""
    if check_supported(accelerator, model) != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    osd = get_optimizer_state_dict(model, _raw(optimizer), options=_options(cpu_offload=True))
    if not osd or not osd.get("param_groups"):
        return {}
    index_of, groups = {}, []
    for group in osd["param_groups"]:
        for fqn in group["params"]:
            index_of.setdefault(fqn, len(index_of))
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [index_of[fqn] for fqn in group["params"]]})
    state = {index_of[fqn]: value for fqn, value in osd["state"].items()}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_optimizer_state(accelerator: Accelerator, model: nn.Module, optimizer, sd: dict,
                         from_rank0: bool = False) -> None:
    """Inverse of full_optimizer_state (`from_rank0` as in load_model_state)."""
    if check_supported(accelerator, model, from_rank0) != "fsdp":
        optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    raw = _raw(optimizer)
    if from_rank0 and accelerator.process_index != 0:
        fqn_sd = {}
    else:
        fqns = _param_fqns(model, raw)
        n_sd = sum(len(g["params"]) for g in sd["param_groups"])
        if n_sd != len(fqns) or len(sd["param_groups"]) != len(raw.param_groups):
            raise ValueError(f"the optimizer state has {len(sd['param_groups'])} groups / {n_sd} parameters, the "
                             f"optimizer {len(raw.param_groups)} / {len(fqns)}: it belongs to another model or recipe")
        fqn_sd = {"state": {fqns[int(i)]: dict(value) for i, value in sd["state"].items()},
                  "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                    "params": [fqns[int(i)] for i in g["params"]]} for g in sd["param_groups"]]}
    set_optimizer_state_dict(model, raw, fqn_sd, options=_options(broadcast_from_rank0=from_rank0))


# ---- EMA ---------------------------------------------------------------------------------------------------
class ShardedEMA:
    """training.optim.EMA for a model that may be FSDP-sharded: each process keeps the average of its own
    parameter shards only (no communication per step, 1/world of the memory); `state_dict()` gathers the full
    dict (collective) and equals what training.optim.EMA of the unsharded run holds, bitwise: the update is
    the same elementwise lerp on the same values. Buffers are the model's (EMA copies them every step).
    Pass the unwrapped model (`accelerator.unwrap_model(model)`; for FSDP2 that is the sharded module)."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.shadow = [self._local(p).detach().float().clone() for p in model.parameters()]

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor
        return t.to_local() if isinstance(t, DTensor) else t

    @torch.no_grad()
    def update(self, model: nn.Module | None = None, decay: float | None = None) -> None:
        params = list((model or self.model).parameters())
        weight = 1 - (self.decay if decay is None else decay)
        for shadow, p in zip(self.shadow, params, strict=True):
            shadow.lerp_(self._local(p).detach().float(), weight)

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full EMA state in the model's state_dict order, on every process (collective under FSDP)."""
        from torch.distributed.tensor import DTensor
        full = {}
        for (name, p), shadow in zip(self.model.named_parameters(), self.shadow):
            value = shadow.to(p.dtype)
            if isinstance(p, DTensor):
                value = DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape,
                                           stride=p.stride()).full_tensor()
            full[_clean(name)] = value
        return {_clean(k): full.get(_clean(k), self._local(v)).detach().clone()
                for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Every process passes the full dict (as read from the checkpoint); each keeps its own shard."""
        from torch.distributed.tensor import DTensor, distribute_tensor
        names = [_clean(n) for n, _ in self.model.named_parameters()]
        missing = [n for n in names if n not in sd]
        if missing:
            raise ValueError(f"the EMA state lacks {missing[0]!r} (and {len(missing) - 1} more): it belongs to "
                             f"another model")
        for name, p, shadow in zip(names, self.model.parameters(), self.shadow):
            value = sd[name].to(device=shadow.device, dtype=torch.float32)
            if isinstance(p, DTensor):  # src_data_rank=None: slice locally, every process holds the full tensor
                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local()
            shadow.copy_(value)

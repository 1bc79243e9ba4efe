"""Accelerate's FSDP2 on CPU, for tests: accelerate 1.15 sets DistributedType.FSDP for GPU-like devices only
(accelerate/state.py) and on CPU silently drops the FSDP plugin and wraps the model in DDP, while torch 2.14's
`fully_shard` itself runs on CPU over gloo. `force_fsdp2(acc)` switches a built (MULTI_CPU) Accelerator to
FSDP2 with the plugin of configs/accelerate/fsdp_1node_8gpu.yaml, so its `prepare` shards as on GPUs."""
from __future__ import annotations


def force_fsdp2(acc):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    # both shared states: every AcceleratorState() (accelerate builds some inside prepare) re-reads PartialState's
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["AdaLNBlock"])
    return acc

"""training/dist_state.py: the full model / optimizer state gathered under FSDP2 and DDP (2 gloo CPU processes,
tests/dist_scripts/sharded_var.py) against a single-process run of the same steps computed here, the round
trip save -> load -> gather, resuming an FSDP checkpoint without FSDP, the per-shard EMA (ShardedEMA) against
training.optim.EMA, and the shipped accelerate configs.

Reference arithmetic: each of the 2 processes takes its half of every batch of 8, and FSDP / DDP average the
two gradients (gloo: a sum of two values and a division by 2, both exact in order). The reference here does
the same (per-half backward, grads (g0 + g1) / 2), so the gathered state must be *bitwise* equal to it. Against
a plain full-batch step (one mean over 8 samples, a different summation order) the weights differ by float32
rounding only: max |diff| 2.5e-7 measured after 3 AdamW steps at lr 1e-3, tested at atol 1e-5 (each step moves a
weight by at most ~lr, so a real gather/scatter bug, a wrong shard or a swapped parameter, is off by >= 1e-4).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from tests.dist_scripts.sharded_var import BATCH, EMA_DECAY, WORLD, batch, loss_of, make_model, make_optimizer
from training.dist_state import (ShardedEMA, check_supported, distributed_kind, full_model_state,
                                 full_optimizer_state, load_model_state, load_optimizer_state)
from training.optim import EMA
from training.run_state import load_tree

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
CONFIGS = REPO / "configs" / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, mode: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if mode == "ddp":  # through the shipped config, as a user would start 2 CPU processes
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp_cpu_2proc.yaml"),
               "--main_process_port", str(_free_port()), "-m", "tests.dist_scripts.sharded_var", str(out), "0", mode,
               str(STEPS)]
    else:
        cmd = [sys.executable, "-m", "tests.dist_scripts.sharded_var", str(out), str(_free_port()), mode, str(STEPS)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


# accelerate's own FSDP2 prepare (the trainer's path) runs by default (~23 s here); torch's bare fully_shard and
# DDP through configs/accelerate/ddp_cpu_2proc.yaml (~20-35 s each) are in the slow suite
@pytest.fixture(scope="module", params=[pytest.param("fsdp2", marks=pytest.mark.slow), "accelerate_fsdp2",
                                        pytest.param("ddp", marks=pytest.mark.slow)])
def run_dir(request, tmp_path_factory):
    return _launch(tmp_path_factory.mktemp(request.param), request.param), request.param


def _step(model, opt, ema, step: int, halves: bool) -> None:
    labels_B, x_tf_BlC, targets_BL = batch(step, model)
    opt.zero_grad(set_to_none=True)
    if not halves:
        loss_of(model, labels_B, x_tf_BlC, targets_BL).backward()
    else:
        half, grads = BATCH // WORLD, []
        for r in range(WORLD):
            part = slice(r * half, (r + 1) * half)
            model.zero_grad(set_to_none=True)
            loss_of(model, labels_B[part], x_tf_BlC[part], targets_BL[part]).backward()
            grads.append([p.grad for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / WORLD
    opt.step()
    ema.update(model)


def _reference(steps: int, halves: bool = True):
    torch.manual_seed(0)
    model = make_model(0)
    opt, ema = make_optimizer(model), EMA(model, EMA_DECAY)
    for step in range(steps):
        _step(model, opt, ema, step, halves)
    return model, opt, ema


def assert_same(a, b, where: str = "") -> None:
    """Bitwise equality of nested state (tensors: dtype, shape and every bit; dict keys and order of lists)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    model, opt, ema = _reference(STEPS)
    return {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}


def test_gathered_state_equals_single_process_run(run_dir, reference):
    out, mode = run_dir
    gathered = load_tree(out, "gathered")
    # the plain torch formats: model keys in state_dict order, optimizer keyed by parameter index
    assert list(gathered["model"]) == list(reference["model"])
    assert sorted(gathered["opt"]["state"]) == list(range(sum(len(g["params"]) for g in reference["opt"]["param_groups"])))
    assert_same(gathered, reference, mode)
    assert not torch.equal(gathered["ema"]["head.weight"], gathered["model"]["head.weight"])  # a real average
    full_batch, _, _ = _reference(STEPS, halves=False)
    for name, value in full_batch.state_dict().items():
        torch.testing.assert_close(gathered["model"][name], value, atol=1e-5, rtol=0, msg=name)


def test_save_load_gather_round_trip_is_bitwise(run_dir):
    out, mode = run_dir
    gathered = load_tree(out, "gathered")
    assert_same(load_tree(out, "roundtrip"), gathered, "roundtrip")
    if mode != "ddp":
        assert_same(load_tree(out, "roundtrip0"), gathered, "roundtrip0 (from_rank0)")
    # the reloaded optimizer state is live: one more step from it equals one more step of the original run
    nxt = load_tree(out, "next")
    assert_same(nxt["loaded"], nxt["orig"], "next step")


def test_sharded_checkpoint_resumes_in_one_process(run_dir):
    """The gathered state of a 2-process run, loaded into a plain model + AdamW here, takes the same next step."""
    from accelerate import Accelerator
    out, mode = run_dir
    gathered, nxt = load_tree(out, "gathered"), load_tree(out, "next")
    acc = Accelerator(cpu=True)
    model = make_model(5)
    opt, ema = make_optimizer(model), EMA(model, EMA_DECAY)
    assert distributed_kind(acc, model) == "none"
    load_model_state(acc, model, gathered["model"])
    load_optimizer_state(acc, model, opt, gathered["opt"])
    ema.load_state_dict(gathered["ema"])
    _step(model, opt, ema, STEPS, halves=True)
    assert_same({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}, nxt["orig"],
                f"{mode} -> one process")


def test_single_process_state_is_state_dict():
    """Without distribution the gathered state is state_dict() itself, what the trainer stored before."""
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    model, opt, _ = _reference(1)
    pmodel, popt = acc.prepare(model, opt)
    msd, osd = full_model_state(acc, pmodel), full_optimizer_state(acc, pmodel, popt)
    assert msd.keys() == model.state_dict().keys()
    assert all(msd[k].data_ptr() == v.data_ptr() for k, v in model.state_dict().items())  # the very tensors
    assert_same(osd, opt.state_dict())
    sharded_ema, ema = ShardedEMA(model, 0.5), EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    sharded_ema.update()
    ema.update(model)
    assert_same(sharded_ema.state_dict(), ema.state_dict())
    fresh = make_model(3)
    fresh_opt = make_optimizer(fresh)
    load_model_state(acc, fresh, msd)
    load_optimizer_state(acc, fresh, fresh_opt, osd)
    assert_same({"m": fresh.state_dict(), "o": fresh_opt.state_dict()}, {"m": msd, "o": osd})


def test_deepspeed_and_flat_fsdp1_are_refused_in_one_line():
    model = torch.nn.Linear(2, 2)
    ds = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    assert distributed_kind(ds, model) == "deepspeed"
    for call in (lambda: check_supported(ds, model), lambda: full_model_state(ds, model),
                 lambda: load_model_state(ds, model, {}),
                 lambda: full_optimizer_state(ds, model, None), lambda: load_optimizer_state(ds, model, None, {})):
        with pytest.raises(NotImplementedError, match=r"^DeepSpeed is not supported[^\n]*fsdp_1node_8gpu\.yaml[^\n]*$"):
            call()
    model._use_orig_params = False  # what FSDP1 sets without use_orig_params
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(ValueError, match=r"^FSDP1 needs use_orig_params: set fsdp_use_orig_params: true"):
        full_optimizer_state(fsdp, model, None)
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    with pytest.raises(ValueError, match="from_rank0 loading is for FSDP"):
        load_model_state(ddp, torch.nn.Linear(2, 2), {}, from_rank0=True)


def test_accelerate_configs_are_read_as_documented(monkeypatch):
    """Each shipped YAML through accelerate's own launcher parsing; the FSDP one down to the plugin it builds."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from tests.conftest import make_tiny_pair
    expect = {"ddp_cpu_2proc.yaml": (DistributedType.MULTI_GPU, 1, 2), "ddp_1node_8gpu.yaml": (DistributedType.MULTI_GPU, 1, 8),
              "ddp_2nodes_16gpu.yaml": (DistributedType.MULTI_GPU, 2, 16), "fsdp_1node_8gpu.yaml": (DistributedType.FSDP, 1, 8),
              "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 1, 8)}
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(expect)
    for name, (kind, machines, processes) in expect.items():
        cfg = load_config_from_file(str(CONFIGS / name))
        assert (cfg.distributed_type, cfg.num_machines, cfg.num_processes) == (kind, machines, processes), name
    assert load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config["zero_stage"] == 2
    # 2 CPU processes need the multi-GPU launcher (torchrun): with use_cpu accelerate starts a single process
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(CONFIGS / "ddp_cpu_2proc.yaml"), "x.py"]))
    assert args.multi_gpu and not args.use_cpu and args.num_processes == 2
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(CONFIGS / "fsdp_1node_8gpu.yaml"), "--main_process_port", str(_free_port()), "x.py"]))
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    block_cls = type(make_tiny_pair()[0].blocks[0]).__name__
    assert plugin.transformer_cls_names_to_wrap == [block_cls]

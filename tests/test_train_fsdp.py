"""train.py under accelerate's FSDP2 (two gloo processes on CPU, see tests/dist_scripts/force_fsdp.py): the
sharded run equals one process (fp32 summation order only), and a sharded run killed after its step-2
checkpoint and resumed equals the uninterrupted sharded run bitwise (EMA and condition dropout on)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import train
from tests.test_training import REPO, params, read_log, tiny_tokenizer, write_var_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # four 2-process launches, 30-60 s each


def fsdp_train(cfg, out, *extra, stop_at: int | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "STOP_AT_STEP": str(stop_at or "")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tests.dist_scripts.train_fsdp_cpu", "var",
           "--config", str(cfg), "--set", f"train.out_dir={out}", *extra]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == (0 if stop_at is None else 1), done.stderr[-3000:]


def test_fsdp_equals_one_process_and_resumes_bitwise(tmp_path, tiny_tokenizer):
    # no condition dropout for the comparison with one process: each process draws its own dropout mask
    cfg = write_var_config(tmp_path, tiny_tokenizer, steps=4, ckpt_every=2, ema=0.9)
    fsdp_train(cfg, tmp_path / "fsdp")
    train.main(["var", "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'one'}"])
    dist = json.loads((tmp_path / "fsdp" / "config.json").read_text())["distributed"]
    assert dist["num_processes"] == 2
    one, sharded = params(tmp_path / "one" / "var.safetensors"), params(tmp_path / "fsdp" / "var.safetensors")
    assert one.keys() == sharded.keys()
    for k in one:
        torch.testing.assert_close(one[k], sharded[k], rtol=0, atol=1e-6, msg=k)

    # with condition dropout: 4 steps in one go == 2 steps (checkpoint at 2), killed in step 4 and resumed, under FSDP
    (tmp_path / "drop").mkdir()
    dropping = write_var_config(tmp_path / "drop", tiny_tokenizer, steps=4, ckpt_every=2, cond_drop=0.3, ema=0.9)
    fsdp_train(dropping, tmp_path / "full")
    sharded = params(tmp_path / "full" / "var.safetensors")
    fsdp_train(dropping, tmp_path / "cut", stop_at=3)  # killed in step 4, after the step-2 checkpoint
    fsdp_train(dropping, tmp_path / "cut", "--resume")
    resumed = params(tmp_path / "cut" / "var.safetensors")
    for k in sharded:
        assert torch.equal(sharded[k], resumed[k]), k
    timed = {"wall_s", "step_time_s", "data_time_s", "images_per_s", "tokens_per_s", "rss_mb", "cuda_max_alloc_mb"}
    strip = [[{k: v for k, v in r.items() if k not in timed} for r in read_log(d)] for d in (tmp_path / "full", tmp_path / "cut")]
    assert strip[0] == strip[1]

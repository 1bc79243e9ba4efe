"""`train.py` under accelerate's FSDP2 on CPU (tests/dist_scripts/force_fsdp.py), for trainer tests:

    CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \\
        -m tests.dist_scripts.train_fsdp_cpu var --config ... [--resume]
"""
from __future__ import annotations

import os
import sys

import train
import training.trainer
from tests.dist_scripts.force_fsdp import force_fsdp2

_make = training.trainer.make_accelerator


def make_fsdp_accelerator(cfg):
    return force_fsdp2(_make(cfg))


class Killed(SystemExit):
    """Raised instead of step STOP_AT_STEP + 1 (the env var): a run killed mid-way, for resume tests."""


def kill_at(step: int):
    original = training.trainer.Trainer._train_step

    def dying_step(self, *args):
        if self.step == step:
            raise Killed(3)
        return original(self, *args)

    training.trainer.Trainer._train_step = dying_step


if __name__ == "__main__":
    training.trainer.make_accelerator = make_fsdp_accelerator  # train.main imports it at call time
    if os.environ.get("STOP_AT_STEP"):
        kill_at(int(os.environ["STOP_AT_STEP"]))
    train.main(sys.argv[1:])

"""Training-pipeline benchmark, the scaling section: the same tiny VAR run (procedural 32 px data, token cache)
trained by `train.py var` as 1 process and as 2 processes under `accelerate launch` (DDP on CPU), rounds
alternating, images/s read from each run's metrics.jsonl. benchmarks/training_pipeline.py runs it with the data
and MFU sections and writes the results."""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.measure import median_iqr, usable_cpus
from benchmarks.training_report import SCALING_TARGET
from tokenizers import VQVAE, VQVAEConfig
from training.checkpoint import save_model

REPO = Path(__file__).resolve().parents[1]
# the shipped Fashion-MNIST drafter (configs/fmnist_var_drafter.toml) on its tokenizer's scales and vocabulary
TINY_SHAPE = dict(depth=6, embed_dim=128, num_heads=4, num_classes=10, patch_nums=(1, 2, 3, 4, 6, 8), vocab_size=512,
                  z_channels=16, drop_path_rate=0.0, cond_drop_rate=0.1)
TINY_TOKENIZER = dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                      patch_nums=(1, 2, 3, 4, 6, 8))

SCALING_TOML = """
[var]
depth = {depth}
embed_dim = {embed_dim}
num_heads = {num_heads}
drop_path_rate = 0.0
cond_drop_rate = 0.1
[data]
kind = "procedural"
image_size = 32
num_samples = {num_samples}
num_classes = 10
[optim]
batch_size = {batch}
warmup_steps = 2
[train]
steps = {steps}
tokenizer = "{tokenizer}"
token_cache = "{cache}"
tokens = "cache"
log_every = 1
sample_every = 1000000
ckpt_every = 1000000
"""


def log_throughput(records: list[dict], global_batch: int, warmup_steps: int) -> dict:
    """Images/s over the steps after the first `warmup_steps` (wall_s of step k = end of step k), and the
    median step time; records without wall_s (validation lines) are ignored."""
    rows = sorted((r for r in records if "wall_s" in r and "step" in r), key=lambda r: r["step"])
    timed = [r for r in rows if r["step"] >= max(warmup_steps, 1)]
    if len(timed) < 2 or timed[-1]["wall_s"] <= timed[0]["wall_s"]:
        raise ValueError(f"metrics.jsonl has {len(rows)} logged steps, too few after {warmup_steps} warm-up steps; "
                         f"raise --steps (log_every must be 1)")
    steps = timed[-1]["step"] - timed[0]["step"]
    seconds = timed[-1]["wall_s"] - timed[0]["wall_s"]
    step_s = [b["wall_s"] - a["wall_s"] for a, b in zip(timed, timed[1:]) if b["step"] == a["step"] + 1]
    out = {"timed_steps": steps, "seconds": seconds, "images_per_s": steps * global_batch / seconds,
           "step_s_median": statistics.median(step_s) if step_s else seconds / steps}
    own = [r["images_per_s"] for r in timed[1:] if "images_per_s" in r]  # the trainer's meter, as a cross-check
    if own:
        out["trainer_images_per_s_median"] = statistics.median(own)
    return out


ACCELERATE_CPU = REPO / "configs" / "accelerate" / "ddp_cpu_2proc.yaml"


def free_port() -> int:
    """A port nobody listens on now: a fixed rendezvous port collides with other launches on the machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scaling_command(processes: int, config: Path, out_dir: Path, threads: int, port: int | str = 29500) -> list[str]:
    train = ["train.py", "var", "--config", str(config), "--set", f"train.out_dir={out_dir}",
             "--set", f"train.num_threads={threads}"]
    if processes == 1:
        return [sys.executable, *train]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if ACCELERATE_CPU.is_file() and processes == 2:
        launch += ["--config_file", str(ACCELERATE_CPU.relative_to(REPO))]
    else:
        launch += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
    return [*launch, "--main_process_port", str(port), "--dynamo_backend", "no", *train]


def run_training(processes: int, threads: int, config: Path, out_dir: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    cmd = scaling_command(processes, config, out_dir, threads, free_port())
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.run_timeout)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{processes}-process training failed (exit {done.returncode}): {tail}")
    dist = json.loads((out_dir / "config.json").read_text())["distributed"]
    if dist["num_processes"] != processes:
        raise RuntimeError(f"asked for {processes} processes, the run had {dist['num_processes']}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = log_throughput(records, args.global_batch, args.warmup_steps)
    return {**out, "process_wall_s": time.perf_counter() - start, "torch_threads": dist.get("torch_threads"),
            "backend": dist.get("backend")}


def bench_scaling(args, tmp: Path) -> dict:
    torch.manual_seed(args.seed)
    tokenizer = save_model(tmp / "tokenizer.safetensors", VQVAE(VQVAEConfig(**TINY_TOKENIZER)))
    config = tmp / "scaling.toml"
    config.write_text(SCALING_TOML.format(depth=TINY_SHAPE["depth"], embed_dim=TINY_SHAPE["embed_dim"],
                                          num_heads=TINY_SHAPE["num_heads"], num_samples=args.num_samples,
                                          batch=args.global_batch, steps=args.steps, tokenizer=tokenizer,
                                          cache=tmp / "tokens.safetensors"))
    T = args.threads_per_process
    setups = [("1 process", 1, T), ("2 processes", 2, T)] + ([("1 process, 2x threads", 1, 2 * T)] if args.same_cores else [])
    rounds = {label: [] for label, _, _ in setups}
    for r in range(args.scaling_repeats):
        for label, processes, threads in setups if r % 2 == 0 else setups[::-1]:
            rounds[label].append(run_training(processes, threads, config, tmp / f"run_{r}_{processes}_{threads}", args))
            print(f"scaling: {label} x {threads} thread(s), round {r}: {rounds[label][-1]['images_per_s']:.1f} images/s",
                  flush=True)
    base = rounds["1 process"]
    rows = []
    for label, processes, threads in setups:
        runs = rounds[label]
        rows.append({"setup": label, "processes": processes, "threads_per_process": threads,
                     "torch_threads": runs[0]["torch_threads"], "backend": runs[0]["backend"],
                     "images_per_s": median_iqr([x["images_per_s"] for x in runs]),
                     "step_s": median_iqr([x["step_s_median"] for x in runs]),
                     "trainer_images_per_s": [x.get("trainer_images_per_s_median") for x in runs],
                     "vs_1_process": median_iqr([x["images_per_s"] / b["images_per_s"] for x, b in zip(runs, base)]),
                     "command": f"CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS={threads} " + " ".join(
                         "python" if c == sys.executable else c
                         for c in scaling_command(processes, Path("CONFIG"), Path("OUT"), threads, "FREE_PORT"))})
    return {"model": {k: TINY_SHAPE[k] for k in ("depth", "embed_dim", "num_heads")}, "image_size": 32,
            "global_batch": args.global_batch, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "num_samples": args.num_samples, "tokens": "cache", "rows": rows, "target_scaling": SCALING_TARGET,
            "usable_cpus": usable_cpus()}

"""Distilled-decoding dataset (spec accelerators.md 4.3): (label, noise, tokens) triples made by running the
teacher with the per-token flow map as its token-drawing rule (the `flow` sampler, which keeps its noise).

  python -m samplers.dd.data --config configs/fmnist_dd.toml [--set dd.num_samples=512]
  accelerate launch --num_processes 4 -m samplers.dd.data --config ...     # shards spread over processes

Layout of `dd.data_dir`:
  manifest.json     generation settings, teacher/tokenizer fingerprints, shapes (a resumed run must match)
  shard_00000.safetensors ...   labels (n,), index (n,), noise (n, L, Cvae) fp32, tokens (n, L) int32
  generation.jsonl  one line per written shard
Sample i has label i mod num_classes (class-balanced) and noise from a generator seeded by hash(seed, i);
shard j always holds samples [j*S, (j+1)*S) made as one batch, so the shards are the same whatever the
number of processes and however often the run was interrupted (existing shards are skipped; shards are
written atomically, so a crash never leaves a half-written one).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from samplers.dd.flow_map import FlowSampler
from training.atomic import atomic_write, atomic_write_json
from training.checkpoint import load_any
from training.errors import make_parser, run_cli
from var.config import from_dict, load_toml

MANIFEST_FORMAT = "dd-dataset"
MANIFEST_VERSION = 1


@dataclass
class DDConfig:
    """The [dd] table: teacher, dataset generation (flow-mapped teacher rollouts) and the student schedule."""
    teacher: str = ""  # VAR checkpoint being distilled (ours .safetensors or official .pth)
    tokenizer: str = ""  # its tokenizer
    data_dir: str = "runs/dd_data"
    num_samples: int = 4096
    shard_size: int = 64  # samples per shard = generation batch
    seed: int = 0
    cfg: float = 1.5  # the teacher's processed distribution: guidance, top-k, top-p, temperature (spec 4.10)
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    flow_steps: int = 128  # ODE solver steps of the flow map
    t2: int = 3  # student: second timestep (scales < t2 given as data at the second step)
    loss_split: int = 3  # student: scales < loss_split via the classifier head (CE), the rest via the continuous head
    cont_weight: float = 1.0  # weight of the continuous head's regression loss (MSE / codebook variance)
    # student training: the timesteps t each row is trained at (uniform over the list; empty: DD1's [0, t2]).
    # A multi-step schedule "0,t1,...,tn" steps at every t_i, so its student should be trained at each of them.
    train_t: list[int] = field(default_factory=list)
    val_samples: int = 0  # the last val_samples pairs are held out: per-scale accuracy at every train_t (val_every)

    def __post_init__(self) -> None:
        problems = []
        self.train_t = [int(t) for t in self.train_t]
        if self.train_t and (self.train_t[0] != 0 or any(b <= a for a, b in zip(self.train_t, self.train_t[1:]))):
            problems.append(f"train_t must start at 0 and increase strictly (e.g. [0, 3]), got {self.train_t}")
        if not 0 <= self.val_samples < self.num_samples:
            problems.append(f"val_samples must be in [0, num_samples), got {self.val_samples}")
        if self.num_samples < 1 or self.shard_size < 1:
            problems.append(f"num_samples and shard_size must be >= 1, got {self.num_samples}, {self.shard_size}")
        if self.flow_steps < 1:
            problems.append(f"flow_steps must be >= 1, got {self.flow_steps}")
        if self.t2 < 1 or self.loss_split < 0 or self.cont_weight < 0:
            problems.append(f"need t2 >= 1, loss_split >= 0, cont_weight >= 0; got {self.t2}, {self.loss_split}, {self.cont_weight}")
        if problems:
            raise ValueError("invalid [dd] settings: " + "; ".join(problems))

    @property
    def timesteps(self) -> list[int]:
        """The student's training timesteps: train_t, or DD1's [0, t2]."""
        return self.train_t or [0, self.t2]

    def generation_settings(self) -> dict:
        keys = ("num_samples", "shard_size", "seed", "cfg", "top_k", "top_p", "temperature", "flow_steps")
        return {k: getattr(self, k) for k in keys}


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample `index`: a hash, so neighbouring indices get unrelated generator streams."""
    return int.from_bytes(hashlib.sha256(f"dd:{seed}:{index}".encode()).digest()[:8], "little") >> 1


def shard_range(shard: int, cfg: DDConfig) -> tuple[int, int]:
    return shard * cfg.shard_size, min((shard + 1) * cfg.shard_size, cfg.num_samples)


def num_shards(cfg: DDConfig) -> int:
    return -(-cfg.num_samples // cfg.shard_size)


def shard_path(data_dir: str | Path, shard: int) -> Path:
    return Path(data_dir) / f"shard_{shard:05d}.safetensors"


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, bytes): which weights made the data, file or not."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_manifest(cfg: DDConfig, teacher, vae) -> dict:
    return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "settings": cfg.generation_settings(),
            "teacher_fingerprint": model_fingerprint(teacher), "tokenizer_fingerprint": model_fingerprint(vae),
            "teacher": cfg.teacher, "tokenizer": cfg.tokenizer, "num_classes": teacher.num_classes,
            "patch_nums": list(teacher.patch_nums), "z_channels": teacher.config.z_channels,
            "vocab_size": teacher.config.vocab_size, "num_shards": num_shards(cfg)}


def check_manifest(data_dir: Path, manifest: dict) -> None:
    path = data_dir / "manifest.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    keys = ("format_version", "settings", "teacher_fingerprint", "tokenizer_fingerprint", "patch_nums")
    differ = [k for k in keys if old.get(k) != manifest[k]]
    if differ:
        raise ValueError(f"{data_dir} holds a DD dataset made with other settings or models (differs in {differ}); "
                         f"resuming would mix two datasets. Choose another dd.data_dir or delete that folder.")


def append_jsonl(path: Path, record: dict) -> None:
    """One write per line on an O_APPEND descriptor: lines of concurrent processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


@torch.no_grad()
def generate_shard(sampler, cfg: DDConfig, shard: int) -> dict[str, torch.Tensor]:
    """Roll the teacher out with flow-mapped tokens for the samples of one shard, as one batch."""
    start, end = shard_range(shard, cfg)
    index = torch.arange(start, end)
    labels = (index % sampler.var.num_classes).to(sampler.device)
    out = sampler.sample(labels, seed=[sample_seed(cfg.seed, i) for i in index.tolist()], cfg=cfg.cfg,
                         top_k=cfg.top_k, top_p=cfg.top_p, temperature=cfg.temperature, decode=False)
    noise = torch.cat(sampler.last_noise, dim=1)
    return {"labels": labels.cpu().long(), "index": index, "noise": noise.float().cpu().contiguous(),
            "tokens": torch.cat(out.tokens, dim=1).to(torch.int32).cpu().contiguous()}


def generate(cfg: DDConfig, teacher, vae, *, process_index: int = 0, num_processes: int = 1,
             stop_after: int | None = None, show_progress: bool = True, barrier=None) -> list[int]:
    """Write this process's missing shards (shard j belongs to process j mod num_processes).
    stop_after: write at most that many shards (a time-boxed run; rerun to continue). barrier: called after
    the manifest is written (accelerator.wait_for_everyone). Returns the shards written by this call."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} outside [0, {num_processes})")
    data_dir = Path(cfg.data_dir)
    manifest = build_manifest(cfg, teacher, vae)
    if process_index == 0:
        check_manifest(data_dir, manifest)
        atomic_write_json(data_dir / "manifest.json", manifest)
    if barrier is not None:
        barrier()
    check_manifest(data_dir, manifest)
    sampler = FlowSampler(teacher.eval(), vae.eval(), flow_steps=cfg.flow_steps)
    mine = [j for j in range(process_index, num_shards(cfg), num_processes) if not shard_path(data_dir, j).exists()]
    if stop_after is not None:
        mine = mine[:stop_after]
    on_cuda = sampler.device.type == "cuda"
    written = []
    for j in tqdm(mine, desc=f"dd data (process {process_index})", disable=not show_progress):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            tensors = generate_shard(sampler, cfg, j)
        meta = {"format": MANIFEST_FORMAT, "shard": str(j), "teacher_fingerprint": manifest["teacher_fingerprint"]}
        atomic_write(shard_path(data_dir, j), lambda tmp: save_file(tensors, tmp, metadata=meta))
        written.append(j)
        append_jsonl(data_dir / "generation.jsonl",
                     {"shard": j, "samples": int(tensors["labels"].numel()), "process": process_index,
                      "wall_s": round(time.perf_counter() - t0, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return written


class DDDataset:
    """All shards of a finished dataset, in memory: labels (N,), noise (N, L, Cvae), tokens (N, L)."""

    def __init__(self, data_dir: str | Path):
        data_dir = Path(data_dir)
        path = data_dir / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"{data_dir} holds no DD dataset (no manifest.json); make one with "
                                    f"`python -m samplers.dd.data --config <your config>`")
        self.manifest = json.loads(path.read_text())
        n = self.manifest["num_shards"]
        missing = [j for j in range(n) if not shard_path(data_dir, j).exists()]
        if missing:
            raise FileNotFoundError(f"{data_dir}: {len(missing)} of {n} shards are missing (first: {missing[:5]}); the "
                                    f"generation was interrupted: rerun `python -m samplers.dd.data` with the same config "
                                    f"to finish it (existing shards are kept)")
        parts: dict[str, list[torch.Tensor]] = {"labels": [], "noise": [], "tokens": [], "index": []}
        for j in range(n):
            with safe_open(str(shard_path(data_dir, j)), framework="pt") as fh:
                for k in parts:
                    parts[k].append(fh.get_tensor(k))
        self.labels, self.noise = torch.cat(parts["labels"]), torch.cat(parts["noise"])
        self.tokens = torch.cat(parts["tokens"]).long()
        if not torch.equal(torch.cat(parts["index"]), torch.arange(self.labels.numel())):
            raise ValueError(f"{data_dir}: shards do not hold consecutive sample indices; the folder is corrupt")

    def __len__(self) -> int:
        return self.labels.numel()

    def fetch(self, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.labels[idx].to(device), self.noise[idx].to(device), self.tokens[idx].to(device)


def load_dd_config(path: str, overrides: list[str]) -> DDConfig:
    raw = load_toml(path)
    table = dict(raw.get("dd", {}))
    for text in overrides:
        key, _, value = text.partition("=")
        if not key.startswith("dd.") or not value:
            raise ValueError(f"--set expects dd.key=value (e.g. dd.num_samples=512), got {text!r}")
        try:
            table[key[3:]] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            table[key[3:]] = value
    return from_dict(DDConfig, table, f"{path}[dd]")


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(description=__doc__)
    parser.add_argument("--config", required=True, help="TOML file with a [dd] table (e.g. configs/fmnist_dd.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="dd.KEY=VALUE", help="override a [dd] value")
    parser.add_argument("--stop-after", type=int, default=None, help="write at most N shards per process, then stop")
    parser.add_argument("--num-threads", type=int, default=0, help="CPU threads for torch (0: default)")
    args = parser.parse_args(argv)
    cfg = load_dd_config(args.config, args.set)
    if not cfg.teacher or not cfg.tokenizer:
        raise ValueError(f"{args.config}[dd]: set teacher = <VAR checkpoint> and tokenizer = <its tokenizer>")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    teacher = load_any(cfg.teacher, "var", device=acc.device)
    vae = load_any(cfg.tokenizer, "vqvae", device=acc.device, patch_nums=teacher.patch_nums)
    written = generate(cfg, teacher, vae, process_index=acc.process_index, num_processes=acc.num_processes,
                       stop_after=args.stop_after, show_progress=acc.is_local_main_process, barrier=acc.wait_for_everyone)
    acc.wait_for_everyone()
    if acc.is_main_process:
        done = sum(shard_path(cfg.data_dir, j).exists() for j in range(num_shards(cfg)))
        print(json.dumps({"data_dir": cfg.data_dir, "shards_done": done, "shards_total": num_shards(cfg),
                          "written_by_main": len(written), "config": asdict(cfg)}))


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Score DD students on the held-out pairs of a dataset (its last --val-samples pairs, as `train.py dd` holds
them out with dd.val_samples): per-scale token accuracy, CE and code-vector MSE at t = 0 and t = t2, the numbers
the job logs as val_*. Comparing two stages on the same unseen pairs is how to tell whether a further stage helped.

  python -m samplers.dd.heldout --data runs/fmnist64_dd_data_v5 --val-samples 256 \
      --tokenizer checkpoints/fmnist64/tokenizer.safetensors \
      --student stage3=runs/fmnist64_dd_student_v5/dd_student.safetensors \
      --student stage4=runs/fmnist64_dd_student_v6/dd_student.safetensors \
      --out checkpoints/fmnist64/logs/dd_student4_heldout.json

Every student must have been distilled from the teacher that made the dataset (checked by fingerprint).
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone

import torch

from samplers.dd.data import DDDataset, model_fingerprint
from samplers.dd.job import check_student_file, evaluate_pairs
from training.atomic import atomic_write_json, file_sha256
from training.checkpoint import load_any, load_model
from training.errors import make_parser, run_cli


class HeldOutTail:
    """The last `count` pairs of a dataset, re-indexed from 0 (the fetch interface evaluate_pairs reads)."""

    def __init__(self, data: DDDataset, count: int):
        if not 0 < count <= len(data):
            raise ValueError(f"--val-samples {count} must be in [1, {len(data)}] (the dataset holds {len(data)} pairs)")
        self.data, self.offset, self.count = data, len(data) - count, count

    def __len__(self) -> int:
        return self.count

    def fetch(self, indices: list[int], device):
        return self.data.fetch([self.offset + i for i in indices], device)


def parse_student(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--student {text!r}: expected NAME=PATH, e.g. stage4=runs/dd/dd_student.safetensors")
    return name, path


def score(data_dir: str, tokenizer: str, students: list[tuple[str, str]], val_samples: int,
          batch_size: int = 256, device: str = "cpu") -> dict:
    data = DDDataset(data_dir)
    tail = HeldOutTail(data, val_samples)
    vae = load_any(tokenizer, "vqvae", device=device)
    if model_fingerprint(vae) != data.manifest["tokenizer_fingerprint"]:
        raise ValueError(f"--tokenizer {tokenizer} is not the tokenizer that made {data_dir}; pass that one")
    codebook_VC = vae.quantize.embedding.weight.detach()
    for name, path in students:
        check_student_file(path, data.manifest["teacher_fingerprint"], f"--student {name}", f"those of {data_dir}",
                           "pass a dd_student", "score it on pairs drawn from its own teacher")
    scores = {name: evaluate_pairs(load_model(path, "dd_student").to(device), codebook_VC, tail, batch_size)
              for name, path in students}
    return {"data": data_dir, "held_out": f"pairs {tail.offset}..{len(data) - 1} of {len(data)}",
            "students": {name: {"path": path, "sha256": file_sha256(path)} for name, path in students},
            "written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "scores": scores}


def finest_accuracy(metrics: dict) -> float:
    """acc_s{K-1}: the finest scale is supervised at every timestep."""
    return metrics[max((k for k in metrics if k.startswith("acc_s")), key=lambda k: int(k[len("acc_s"):]))]


def main(argv=None) -> None:
    p = make_parser(description=__doc__)
    p.add_argument("--data", required=True, help="a finished DD dataset folder (python -m samplers.dd.data)")
    p.add_argument("--val-samples", type=int, required=True, help="score the dataset's last N pairs")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the dataset was made with")
    p.add_argument("--student", action="append", required=True, help="NAME=PATH of a dd_student (repeatable)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="", help="write the scores here as JSON (atomically)")
    args = p.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    students = [parse_student(s) for s in args.student]
    result = score(args.data, args.tokenizer, students, args.val_samples, args.batch_size)
    for name, by_t in result["scores"].items():
        print(name, "  ".join(f"{t}: ce {m['ce']:.4f}, finest-scale acc {finest_accuracy(m):.4f}" for t, m in by_t.items()))
    if args.out:
        print("wrote", atomic_write_json(args.out, result))


if __name__ == "__main__":
    sys.exit(run_cli(main))

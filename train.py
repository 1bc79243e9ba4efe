"""Train a tokenizer or a VAR transformer from a TOML config.

  python train.py tokenizer --config configs/fmnist_tokenizer.toml
  python train.py var --config configs/fmnist_var_drafter.toml --set train.steps=200
  python train.py code_refiner --config configs/fmnist_code_refiner.toml   # CoDe: distil the refiner for N scales
  python train.py dd --config configs/fmnist_dd.toml   # distilled-decoding student (dataset: python -m samplers.dd.data)
  accelerate launch --multi_gpu --num_processes 8 train.py var --config ...   # any number of GPUs / nodes
  CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 train.py var --config ...  # CPU, gloo
  python train.py var --config ... --resume                          # continue the run in train.out_dir
  accelerate launch --multi_gpu --num_processes 8 train.py var --config configs/imagenet_var_d16.toml \
      --set data.root=/data/imagenet/train --set data.val_root=/data/imagenet/val   # the public d16 recipe
  python train.py var --config configs/finetune_var_d16_imagefolder.toml --set data.root=my_images  # K new classes

The config file has tables [data], [optim], [train] (+ [loss] for tokenizers) and the model table:
[tokenizer] (a VQVAEConfig) for the tokenizer job, [var] (a VARConfig, `size = "var_d16"` allowed) for
the VAR job, whose vocabulary, latent width and scale list come from the frozen tokenizer and whose
class count comes from the dataset; [dd] (samplers.dd.data.DDConfig: teacher, dataset, schedule) for the dd job;
code_drafter / code_refiner (CoDe) take a VAR config plus [code] (draft_scales, teacher, kd_temperature,
lambda_steps). `--set table.key=value` overrides any value (TOML syntax; bare strings need no quotes). `--resume` may change steps, logging and paths, nothing else.

A VAR-based config (var, code_*) may also carry a [tokenizer] table (configs/var_d*.toml do): it describes the
frozen tokenizer the model is trained with, it does not build one. train.tokenizer is loaded with the table's
patch_nums (an official .pth is resolution-agnostic), and every key the table names must equal the loaded
tokenizer's config, else a one-line error lists the differing keys.

train.init_from (VAR-based jobs) starts the model from our .safetensors or an official var_d*.pth; when its class
count differs from the data's, train.init_class_embedding decides: "error", "reinit" (a fresh class table) or
"resize" (the first min(K_old, K_new) rows and the null row kept, new rows fresh). Everything else must match.
The held-out split (data.val_root or data.val_fraction) goes to the job for train.val_every.
"""
from __future__ import annotations

import dataclasses
import sys
import tomllib

import torch

from samplers import DefaultSampler
from tokenizers.config import VQVAEConfig
from var.config import VARConfig, from_dict, load_toml, var_config
from training.config import DataConfig, OptimConfig, RunConfig, TokenizerLossConfig, TrainConfig
from training.errors import make_parser, run_cli
from training.resume_settings import check_resume_early

TABLES = {"data": DataConfig, "optim": OptimConfig, "train": RunConfig, "loss": TokenizerLossConfig}


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"--set expects table.key=value (e.g. train.steps=100), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings need no quotes on the command line
    return key.split("."), value


def load_job_config(job: str, path: str, overrides: list[str]) -> tuple[TrainConfig, dict, dict | None]:
    """(config, model table, [tokenizer] description or None). The description is only taken by the VAR-based
    jobs, for which the model table is [var]; the tokenizer job's [tokenizer] is its model table."""
    raw = load_toml(path)
    for text in overrides:
        keys, value = parse_override(text)
        table = raw
        for depth, k in enumerate(keys[:-1], 1):
            table = table.setdefault(k, {})
            if not isinstance(table, dict):
                raise ValueError(f"--set {text}: {'.'.join(keys[:depth])} is a value, not a table; use TABLE.KEY=VALUE")
        table[keys[-1]] = value
    model_table = {"tokenizer": "tokenizer", "dd": "dd"}.get(job, "var")
    job_tables = {"code"} if job.startswith("code_") else set()  # CoDe jobs: [code] (samplers.code.training.CoDeTrainConfig)
    if model_table == "var":
        job_tables.add("tokenizer")
    unknown = sorted(set(raw) - set(TABLES) - {model_table} - job_tables)
    if unknown:
        valid = sorted(set(TABLES) | {model_table} | job_tables)
        raise KeyError(f"{path}: unknown table(s) {unknown} for the {job} job; valid: {valid}")
    parts = {name: from_dict(cls, raw.get(name, {}), f"{path}[{name}]") for name, cls in TABLES.items()}
    cfg = TrainConfig(job=job, **parts, code=dict(raw.get("code", {})))
    if model_table not in raw:
        raise KeyError(f"{path}: missing the [{model_table}] table describing the model")
    description = dict(raw["tokenizer"]) if model_table == "var" and "tokenizer" in raw else None
    if description is not None:
        from_dict(VQVAEConfig, description, f"{path}[tokenizer]")  # unknown keys / wrong types: fail before any loading
    return cfg, dict(raw[model_table]), description


def load_train_config(job: str, path: str, overrides: list[str]) -> tuple[TrainConfig, dict]:
    cfg, model_table, _ = load_job_config(job, path, overrides)
    return cfg, model_table


def check_tokenizer_description(description: dict, vae, tokenizer: str, where: str) -> None:
    """Every key of the [tokenizer] description must equal the loaded tokenizer's config."""
    wanted = from_dict(VQVAEConfig, description, where)
    diffs = [f"{k} {getattr(vae.config, k)!r} (the table says {getattr(wanted, k)!r})" for k in description
             if getattr(vae.config, k) != getattr(wanted, k)]
    if diffs:
        raise ValueError(f"train.tokenizer {tokenizer} does not match {where}: {'; '.join(diffs)}; point "
                         f"train.tokenizer at the tokenizer the model is trained with, or fix the table")


def build_var_config(table: dict, vae, num_classes: int | None, where: str) -> VARConfig:
    """[var] table -> VARConfig: vocabulary, latent width and scales come from the tokenizer and the class
    count from the dataset unless the table sets them (a mismatch is then reported, not silently fixed)."""
    table = dict(table)
    size = table.pop("size", None)
    base = dataclasses.asdict(var_config(size)) if size else {}
    inherited = {"vocab_size": vae.vocab_size, "z_channels": vae.z_channels, "patch_nums": list(vae.patch_nums)}
    if num_classes:
        inherited["num_classes"] = num_classes
    merged = {**base, **inherited, **table}
    merged["patch_nums"] = list(merged["patch_nums"])
    return from_dict(VARConfig, merged, where)


def default_sample_images(model, vae, labels, cfg: float):
    """Periodic training grids: the default sampler with a fixed seed (comparable over steps)."""
    return DefaultSampler(model, vae).sample(labels, cfg=cfg, seed=0).images


def build_var_based_job(job_name: str, cfg: TrainConfig, model_table: dict, tokenizer_description: dict | None,
                        config_path: str, dataset, val_dataset, accelerator):
    """The VAR or CoDe job: the frozen tokenizer (checked against the [tokenizer] description), the VARConfig."""
    from training.checkpoint import load_any
    from training.var_job import VARJob

    if not cfg.train.tokenizer:
        raise ValueError(f"the {job_name} job needs train.tokenizer = path of the trained tokenizer")
    patch_nums = (tokenizer_description or {}).get("patch_nums")
    vae = load_any(cfg.train.tokenizer, "vqvae", patch_nums=patch_nums)
    if tokenizer_description is not None:
        check_tokenizer_description(tokenizer_description, vae, cfg.train.tokenizer, f"{config_path}[tokenizer]")
    var_cfg = build_var_config(model_table, vae, len(getattr(dataset, "classes", [])), f"{config_path}[var]")
    # the jobs start from train.init_from themselves (training.checkpoint.load_init_from, class-embedding policy)
    args = (cfg, var_cfg, dataset, accelerator.device, accelerator.is_main_process)
    if not job_name.startswith("code_"):
        return VARJob(*args, default_sample_images, val_dataset=val_dataset)
    from samplers.code.training import JOBS, CoDeTrainConfig

    code = from_dict(CoDeTrainConfig, cfg.code, f"{config_path}[code]")
    return JOBS[job_name.removeprefix("code_")](*args, code, default_sample_images, val_dataset=val_dataset)


def main(argv: list[str] | None = None):
    parser = make_parser(description=__doc__)
    parser.add_argument("job", choices=["tokenizer", "var", "dd", "code_drafter", "code_refiner"],
                        help="what to train (code_*: CoDe fine-tuning of a drafter / distillation of a refiner)")
    parser.add_argument("--config", required=True, help="TOML file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the run found in train.out_dir")
    args = parser.parse_args(argv)

    from training.data import build_datasets
    from training.trainer import Trainer, make_accelerator

    cfg, model_table, tokenizer_description = load_job_config(args.job, args.config, args.set)
    if args.resume:  # refuse changed settings before datasets and token caches are built
        check_resume_early(dataclasses.asdict(cfg), cfg.train.out_dir)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)  # identical model initialisation on every process
    # the held-out split (data.val_root / data.val_fraction) or None; dd reads its own data
    dataset, val_dataset = build_datasets(cfg.data, seed=cfg.train.seed) if args.job != "dd" else (None, None)
    accelerator = make_accelerator(cfg)
    if args.job == "tokenizer":
        from training.tokenizer_job import TokenizerJob

        vae_cfg = from_dict(VQVAEConfig, model_table, f"{args.config}[tokenizer]")
        if vae_cfg.image_size != cfg.data.image_size:
            raise ValueError(f"tokenizer patch_nums {vae_cfg.patch_nums} x downsample {vae_cfg.downsample} make "
                             f"{vae_cfg.image_size}px images, but data.image_size is {cfg.data.image_size}")
        job = TokenizerJob(cfg, vae_cfg, dataset, accelerator.device, val_dataset=val_dataset)
    elif args.job == "dd":
        from samplers.dd.job import build_dd_job

        job = build_dd_job(cfg, model_table, args.config, accelerator.device, accelerator.is_main_process)
    else:
        job = build_var_based_job(args.job, cfg, model_table, tokenizer_description, args.config, dataset,
                                  val_dataset, accelerator)
    path = Trainer(cfg, job, accelerator).train(resume=args.resume)
    if accelerator.is_main_process:
        print(f"exported {path}")
    return path


if __name__ == "__main__":
    sys.exit(run_cli(main))

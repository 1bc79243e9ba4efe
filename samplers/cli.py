"""Command-line plumbing shared by sample.py and the benchmark: typed sampler options and model loading."""
from __future__ import annotations

from pathlib import Path

import torch

from training.checkpoint import checkpoint_kind, load_any

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist"


def parse_sampler_spec(spec: str) -> tuple[str, list[str]]:
    """"code:draft_scales=3,refiner_temperature=1.0" -> ("code", ["draft_scales=3", ...])."""
    name, _, rest = spec.partition(":")
    return name, [item for item in rest.split(",") if item]


def parse_sampler_args(cls, items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--sampler-arg expects NAME=VALUE, got {item!r}")
        name, raw = item.split("=", 1)
        if name not in cls.options:
            raise ValueError(f"sampler {cls.name!r} has no option {name!r}; its options: "
                             f"{', '.join(f'{k} ({t.__name__})' for k, t in cls.options.items()) or 'none'}")
        kind = cls.options[name]
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--sampler-arg {name} expects true/false, got {raw!r}")
            out[name] = raw.lower() in ("true", "1")
        else:
            try:
                out[name] = kind(raw)
            except ValueError as err:
                raise ValueError(f"--sampler-arg {name} expects a {kind.__name__}, got {raw!r}") from err
    return out


def models_for(cls, extras: dict) -> dict:
    """The loaded extra models a sampler class takes; errors name what is missing or not used."""
    accepted = cls.extra_models + cls.optional_models
    unused = sorted(set(extras) - set(accepted))
    if unused:
        raise ValueError(f"sampler {cls.name!r} does not use --model {', '.join(unused)}; it takes "
                         f"{', '.join(accepted) or 'no extra models'}")
    missing = [n for n in cls.extra_models if n not in extras]
    if missing:
        raise ValueError(f"sampler {cls.name!r} needs --model {'=PATH --model '.join(missing)}=PATH")
    return {k: extras[k] for k in accepted if k in extras}


def check_file(path: str, what: str) -> None:
    if not Path(path).is_file():
        hint = (" The shipped Fashion-MNIST models live in checkpoints/fmnist/ (see README, 'Training')."
                if str(path).startswith(str(SHIPPED)) else "")
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist.{hint}")


def load_models(var_path: str, vae_path: str, extra_models: list[str], device: torch.device):
    """VAR first: an official tokenizer file is resolution-agnostic and takes the VAR's scale list."""
    check_file(var_path, "VAR")
    check_file(vae_path, "tokenizer")
    var = load_any(var_path, "var", device=device)
    vae = load_any(vae_path, "vqvae", device=device, patch_nums=var.patch_nums)
    extras = {}
    for item in extra_models:
        if "=" not in item:
            raise ValueError(f"--model expects NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        check_file(path, name)
        # a distilled-decoding student is its own kind; anything else must be a VAR
        kind = "dd_student" if checkpoint_kind(path) == "dd_student" else "var"
        extras[name] = load_any(path, kind, device=device)
    return var, vae, extras



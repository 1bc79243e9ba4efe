"""Command-line plumbing shared by sample.py and the benchmark: typed sampler options, model loading and the
settings fingerprint that keeps a resumed output folder from mixing runs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import warnings
from pathlib import Path

import torch

from samplers.logits_processing import MAX_CFG
from training.atomic import atomic_write_bytes, atomic_write_json
from training.checkpoint import checkpoint_kind, load_any
from training.hub import resolve_path
from var.config import VARConfig

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist"


# ---- argparse types: a bad value is reported by argparse with the flag's name ---------------------------
def _number(kind, low: float, high: float | None = None):
    noun = "an integer" if kind is int else "a number"
    what = f"{noun} in [{low}, {high}]" if high is not None else f"{noun} >= {low}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1)
nonneg_int = _number(int, 0)
nonneg_float = _number(float, 0)
unit_float = _number(float, 0, 1)
cfg_float = _number(float, 0, MAX_CFG)


def class_list(text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids such as 0,3, got {text!r}") from None
    if any(c < 0 for c in classes):
        raise argparse.ArgumentTypeError(f"class ids are >= 0, got {text!r}")
    return classes


def batch_size_list(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes >= 1 such as 1,16, got {text!r}")
    return sizes


def temperature_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers (one per scale), got {text!r}") from None
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"temperatures must be finite numbers > 0, got {text!r}")
    return values


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


def parse_model_specs(items: list[str]) -> dict[str, str]:
    """`--model NAME=PATH` items -> {name: path}, each file checked to exist (nothing is loaded)."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model expects NAME=PATH (e.g. refiner=checkpoints/fmnist/var_refiner.safetensors), got {item!r}")
        if name in out:
            raise ValueError(f"--model {name}= is given twice; give each extra model once")
        out[name] = check_file(path, f"--model {name}")
    return out


def parse_var_overrides(items: list[str]) -> dict:
    """`--var-override KEY=VALUE` items -> {key: value} for VARConfig fields (values in TOML syntax; bare
    strings need no quotes)."""
    fields = {f.name for f in dataclasses.fields(VARConfig)}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise ValueError(f"--var-override expects KEY=VALUE (e.g. num_heads=16), got {item!r}")
        if key not in fields:
            raise ValueError(f"--var-override {key}: not a VAR config field; valid: {', '.join(sorted(fields))}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def check_file(path: str, what: str) -> str:
    """The local path of a checkpoint argument (an hf:// URI goes through the Hub cache), checked to exist."""
    local = str(resolve_path(path))
    if not Path(local).is_file():
        hint = (" The shipped Fashion-MNIST models live in checkpoints/fmnist/ (see README, 'Training')."
                if str(path).startswith(str(SHIPPED)) else " Check the path.")
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist.{hint}")
    return local


def load_models(var_path: str, vae_path: str, extra_models: list[str] | dict[str, str], device: torch.device,
                var_overrides: dict | None = None):
    """VAR first: an official tokenizer file is resolution-agnostic and takes the VAR's scale list.
    `var_overrides` (VARConfig fields) complete the config of an official VAR file where its tensors do not
    determine it (e.g. the head count)."""
    var_path, vae_path = check_file(var_path, "VAR"), check_file(vae_path, "tokenizer")
    extras_paths = extra_models if isinstance(extra_models, dict) else parse_model_specs(extra_models)
    # the keyword only travels when used, so loaders without it keep working for everyone else
    var = load_any(var_path, "var", device=device, **({"overrides": dict(var_overrides)} if var_overrides else {}))
    vae = load_any(vae_path, "vqvae", device=device, patch_nums=var.patch_nums)
    extras = {}
    for name, path in extras_paths.items():
        # a distilled-decoding student is its own kind; anything else must be a VAR
        kind = "dd_student" if checkpoint_kind(path) == "dd_student" else "var"
        extras[name] = load_any(path, kind, device=device)
    return var, vae, extras


# ---- resumable output folders ------------------------------------------------------------------------------
FINGERPRINT = "fingerprint.json"
# what a run writes into its folder: the only files --overwrite deletes (anything else there is the user's)
OUTPUT_FILES = ("samples.npz", "grid.png", "sample_config.json", "stats.jsonl", "eval_card.json", "eval_card.md",
                "metrics.json", FINGERPRINT)
FLAG_OF = {"models.var": "--var", "models.vae": "--vae", "var_overrides": "--var-override",
           "sampler_args": "--sampler-arg", "sampler_arg_files": "--sampler-arg (file content)",
           "classes": "--classes", "edit_image": "--edit-image (file content)", "edit_mask": "--edit-mask (file content)",
           "device": "the device (CPU or CUDA)", "seeding": "the seeding scheme (another sample.py version)",
           "decode_chunk": "the decoding chunk (another sample.py version)", "format": "the fingerprint format"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k == "models":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _flag(key: str) -> str:
    if key in FLAG_OF:
        return FLAG_OF[key]
    if key.startswith("models."):
        return f"--model {key.removeprefix('models.')}"
    return "--" + key.replace("_", "-")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def fingerprint_differences(stored: dict, current: dict) -> list[str]:
    a, b = _flatten(stored), _flatten(current)
    return [f"{_flag(k)} ({_short(a.get(k))} then, {_short(b.get(k))} now)" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def drop_partial_last_line(path: Path) -> None:
    """A kill while appending to a JSONL file leaves a partial last line; a resumed run drops it (with a
    warning) instead of gluing its next record onto it."""
    data = path.read_bytes() if path.is_file() else b""
    if data and not data.endswith(b"\n"):
        atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])
        warnings.warn(f"{path}: dropped a partial last line (a run killed while writing it)", stacklevel=2)


def read_stats(out: Path) -> list[dict]:
    """Every per-batch record of stats*.jsonl in `out`; a corrupt line is an error naming it."""
    records = []
    for path in sorted(out.glob("stats*.jsonl")):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise ValueError(f"{path}:{number}: corrupt stats line ({err}); delete that line and rerun") from err
    return records


def previous_images(out: Path) -> list[Path]:
    return sorted((out / "images").glob("[0-9]*.png")) if (out / "images").is_dir() else []


def check_resume(out: Path, fingerprint: dict, overwrite: bool) -> None:
    """Refuse to add images to a folder made with other settings (one error naming them); reads only."""
    if overwrite or not out.exists():
        return
    path = out / FINGERPRINT
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is unreadable ({err}); add --overwrite to start the folder again") from err
        diffs = fingerprint_differences(stored, json.loads(json.dumps(fingerprint)))
        if diffs:
            raise ValueError(f"--out {out} holds images made with other settings: {'; '.join(diffs)}. Rerun with the "
                             "same settings to resume, pick another --out, or add --overwrite to delete its outputs")
    elif previous_images(out):
        raise ValueError(f"--out {out} holds images without a {FINGERPRINT} (another sample.py version or run), so "
                         "they cannot be resumed safely; pick another --out or add --overwrite to delete them")


def clear_outputs(out: Path) -> int:
    """--overwrite: delete what earlier runs wrote (images, npz, grid, records, atomic-write leftovers), nothing
    else, so pointing --out at a folder with other files in it loses none of them. Returns the files removed."""
    doomed = previous_images(out) + [out / name for name in OUTPUT_FILES] + sorted(out.glob("stats.rank*.jsonl"))
    if (out / "images").is_dir():
        doomed += sorted((out / "images").glob(".[0-9]*.png.*.tmp"))
    removed = 0
    for path in doomed:
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def write_fingerprint(out: Path, fingerprint: dict) -> None:
    atomic_write_json(out / FINGERPRINT, fingerprint)

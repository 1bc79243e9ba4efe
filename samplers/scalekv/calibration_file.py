"""The ScaleKV calibration file: a small JSON tied to one model by hashes of its config and weights.

Shared by the calibration (which writes it) and the policy (which reads it), so neither imports the other.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from training.atomic import atomic_write_json

FORMAT = "var-scalekv-calibration"
VERSION = 2  # 2: drafters identified per scale; window centres as the authors' code


def model_fingerprint(model: torch.nn.Module) -> dict:
    """sha256 of the model's config (JSON) and of every tensor of its state dict (names, shapes, dtypes, bytes)."""
    config = model.config_dict() if hasattr(model, "config_dict") else {}
    cfg_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode()).hexdigest()
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return {"config_sha256": cfg_hash, "weights_sha256": h.hexdigest()}


def save_calibration(result: dict, path: str | Path) -> Path:
    return atomic_write_json(Path(path), result)


def load_calibration(path: str | Path, model) -> dict:
    """Read a calibration JSON and refuse it unless it was made for exactly this model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ScaleKV calibration {path} does not exist; create it with "
                                f"`python -m samplers.scalekv.calibration --var <model> --tokenizer <tok> --out {path}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"ScaleKV calibration {path} is not readable JSON ({err}); re-run "
                         f"`python -m samplers.scalekv.calibration`") from err
    fields = data if isinstance(data, dict) else {}
    if fields.get("format") != FORMAT or fields.get("version") != VERSION or not isinstance(fields.get("model"), dict):
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} file (format={fields.get('format')!r}, "
                         f"version={fields.get('version')!r}); re-run the calibration")
    mine = model_fingerprint(model)
    theirs = data["model"]
    if mine != {k: theirs.get(k) for k in mine}:
        what = "config" if mine["config_sha256"] != theirs.get("config_sha256") else "weights"
        raise ValueError(f"ScaleKV calibration {path} was made for a different model (its {what} hash differs: "
                         f"file {theirs.get(what + '_sha256', '?')[:12]}, model {mine[what + '_sha256'][:12]}). "
                         f"Budgets are model specific: re-run `python -m samplers.scalekv.calibration` for this model")
    return data

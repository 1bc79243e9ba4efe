"""Pickle-free training state for `--resume`: nested containers of tensors and plain values are split into a
JSON skeleton (`<stem>.json`) and the tensors (`<stem>.safetensors`); a checkpoint folder is sealed by a
`manifest.json` of sha256 sums written last. Loading never unpickles: a crafted file can at worst fail to
parse, it cannot run code.

Checkpoint folder layout (`<out_dir>/checkpoints/step_XXXXXXX/`):
  state.json + state.safetensors     step, epoch, data position, world size, wall time, resume-relevant config,
                                     optimizer hyper-parameters / step counts (JSON); model, EMA and optimizer
                                     tensors (safetensors); the GradScaler state (JSON)
  rng_rank{r}.json + .safetensors    per process: python `random` state (JSON lists), numpy MT19937 scalars
                                     (JSON) and key array, torch / CUDA generator states (uint8 tensors)
  manifest.json                      format, version, sha256 and size of every other file; written last
A folder without a valid manifest (interrupted, damaged, tampered, or the old pickled `train_state.pt`
format) is never read.
"""
from __future__ import annotations

import json
import warnings
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training.atomic import atomic_write, atomic_write_json, file_sha256

FORMAT_NAME = "var-toolkit-train-state"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OLD_FORMAT = "train_state.pt"
# JSON objects with exactly one of these keys stand for a value JSON has no type for.
TENSOR, TUPLE, DICT = "__tensor__", "__tuple__", "__dict__"


class StateFormatError(ValueError):
    """A state file that does not decode to what was written (damaged or hand-edited)."""


# ---- tree <-> (JSON skeleton, tensors) -------------------------------------------------------------------
def _encode(obj, path: str, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"train state: two tensors would be stored as {path!r}")
        # clone: safetensors refuses tensors sharing storage (tied weights, views of one buffer)
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {TENSOR: path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        bad = [k for k in obj if isinstance(k, bool) or not isinstance(k, (str, int))]
        if bad:
            raise TypeError(f"train state: dict key {bad[0]!r} at {path or '/'} is neither str nor int")
        # optimizer states are keyed by parameter index: keep int keys ints
        return {DICT: [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {TUPLE: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()  # numpy scalars: python's float repr round-trips exactly through JSON
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"train state: cannot store a {type(obj).__name__} at {path or '/'} without pickle")


def _decode(node, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(node, list):
        return [_decode(v, tensors, where) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1 and TENSOR in node:
        name = node[TENSOR]
        if not isinstance(name, str) or name not in tensors:
            raise StateFormatError(f"{where}: refers to tensor {name!r}, which the .safetensors file lacks")
        return tensors[name]
    if len(node) == 1 and TUPLE in node and isinstance(node[TUPLE], list):
        return tuple(_decode(v, tensors, where) for v in node[TUPLE])
    if len(node) == 1 and DICT in node and isinstance(node[DICT], list):
        if not all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], (str, int)) for kv in node[DICT]):
            raise StateFormatError(f"{where}: malformed {DICT} entry")
        return {k: _decode(v, tensors, where) for k, v in node[DICT]}
    return {k: _decode(v, tensors, where) for k, v in node.items()}


def save_tree(folder: Path, stem: str, tree) -> list[str]:
    """Write `tree` as `<stem>.safetensors` + `<stem>.json` (atomically); returns the two file names."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, "", tensors)
    atomic_write(folder / f"{stem}.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write_json(folder / f"{stem}.json", {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tree": skeleton})
    return [f"{stem}.safetensors", f"{stem}.json"]


def load_tree(folder: Path, stem: str):
    """Inverse of save_tree; any parse problem is a StateFormatError naming the file."""
    json_path, st_path = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateFormatError(f"{json_path}: unreadable ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME or doc.get("version") != FORMAT_VERSION:
        raise StateFormatError(f"{json_path}: not a {FORMAT_NAME} v{FORMAT_VERSION} file")
    try:
        tensors = load_file(st_path)
    except Exception as err:  # safetensors raises its own error type for malformed headers
        raise StateFormatError(f"{st_path}: not a valid safetensors file ({err})") from err
    return _decode(doc["tree"], tensors, str(json_path))


# ---- manifests: a checkpoint folder is intact when every file matches its recorded sha256 ----------------
def write_manifest(folder: Path) -> None:
    """Seal `folder`: hash every file in it. Written last, so a folder with a manifest is complete."""
    files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    atomic_write_json(folder / MANIFEST, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "files": files})


def check_folder(folder: Path, required: tuple[str, ...]) -> tuple[str | None, set[str]]:
    """(None, listed file names) when `folder` is intact, else (why not, set())."""
    manifest = folder / MANIFEST
    if not folder.is_dir():
        return "the folder does not exist", set()
    if not manifest.exists():
        if (folder / OLD_FORMAT).exists():
            return (f"old pickled {OLD_FORMAT} format, not loaded (unpickling a file can run arbitrary code); "
                    f"this version resumes only from safetensors + JSON checkpoints"), set()
        return f"no {MANIFEST} (the checkpoint was never completed)", set()
    try:
        doc = json.loads(manifest.read_text())
        files = doc["files"]
        if doc.get("format") != FORMAT_NAME or not isinstance(files, dict):
            raise ValueError("not a train-state manifest")
        if doc.get("version") != FORMAT_VERSION:
            return f"{MANIFEST} has format version {doc.get('version')!r}, this code reads {FORMAT_VERSION}", set()
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})", set()
    missing = [name for name in required if name not in files]
    if missing:
        return f"{MANIFEST} does not list {missing}", set()
    for name, entry in files.items():
        path = folder / Path(name).name  # names only: a manifest cannot point outside its folder
        if not path.is_file():
            return f"{name} is missing", set()
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, the manifest recorded {entry.get('bytes')!r} (truncated?)", set()
        if file_sha256(path) != entry.get("sha256"):
            return f"{name} does not match its sha256 in {MANIFEST} (damaged or modified)", set()
    return None, set(files)


# ---- RNG states ------------------------------------------------------------------------------------------
def rng_state() -> dict:
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
             "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, where: str) -> None:
    try:
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
        np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise StateFormatError(f"{where}: not a valid RNG state ({err})") from err
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU the saving process saw; a node that sees fewer GPUs restores the ones it has
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


# ---- metrics.jsonl ---------------------------------------------------------------------------------------
def read_log_records(path: Path) -> tuple[list[tuple[str, dict]], str | None]:
    """The (line, record) pairs of a JSONL log and the partial last line a kill mid-write left (or None).
    Only the last line may be partial; a bad line before it is an error naming the file and line."""
    lines = path.read_text(errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    records, partial = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as err:
            if number == len(lines):
                partial = line
                break
            raise ValueError(f"{path}:{number}: corrupt log line ({err}); only a partial last line is repaired "
                             f"on --resume: fix or delete line {number}, then resume again") from err
        records.append((line, record))
    return records, partial


def find_intact_checkpoint(ckpt_dir: Path, state_files: tuple[str, ...], state_keys: set[str],
                           warn: bool = True) -> tuple[Path, dict, set[str]]:
    """(folder, train state, files the manifest lists) of the checkpoint `latest.txt` names, or else of the
    newest intact older one (with a warning naming both). Every process checks the same files, so all of them
    take the same one."""
    latest = ckpt_dir / "latest.txt"
    if not latest.exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
    named = Path(latest.read_text().strip()).name  # a name, never a path out of checkpoints/
    older = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                    and p.name != named), reverse=True)
    rejected = []
    for folder in [ckpt_dir / named] + older:
        problem, listed = check_folder(folder, state_files)
        if problem is None:
            try:
                state = load_tree(folder, "state")
                if not isinstance(state, dict) or not state_keys <= set(state) or not isinstance(state["config"], dict):
                    raise StateFormatError(f"{folder / 'state.json'}: not a train state (keys {sorted(state_keys)})")
            except StateFormatError as err:
                problem = str(err)
        if problem is None:
            if rejected and warn:
                warnings.warn(f"--resume: checkpoint {rejected[0][0]} is unusable ({rejected[0][1]}); resuming "
                              f"from the newest intact checkpoint {folder} instead", stacklevel=4)
            return folder, state, listed
        rejected.append((folder, problem))
    raise ValueError(f"--resume: no intact checkpoint in {ckpt_dir} ("
                     + "; ".join(f"{f.name}: {why}" for f, why in rejected)
                     + "); start the run again without --resume in a fresh train.out_dir")

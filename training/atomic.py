"""File helpers. Atomic writes: write to a temp file in the target folder, then rename over the target, so
an interrupted run never leaves a truncated file behind (the old file or the new one, nothing else).
Content hashes: tie results to the exact weights they were computed with. Output checks: refuse a path that
cannot be written before any work is done."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call `write(tmp_path)` and move the result to `path`. `suffix` lets writers that insist on an
    extension (e.g. np.savez given a path) keep theirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private (0600); give them the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | Path, obj, indent: int = 2, default=None) -> Path:
    """`default` converts objects json cannot (e.g. numpy scalars), as in json.dumps."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(path: Path, flag: str, folder: bool) -> None:
    """`path` (given as `flag`) can be written: a folder (folder=True) or a file, not the other kind, whose
    nearest existing ancestor (itself, for a folder) is a folder this process may write into. Missing folders
    are fine: the writers create them."""
    if path.exists() and path.is_dir() != folder:
        what = "a file; give a folder (it is created if missing)" if folder else "a folder; give a file path"
        raise ValueError(f"{flag} {path} is {what}")
    existing = next(p for p in ((path,) if folder else ()) + tuple(path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not a writable folder; choose another {flag}")

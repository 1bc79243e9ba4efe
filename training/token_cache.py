"""Sharded token cache: the tokens of every (unaugmented) training image, built once, in parallel, reused.

Layout for a cache path `<cache>` (train.token_cache):
* `<cache>.shard-{r:05d}-of-{w:05d}.safetensors`: tokens_nL int32 and labels_n int64 of one contiguous block
  of items, written atomically by the rank that encoded it;
* `<cache>.json`: the manifest, written last by the main process: the identity the cache was built for
  (tokenizer weights sha256, dataset fingerprint, image settings, tokens per image), the format version,
  and every shard's item range and sha256.

Content does not depend on the world size: items are encoded in fixed chunks aligned to absolute item
indices (chunk k holds items [k * chunk, (k + 1) * chunk)), and a shard is a run of whole chunks, so every
image is encoded in the same batch whatever the number of ranks (convolutions may round differently for
other batch compositions). A cache built by w ranks is read by any number of ranks.

The older single-file format (`<cache>` itself a safetensors file, a version-1 manifest beside it) is still
read when intact and built for the same settings; otherwise it is rebuilt in this format. Nothing here
unpickles: safetensors and JSON only.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from training.atomic import atomic_write, atomic_write_json, file_sha256

TOKEN_CACHE_FORMAT = "var-toolkit-token-cache"
TOKEN_CACHE_VERSION = 2  # 1: one safetensors file at <cache> (read for compatibility)
ENCODE_CHUNK = 256  # items per encoder batch; part of the identity, since it fixes the batch composition

EncodeFn = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]


def token_cache_manifest(cache: str | Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + ".json")


def shard_path(cache: str | Path, rank: int, world_size: int) -> Path:
    cache = Path(cache)
    return cache.with_name(f"{cache.name}.shard-{rank:05d}-of-{world_size:05d}.safetensors")


def shard_ranges(num_items: int, world_size: int, chunk: int = ENCODE_CHUNK) -> list[tuple[int, int]]:
    """[start, stop) of each rank's block: whole chunks, as even as they go (the first ranks take one more)."""
    num_chunks = -(-num_items // chunk)
    per, extra = divmod(num_chunks, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        stop = start + per + (r < extra)
        bounds.append((min(start * chunk, num_items), min(stop * chunk, num_items)))
        start = stop
    return bounds


def dataset_fingerprint(dataset, fallback: dict) -> str:
    """The dataset's own `fingerprint()` (files, sizes, mtimes / idx bytes / procedural parameters), or,
    for a dataset without one, a hash of the settings that name it (`fallback`) and its length."""
    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        return str(own())
    blob = json.dumps({**fallback, "len": len(dataset)}, sort_keys=True).encode()
    return "settings:" + hashlib.sha256(blob).hexdigest()


# ---- reading ---------------------------------------------------------------------------------------------
def _load_pair(path: Path, num_tokens: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        saved = load_file(path)
        tokens, labels = saved["tokens_NL"], saved["labels_N"]
    except Exception as err:  # safetensors raises its own error type for malformed files
        raise ValueError(f"corrupt ({path.name}: {err})") from None
    if tokens.shape != (n, num_tokens) or tokens.dtype != torch.int32 or labels.shape != (n,):
        raise ValueError(f"corrupt ({path.name}: tokens {tuple(tokens.shape)} {tokens.dtype}, labels {tuple(labels.shape)})")
    return tokens, labels


def _read_sharded(cache: Path, doc: dict, identity: dict):
    stale = [k for k in identity if doc.get("identity", {}).get(k) != identity[k]]
    if stale:
        raise ValueError(f"stale (built for other {', '.join(stale)})")
    shards, expect = doc.get("shards"), 0
    if not isinstance(shards, list) or not shards:
        raise ValueError("corrupt (its manifest lists no shards)")
    tokens, labels = [], []
    for shard in shards:
        path = cache.with_name(str(shard.get("file", "")))
        if Path(str(shard.get("file", ""))).name != shard.get("file") or shard.get("start") != expect:
            raise ValueError("corrupt (its manifest's shard list is malformed)")
        if not path.is_file():
            raise ValueError(f"incomplete (shard {path.name} is missing)")
        if file_sha256(path) != shard.get("sha256"):
            raise ValueError(f"corrupt (shard {path.name} does not match its sha256 in the manifest)")
        t, lab = _load_pair(path, identity["num_tokens"], shard["stop"] - shard["start"])
        tokens.append(t)
        labels.append(lab)
        expect = shard["stop"]
    if expect != identity["num_items"]:
        raise ValueError(f"corrupt (its shards cover {expect} of {identity['num_items']} items)")
    return torch.cat(tokens), torch.cat(labels)


def _read_legacy(cache: Path, doc: dict, legacy_identity: dict | None):
    """A version-1 cache: one data file at `cache`, its sha256 and flat identity in the manifest."""
    if legacy_identity is None:
        raise ValueError("stale (an older single-file cache built for other image settings)")
    stale = [k for k in legacy_identity if doc.get(k) != legacy_identity[k]]
    if stale:
        raise ValueError(f"stale (built for other {', '.join(stale)})")
    if not cache.is_file():
        raise ValueError(f"incomplete (its data file {cache.name} is missing)")
    if file_sha256(cache) != doc.get("sha256"):
        raise ValueError(f"corrupt (its sha256 does not match {token_cache_manifest(cache).name})")
    return _load_pair(cache, legacy_identity["num_tokens"], legacy_identity["num_items"])


def read_token_cache(cache: str | Path, identity: dict, legacy_identity: dict | None = None):
    """((tokens_NL, labels_N), None) when the cache at `cache` is intact and built for `identity` (or, in the
    old single-file format, for `legacy_identity`), else (None, why not; None when there is no cache)."""
    cache = Path(cache)
    manifest = token_cache_manifest(cache)
    if not manifest.exists():
        if cache.exists():
            return None, f"no manifest {manifest.name} beside it (an old-format or interrupted cache)"
        if any(cache.parent.glob(f"{cache.name}.shard-*-of-*.safetensors")):
            return None, f"shards but no manifest {manifest.name} (an interrupted build)"
        return None, None
    try:
        doc = json.loads(manifest.read_text())
        if not isinstance(doc, dict) or doc.get("format") != TOKEN_CACHE_FORMAT:
            raise ValueError(f"not a {TOKEN_CACHE_FORMAT} manifest")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"its manifest {manifest.name} is unreadable ({err})"
    try:
        if doc.get("version") == TOKEN_CACHE_VERSION:
            return _read_sharded(cache, doc, identity), None
        if doc.get("version") == 1:
            return _read_legacy(cache, doc, legacy_identity), None
        return None, f"its manifest {manifest.name} has unknown version {doc.get('version')!r}"
    except ValueError as err:
        return None, str(err)
    except (KeyError, TypeError, AttributeError) as err:  # a hand-edited manifest
        return None, f"its manifest {manifest.name} is malformed ({type(err).__name__}: {err})"


# ---- building --------------------------------------------------------------------------------------------
def _encode_range(encode_fn: EncodeFn, start: int, stop: int, chunk: int, progress: bool, num_tokens: int):
    tokens, labels = [torch.zeros(0, num_tokens, dtype=torch.int32)], [torch.zeros(0, dtype=torch.int64)]
    for begin in tqdm(range(start, stop, chunk), desc="tokenise", disable=not progress):
        t, lab = encode_fn(list(range(begin, min(begin + chunk, stop))))
        tokens.append(t.to("cpu", torch.int32))
        labels.append(torch.as_tensor(lab).to("cpu", torch.int64))
    return torch.cat(tokens).contiguous(), torch.cat(labels).contiguous()


def build_token_cache(cache_path: str | Path, identity: dict, num_items: int, encode_fn: EncodeFn, rank: int,
                      world_size: int, barrier: Callable[[], None], main_process: bool, progress: bool = True,
                      legacy_identity: dict | None = None, chunk: int = ENCODE_CHUNK):
    """(tokens_NL int32, labels_N int64) of all `num_items` items in item order, from the cache at
    `cache_path` if it is intact and built for `identity`, else encoded now: rank r encodes its block with
    `encode_fn(indices) -> (tokens_nL, labels_n)`, writes its shard, and after `barrier()` the main process
    writes the manifest; after a second `barrier()` every rank reads all shards back (hashes verified).

    Every rank must see the same files (a shared file system). `identity` must hold num_items and
    num_tokens. A stale or damaged cache is rebuilt with a warning naming why."""
    cache = Path(cache_path)
    identity = {**identity, "num_items": num_items, "encode_chunk": chunk}
    found, problem = read_token_cache(cache, identity, legacy_identity)
    barrier()  # nobody rewrites a file another rank is still checking
    if found is not None:
        return found
    if problem is not None and main_process:
        warnings.warn(f"token cache {cache}: {problem}; rebuilding it", stacklevel=2)
    start, stop = shard_ranges(num_items, world_size, chunk)[rank]
    if stop > start:
        tokens, labels = _encode_range(encode_fn, start, stop, chunk, progress and main_process, identity["num_tokens"])
        if tokens.shape != (stop - start, identity["num_tokens"]) or labels.shape != (stop - start,):
            raise ValueError(f"encode_fn returned tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} for "
                             f"{stop - start} items of {identity['num_tokens']} tokens")
        atomic_write(shard_path(cache, rank, world_size),
                     lambda tmp: save_file({"tokens_NL": tokens, "labels_N": labels}, tmp))
    barrier()
    if main_process:
        _write_manifest(cache, identity, world_size, chunk)
    barrier()
    found, problem = read_token_cache(cache, identity, legacy_identity)
    if found is None:
        raise RuntimeError(f"token cache {cache}: just built but unreadable ({problem}); train.token_cache must be "
                           f"on a file system every process sees, and only one run may build it at a time")
    return found


def _write_manifest(cache: Path, identity: dict, world_size: int, chunk: int) -> None:
    """Manifest last; then shards of other builds (another world size) and an old single-file cache go."""
    shards = []
    for r, (start, stop) in enumerate(shard_ranges(identity["num_items"], world_size, chunk)):
        if stop > start:
            path = shard_path(cache, r, world_size)
            shards.append({"file": path.name, "start": start, "stop": stop, "sha256": file_sha256(path)})
    atomic_write_json(token_cache_manifest(cache), {"format": TOKEN_CACHE_FORMAT, "version": TOKEN_CACHE_VERSION,
                                                   "identity": identity, "shards": shards})
    listed = {s["file"] for s in shards}
    for old in cache.parent.glob(f"{cache.name}.shard-*-of-*.safetensors"):
        if old.name not in listed:
            old.unlink(missing_ok=True)
    if cache.is_file():
        cache.unlink()


def write_legacy_token_cache(cache: str | Path, identity: dict, tokens_NL: torch.Tensor, labels_N: torch.Tensor) -> None:
    """The version-1 single-file format, kept so tests can check that old caches are still read."""
    cache = Path(cache)
    atomic_write(cache, lambda tmp: save_file({"tokens_NL": tokens_NL.contiguous(), "labels_N": labels_N.contiguous()}, tmp))
    atomic_write_json(token_cache_manifest(cache), {"format": TOKEN_CACHE_FORMAT, "version": 1, **identity,
                                                   "sha256": file_sha256(cache)})

"""Sharded token cache: built by 2 ranks it equals the 1-rank cache and the tokenizer's own tokens, it is reused
by any world size, and a stale, corrupt, incomplete, old-format or pickled cache is rebuilt with a warning."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenizers import VQVAE, VQVAEConfig
from training.data import ProceduralShapes
from training.token_cache import (build_token_cache, read_token_cache, shard_path, shard_ranges, token_cache_manifest,
                                  write_legacy_token_cache)

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4))
N, CHUNK = 40, 8


@pytest.fixture(scope="module")
def setup():
    """A tiny random tokenizer, 40 procedural images, and their tokens straight from vae.img_to_tokens."""
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(**TINY_VAE)).eval()
    data = ProceduralShapes(N, vae.config.image_size, num_classes=4, seed=3)
    images = torch.stack([data[i][0] for i in range(N)])
    with torch.no_grad():
        truth = torch.cat(vae.img_to_tokens(images), dim=1).to(torch.int32)
    labels = torch.tensor([data[i][1] for i in range(N)])
    return vae, data, truth, labels


def encoder(setup, calls: list | None = None):
    vae, data, _, _ = setup

    def encode_fn(indices):
        if calls is not None:
            calls.append(list(indices))
        with torch.no_grad():
            imgs = torch.stack([data[i][0] for i in indices])
            return torch.cat(vae.img_to_tokens(imgs), dim=1).to(torch.int32), torch.tensor([data[i][1] for i in indices])
    return encode_fn


def refuse(indices):
    raise AssertionError("the cache should have been reused, not encoded again")


IDENTITY = {"tokenizer_sha256": "a" * 64, "dataset": "d" * 64, "image_size": 16, "num_tokens": 30}


def build(cache, setup, world=1, identity=IDENTITY, encode_fn=None):
    """Run every rank of a `world`-process build, one thread per rank, with a real barrier between them."""
    barrier = threading.Barrier(world, timeout=60)
    results, errors = [None] * world, []

    def rank_main(r):
        try:
            results[r] = build_token_cache(cache, identity, N, encode_fn or encoder(setup), r, world, barrier.wait,
                                           main_process=r == 0, progress=False, chunk=CHUNK)
        except BaseException as err:  # noqa: BLE001 (re-raised below, in the test thread)
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("n,world,chunk", [(40, 1, 8), (40, 2, 8), (40, 3, 8), (41, 2, 8), (5, 4, 8), (256, 3, 16)])
def test_shard_ranges_tile_the_items_in_whole_chunks(n, world, chunk):
    ranges = shard_ranges(n, world, chunk)
    assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order
    assert all(start % chunk == 0 for start, stop in ranges if stop > start)  # chunk-aligned blocks
    sizes = [(stop - start + chunk - 1) // chunk for start, stop in ranges]  # chunks per rank
    assert max(sizes) - min(sizes) <= 1


def test_two_ranks_build_the_one_rank_cache_bitwise_and_the_tokenizers_tokens(tmp_path, setup):
    _, _, truth, labels = setup
    one = build(tmp_path / "one" / "tokens.safetensors", setup, world=1)[0]
    two = build(tmp_path / "two" / "tokens.safetensors", setup, world=2)
    for tokens, labs in [one, *two]:  # every rank returns all items, in item order
        assert tokens.dtype == torch.int32 and torch.equal(tokens, truth) and torch.equal(labs, labels)
    # the shard files hold the blocks shard_ranges assigns, bit for bit what one rank stored
    (a, b) = shard_ranges(N, 2, CHUNK)
    for r, (start, stop) in enumerate((a, b)):
        saved = load_file(shard_path(tmp_path / "two" / "tokens.safetensors", r, 2))
        assert torch.equal(saved["tokens_NL"], truth[start:stop]) and torch.equal(saved["labels_N"], labels[start:stop])
    doc = json.loads(token_cache_manifest(tmp_path / "two" / "tokens.safetensors").read_text())
    assert [(s["start"], s["stop"]) for s in doc["shards"]] == [a, b] and doc["identity"]["num_items"] == N


def test_each_rank_encodes_only_its_own_block(tmp_path, setup):
    calls: list = []
    build(tmp_path / "t.safetensors", setup, world=2, encode_fn=encoder(setup, calls))
    encoded = sorted(i for batch in calls for i in batch)
    assert encoded == list(range(N))  # every item once, over both ranks
    assert all(len(batch) <= CHUNK and batch[0] % CHUNK == 0 for batch in calls)


def test_a_cache_is_reused_by_any_world_size(tmp_path, setup):
    _, _, truth, _ = setup
    cache = tmp_path / "t.safetensors"
    build(cache, setup, world=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rebuild warning either
        for world in (1, 3):
            for tokens, _ in build(cache, setup, world=world, encode_fn=refuse):
                assert torch.equal(tokens, truth)


@pytest.mark.parametrize("key,value", [("tokenizer_sha256", "b" * 64), ("dataset", "e" * 64), ("image_size", 32)])
def test_stale_identity_is_rebuilt_naming_what_changed(tmp_path, setup, key, value):
    cache = tmp_path / "t.safetensors"
    build(cache, setup, world=2)
    calls: list = []
    with pytest.warns(UserWarning, match=rf"token cache .*t.safetensors: stale \(built for other {key}\); rebuilding it"):
        build(cache, setup, world=1, identity={**IDENTITY, key: value}, encode_fn=encoder(setup, calls))
    assert sorted(i for c in calls for i in c) == list(range(N))
    # the rebuilt cache is the one of the new identity, and the 2-rank shards are gone
    assert read_token_cache(cache, {**IDENTITY, key: value, "num_items": N, "encode_chunk": CHUNK})[0] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors.json", "t.safetensors.shard-00000-of-00001.safetensors"]


def test_corrupt_or_missing_shard_is_rebuilt(tmp_path, setup):
    _, _, truth, _ = setup
    cache = tmp_path / "t.safetensors"
    build(cache, setup, world=2)
    shard = shard_path(cache, 1, 2)
    data = shard.read_bytes()
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # one token byte: a valid safetensors file with a wrong payload
    shard.write_bytes(bytes(flipped))
    with pytest.warns(UserWarning, match=r"corrupt \(shard t.safetensors.shard-00001-of-00002.safetensors does not match its sha256"):
        assert torch.equal(build(cache, setup, world=2)[0][0], truth)
    assert shard.read_bytes() == data
    shard.unlink()
    with pytest.warns(UserWarning, match=r"incomplete \(shard t.safetensors.shard-00001-of-00002.safetensors is missing\)"):
        assert torch.equal(build(cache, setup, world=2)[1][0], truth)
    doc = json.loads(token_cache_manifest(cache).read_text())
    token_cache_manifest(cache).write_text(json.dumps({**doc, "shards": ["x"]}))  # hand-edited
    with pytest.warns(UserWarning, match=r"its manifest t.safetensors.json is malformed \(AttributeError"):
        assert torch.equal(build(cache, setup, world=1)[0][0], truth)
    token_cache_manifest(cache).write_text("{not json")
    with pytest.warns(UserWarning, match=r"its manifest t.safetensors.json is unreadable"):
        assert torch.equal(build(cache, setup, world=1)[0][0], truth)
    token_cache_manifest(cache).unlink()
    with pytest.warns(UserWarning, match=r"shards but no manifest t.safetensors.json \(an interrupted build\)"):
        build(cache, setup, world=1)


LEGACY = {"tokenizer_sha256": "a" * 64, "num_items": N, "kind": "procedural", "root": "", "split": "train",
          "image_size": 16, "num_samples": N, "num_classes": 4, "seed": 3, "num_tokens": 30}


def test_old_single_file_cache_is_read_when_intact_and_rebuilt_otherwise(tmp_path, setup):
    _, _, truth, labels = setup
    cache = tmp_path / "old.pt"  # the shipped configs name it like this
    write_legacy_token_cache(cache, LEGACY, truth, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = build_token_cache(cache, IDENTITY, N, refuse, 0, 1, lambda: None, True, progress=False,
                                legacy_identity=LEGACY, chunk=CHUNK)
    assert torch.equal(got[0], truth) and torch.equal(got[1], labels) and cache.is_file()  # left as it is
    with pytest.warns(UserWarning, match=r"old.pt: stale \(built for other seed\); rebuilding it"):
        build_token_cache(cache, IDENTITY, N, encoder(setup), 0, 1, lambda: None, True, progress=False,
                          legacy_identity={**LEGACY, "seed": 4}, chunk=CHUNK)
    assert not cache.exists() and json.loads(token_cache_manifest(cache).read_text())["version"] == 2  # replaced

    write_legacy_token_cache(cache, LEGACY, truth, labels)
    cache.write_bytes(cache.read_bytes()[:-8])
    with pytest.warns(UserWarning, match=r"old.pt: corrupt \(its sha256 does not match old.pt.json\)"):
        got = build_token_cache(cache, IDENTITY, N, encoder(setup), 0, 1, lambda: None, True, progress=False,
                                legacy_identity=LEGACY, chunk=CHUNK)
    assert torch.equal(got[0], truth)
    write_legacy_token_cache(cache, LEGACY, truth, labels)
    with pytest.warns(UserWarning, match=r"stale \(an older single-file cache built for other image settings\)"):
        build_token_cache(cache, IDENTITY, N, encoder(setup), 0, 1, lambda: None, True, progress=False,
                          legacy_identity=None, chunk=CHUNK)


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_a_pickled_cache_is_never_unpickled(tmp_path, setup):
    _, _, truth, _ = setup
    cache, marker = tmp_path / "old.pt", tmp_path / "marker"
    torch.save({"tokens": Payload(marker)}, cache)  # the pre-safetensors format, here a malicious one
    torch.load(cache, weights_only=False)  # guard: this file does run code when unpickled
    assert marker.exists()
    marker.unlink()
    with pytest.warns(UserWarning, match=r"no manifest old.pt.json beside it"):
        got = build_token_cache(cache, IDENTITY, N, encoder(setup), 0, 1, lambda: None, True, progress=False,
                                legacy_identity=LEGACY, chunk=CHUNK)
    assert torch.equal(got[0], truth) and not marker.exists() and not cache.exists()


TWO_PROCESS_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from accelerate import Accelerator
from tokenizers import VQVAE, VQVAEConfig
from training.data import ProceduralShapes
from training.token_cache import build_token_cache
torch.manual_seed(0)
vae = VQVAE(VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4))).eval()
data = ProceduralShapes(40, vae.config.image_size, num_classes=4, seed=3)
state = Accelerator(cpu=True).state  # torchrun-style workers with no GPU visible: a gloo group
seen = []
def encode_fn(indices):
    seen.extend(indices)
    with torch.no_grad():
        imgs = torch.stack([data[i][0] for i in indices])
        return torch.cat(vae.img_to_tokens(imgs), dim=1).to(torch.int32), torch.tensor([data[i][1] for i in indices])
identity = {"tokenizer_sha256": "a" * 64, "dataset": "d" * 64, "image_size": 16, "num_tokens": 30}
tokens, labels = build_token_cache(sys.argv[1], identity, 40, encode_fn, state.process_index, state.num_processes,
                                   state.wait_for_everyone, state.is_main_process, progress=False, chunk=8)
save_file({"tokens": tokens, "labels": labels, "seen": torch.tensor(seen)}, f"{sys.argv[1]}.rank{state.process_index}")
"""


def test_a_real_two_process_build_equals_the_one_rank_cache(tmp_path, setup):
    """accelerate launch, 2 CPU processes (gloo; about 20 s here): each encodes its block, both return every token."""
    _, _, truth, labels = setup
    script = tmp_path / "build.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    cache = tmp_path / "cache" / "tokens.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    str(script), str(cache)], check=True, cwd=REPO, env=env, timeout=300)
    seen = []
    for r in range(2):
        out = load_file(f"{cache}.rank{r}")
        assert torch.equal(out["tokens"], truth) and torch.equal(out["labels"], labels)
        seen.append(out["seen"].tolist())
    assert seen == [list(range(*block)) for block in shard_ranges(N, 2, 8)]

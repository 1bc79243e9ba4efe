"""hf:// checkpoint URIs against a Hugging Face cache built here by hand, laid out as huggingface_hub writes it
(models--OWNER--REPO/{blobs,refs,snapshots}); a guard makes any socket connection fail the test."""
from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

import training.checkpoint
from training.checkpoint import load_any
from training.hub import HubFileError, resolve_path

SHIPPED_VAE = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist" / "tokenizer.safetensors"
MAIN, OLD, TAGGED = "a" * 40, "b" * 40, "c" * 40  # commit hashes: refs/main, an older one, refs/v1


def add_file(cache: Path, repo_id: str, commit: str, filename: str, data: bytes) -> Path:
    """One file of one snapshot: the content lives in blobs/<sha256>, the snapshot holds a relative symlink."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(*[".."] * (len(filename.split("/")) + 1), "blobs", blob.name))
    return link


def set_ref(cache: Path, repo_id: str, ref: str, commit: str) -> None:
    path = cache / f"models--{repo_id.replace('/', '--')}" / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(commit)  # no newline: huggingface_hub uses the file's text verbatim as the commit


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails (as on a machine without network) and is recorded."""
    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access refused by the test")
    attempts: list = []
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def hub(tmp_path, monkeypatch, no_network):
    home = tmp_path / "hf_home"
    cache = home / "hub"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_file(cache, "owner/repo", MAIN, "model.pth", b"main weights")
    add_file(cache, "owner/repo", MAIN, "sub/dir/nested.bin", b"nested")
    add_file(cache, "owner/repo", OLD, "model.pth", b"old weights")
    add_file(cache, "owner/repo", TAGGED, "model.pth", b"tagged weights")
    set_ref(cache, "owner/repo", "main", MAIN)
    set_ref(cache, "owner/repo", "v1", TAGGED)
    yield cache
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        assert no_network == [], "offline mode must not even try to connect"


def test_plain_paths_pass_through_unchanged(tmp_path):
    for p in ("checkpoints/fmnist/tokenizer.safetensors", "relative.pth", str(tmp_path / "x.pth"), "C:/odd@name.pth"):
        assert resolve_path(p) == Path(p)
    assert resolve_path(tmp_path) == tmp_path


def test_uri_resolves_to_the_cached_snapshot_file(hub):
    got = resolve_path("hf://owner/repo/model.pth")
    assert got == hub / "models--owner--repo" / "snapshots" / MAIN / "model.pth"
    assert got.read_bytes() == b"main weights"
    assert resolve_path("hf://owner/repo/sub/dir/nested.bin").read_bytes() == b"nested"


def test_revision_selects_commit_or_ref(hub):
    assert resolve_path(f"hf://owner/repo/model.pth@{OLD}").read_bytes() == b"old weights"
    assert resolve_path("hf://owner/repo/model.pth@v1").read_bytes() == b"tagged weights"
    assert resolve_path("hf://owner/repo/model.pth@main").read_bytes() == b"main weights"


def test_hf_hub_cache_takes_precedence_over_hf_home(hub, tmp_path, monkeypatch):
    other = tmp_path / "other_cache"
    add_file(other, "owner/repo", OLD, "model.pth", b"from HF_HUB_CACHE")
    set_ref(other, "owner/repo", "main", OLD)
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert resolve_path("hf://owner/repo/model.pth").read_bytes() == b"from HF_HUB_CACHE"


@pytest.mark.parametrize("uri", ["hf://owner", "hf://owner/repo", "hf://owner/repo/", "hf://owner//model.pth",
                                 "hf://owner/repo/model.pth@", "hf://owner/repo/../x.pth", "hf://-bad/repo/x.pth"])
def test_malformed_uri_is_one_line_with_the_expected_form(uri):
    with pytest.raises(ValueError) as info:
        resolve_path(uri)
    msg = str(info.value)
    assert "\n" not in msg and uri in msg and "hf://OWNER/REPO/FILE@REVISION" in msg


def test_file_not_cached_while_offline_names_it_and_the_fix(hub):
    with pytest.raises(HubFileError) as info:
        resolve_path("hf://owner/repo/missing.pth")
    msg = str(info.value)
    assert "\n" not in msg and "owner/repo/missing.pth" in msg
    assert "hf download owner/repo missing.pth" in msg and "unset HF_HUB_OFFLINE" in msg
    assert isinstance(info.value, FileNotFoundError)  # callers that handle missing files keep working
    with pytest.raises(HubFileError, match="not in the Hugging Face cache"):
        resolve_path("hf://someone/absent/model.pth")  # no repo folder at all


def test_unknown_revision_while_offline_names_the_revision(hub):
    with pytest.raises(HubFileError) as info:
        resolve_path("hf://owner/repo/model.pth@v9")
    msg = str(info.value)
    assert "revision 'v9' of owner/repo" in msg and "--revision v9" in msg and "\n" not in msg
    with pytest.raises(HubFileError, match=f"owner/repo/model.pth@{'d' * 40}"):
        resolve_path(f"hf://owner/repo/model.pth@{'d' * 40}")  # a commit that was never fetched


def test_unreachable_hub_without_offline_flag_is_one_line(hub, monkeypatch, no_network):
    """Online mode with every connection refused: a cached commit still resolves, an uncached file says why."""
    import time

    import huggingface_hub.constants
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # frozen at its first import
    monkeypatch.setattr(time, "sleep", lambda s: None)  # its retry back-off would wait ~23 s
    assert resolve_path(f"hf://owner/repo/model.pth@{OLD}").read_bytes() == b"old weights"  # commit: no lookup
    with pytest.raises(HubFileError) as info:
        resolve_path("hf://owner/repo/missing.pth")
    msg = str(info.value)
    assert "\n" not in msg and "Hub is unreachable" in msg and "hf download owner/repo missing.pth" in msg
    assert no_network, "the online path should have tried (and failed) to connect"


def _shipped_copy(hub: Path) -> str:
    data = SHIPPED_VAE.read_bytes()
    add_file(hub, "me/fmnist", MAIN, "tokenizer.safetensors", data)
    set_ref(hub, "me/fmnist", "main", MAIN)
    return "hf://me/fmnist/tokenizer.safetensors"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resolved_shipped_model_loads_through_load_any(hub):
    uri = _shipped_copy(hub)
    _same_weights(load_any(resolve_path(uri), "vqvae"), load_any(SHIPPED_VAE, "vqvae"))


_WIRED = "resolve_path" in inspect.getsource(training.checkpoint)


@pytest.mark.xfail(not _WIRED, reason="load_any does not call training.hub.resolve_path yet", strict=True)
def test_load_any_takes_hub_uri(hub):
    uri = _shipped_copy(hub)
    _same_weights(load_any(uri, "vqvae"), load_any(SHIPPED_VAE, "vqvae"))

"""Checkpoints on the Hugging Face Hub: `hf://OWNER/REPO/FILE[@REVISION]` wherever a checkpoint path is taken.

The file goes through huggingface_hub's own cache (HF_HOME / HF_HUB_CACHE), so a file fetched once -- by this
code, by `hf download`, or copied over with the cache folder -- is reused, and HF_HUB_OFFLINE=1 never touches the
network. Plain paths pass through untouched, and huggingface_hub is imported only for hf:// URIs.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

SCHEME = "hf://"
EXPECTED = "hf://OWNER/REPO/FILE or hf://OWNER/REPO/FILE@REVISION (e.g. hf://FoundationVision/var/var_d16.pth)"
# Hub repo ids: letters, digits, '-', '_', '.'; FILE may be nested ('sub/dir/model.pth').
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubFileError(FileNotFoundError):
    """A hub checkpoint that cannot be had: not cached while offline, unreachable, or no such revision/file."""


def is_hub_uri(path_or_uri) -> bool:
    return isinstance(path_or_uri, str) and path_or_uri.startswith(SCHEME)


def parse_uri(uri: str) -> tuple[str, str, str | None]:
    """(repo_id, filename, revision or None); a one-line ValueError showing the expected form otherwise."""
    rest = uri[len(SCHEME):]
    revision = None
    if "@" in rest:  # the revision follows the file, so a revision like 'refs/pr/1' keeps its slashes
        rest, revision = rest.rsplit("@", 1)
    parts = rest.split("/")
    bad = (len(parts) < 3 or not all(_NAME.fullmatch(p) for p in parts[:2])
           or any(p in ("", ".", "..") for p in parts[2:]) or revision == "")
    if bad:
        raise ValueError(f"malformed Hub URI {uri!r}: expected {EXPECTED}")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:]), revision


def hub_cache_dir() -> Path:
    """The cache huggingface_hub uses, read from the environment now (its own constants are frozen at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).upper() in {"1", "ON", "YES", "TRUE"}


def _prefetch(repo_id: str, filename: str, revision: str | None) -> str:
    return f"`hf download {repo_id} {filename}" + (f" --revision {revision}`" if revision else "`")


def _revision_cached(cache: Path, repo_id: str, revision: str) -> bool:
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    return (repo_dir / "refs" / revision).is_file() or (repo_dir / "snapshots" / revision).is_dir()


def resolve_path(path_or_uri: str | os.PathLike) -> Path:
    """A local path for a checkpoint argument: plain paths unchanged, hf:// URIs through the Hub cache."""
    if not is_hub_uri(path_or_uri):
        return Path(path_or_uri)
    uri = str(path_or_uri)
    repo_id, filename, revision = parse_uri(uri)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    cache, is_offline = hub_cache_dir(), offline()
    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache,
                                    local_files_only=is_offline))
    except RevisionNotFoundError:
        raise HubFileError(f"{uri}: revision {revision!r} not found in Hub repository {repo_id}; "
                           f"use an existing branch, tag or commit hash") from None
    except RepositoryNotFoundError:
        raise HubFileError(f"{uri}: Hub repository {repo_id} not found (private or gated repositories need "
                           f"`hf auth login` first)") from None
    except LocalEntryNotFoundError as err:  # before EntryNotFoundError: it is one of those too
        if is_offline:
            what = (f"revision {revision!r} of {repo_id}" if revision and not _COMMIT.fullmatch(revision)
                    and not _revision_cached(cache, repo_id, revision) else where)
            raise HubFileError(f"{uri}: {what} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 "
                               f"forbids downloading; pre-fetch it with {_prefetch(repo_id, filename, revision)} "
                               f"(same HF_HOME) or unset HF_HUB_OFFLINE") from None
        cause = f" ({type(err.__cause__).__name__})" if err.__cause__ else ""
        raise HubFileError(f"{uri}: the Hugging Face Hub is unreachable{cause} and {where} is not in the cache "
                           f"{cache}; check the connection, or pre-fetch it with "
                           f"{_prefetch(repo_id, filename, revision)} where there is one and copy the cache "
                           f"folder (HF_HOME)") from None
    except EntryNotFoundError:
        raise HubFileError(f"{uri}: Hub repository {repo_id} has no file {filename!r}"
                           + (f" at revision {revision!r}" if revision else "")) from None

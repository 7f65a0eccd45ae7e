"""What a cache entry is keyed by: the *content* of the files that change its result, never their path.

A path can hold another LoRA tomorrow (a retrained run in the same folder), so every cache the project
writes keys its entries with these: a file's SHA-256 (files over ``FULL_HASH_LIMIT``: size, modification
time and the SHA-256 of their first and last MiB, which covers a safetensors header and its tail,
because hashing a 3.4 GB UNet at every evaluation would take longer than the evaluation's first image),
a folder's files, and for a Hub model its resolved commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

FULL_HASH_LIMIT = 256 * 2**20
EDGE = 2**20  # bytes hashed at each end of a file over FULL_HASH_LIMIT


def sha256_file(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_key(path: str) -> str:
    """SHA-256 of the file; for a file over FULL_HASH_LIMIT, size + mtime + SHA-256 of its two ends."""
    size = os.path.getsize(path)
    if size <= FULL_HASH_LIMIT:
        return sha256_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(EDGE))
        handle.seek(size - EDGE)
        digest.update(handle.read(EDGE))
    return f"{size}:{os.stat(path).st_mtime_ns}:{digest.hexdigest()}"


def folder_key(folder: str) -> list[list[str]]:
    """[relative path, file_key] of every file under ``folder`` (hidden files and folders skipped)."""
    entries = []
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                path = os.path.join(root, name)
                entries.append([os.path.relpath(path, folder), file_key(path)])
    return entries


def path_key(path: str) -> list[list[str]] | str:
    """The content key of a local file or folder."""
    return file_key(path) if os.path.isfile(path) else folder_key(path)


def hub_commit(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str:
    """The commit a Hub repository's ``revision`` resolves to: asked of the Hub, or (offline) read from the
    local cache's snapshot; a repository in neither raises OSError."""
    from huggingface_hub import constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        from huggingface_hub import HfApi

        try:
            return HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha
        except Exception:  # noqa: BLE001 - no network or no access: the local snapshot below, if any
            pass
    try:
        folder = snapshot_download(repo_id, revision=revision, repo_type=repo_type, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - every failure means the same: no commit can be named
        raise OSError(f"{repo_id!r}: neither the Hub nor the local cache names its commit ({error})") from error
    return os.path.basename(os.path.normpath(folder))


def source_key(name_or_path: str, revision: str | None = None, repo_type: str = "model") -> dict:
    """A model, LoRA or dataset by content: a local file or folder by its files, a Hub id by its commit."""
    if os.path.exists(name_or_path):
        return {"files": path_key(name_or_path)}
    return {"hub": name_or_path, "commit": hub_commit(name_or_path, revision, repo_type)}


def run_inputs(prompts: list[str] | None, reward_spec: str, unet: str | None = None) -> dict[str, str]:
    """What a run reads beyond its flags, by content: the prompts (whatever file or dataset revision they
    came from), every custom reward file of the spec and a local --unet; recorded in ``run.json``, so resuming
    after any of them changed is refused like a changed flag."""
    inputs = {"prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()} if prompts else {}
    if unet is not None and os.path.exists(unet):
        inputs[f"content of {unet}"] = json.dumps(path_key(unet))
    for part in re.split(r"[,|]", reward_spec):
        location = part.strip().rsplit(":", 1)[0]
        if location.endswith(".py") and os.path.isfile(location):
            inputs[f"sha256 of {location}"] = sha256_file(location)
    return inputs

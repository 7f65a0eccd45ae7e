"""What a run or an evaluation will fetch from the Hugging Face Hub, checked before anything loads.

A resource is ``owner/repo`` (a whole repository, as ``from_pretrained`` reads it), ``owner/repo:file``
(one file, as ``hf_hub_download`` reads it) or ``owner/repo/sub/folder`` (a folder of a repository).
One already in the local cache is fine; one that is not needs the Hub, which is probed once (a single
request with a short timeout). With ``HF_HUB_OFFLINE=1``, or a Hub that cannot be reached, a missing
resource stops the run at once, naming the flag and what to do, instead of the minutes of retries
``from_pretrained`` spends before its own error.
"""

from __future__ import annotations

import functools
import os

PROBE_TIMEOUT = 5.0  # seconds for the one request that tells whether the Hub can be reached


def is_local(name: str) -> bool:
    return os.path.exists(name)


def looks_like_a_path(name: str) -> bool:
    """A name no Hub id can be (absolute, relative to here, or home): a missing one is a missing file."""
    return name.startswith(("/", "./", "../", "~")) or os.sep != "/" and os.sep in name


def is_cached(resource: str) -> bool:
    """Whether the local Hugging Face cache already holds ``resource``."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    repo, _, filename = resource.partition(":")
    parts = repo.split("/")
    repo_id, folder = "/".join(parts[:2]), "/".join(parts[2:])
    if filename:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    try:
        snapshot = snapshot_download(repo_id, allow_patterns=[f"{folder}/*"] if folder else None, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or not a valid id: both mean "fetch"
        return False
    return os.path.isdir(os.path.join(snapshot, folder)) if folder else True


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One request to the Hub's endpoint (``HF_ENDPOINT``), answered within PROBE_TIMEOUT seconds."""
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=PROBE_TIMEOUT)
    except OSError as error:  # URLError, timeouts, refused connections; an HTTP error status still answered
        return getattr(error, "code", None) is not None
    return True


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_available(needs: dict[str, list[str]]) -> None:
    """``needs``: flag -> the Hub resources it will fetch. Raises OSError naming the first one that is not
    cached when the Hub cannot serve it (offline, or unreachable)."""
    for flag, resources in needs.items():
        for resource in resources:
            if is_local(resource.partition(":")[0]):
                continue
            if looks_like_a_path(resource):
                raise FileNotFoundError(f"{flag} {resource!r}: no such file or folder")
            if is_cached(resource):
                continue
            if offline():
                raise OSError(f"{flag} needs {resource!r} from the Hub, which is not in the local cache, and "
                              "HF_HUB_OFFLINE is set: download it first (unset HF_HUB_OFFLINE) or give a local path")
            if not hub_reachable():
                raise OSError(f"{flag} needs {resource!r} from the Hub, which is not in the local cache, and the Hub "
                              f"cannot be reached (no answer within {PROBE_TIMEOUT:g} s): connect, or give a local "
                              "path, or set HF_HUB_OFFLINE=1 to use only cached files")

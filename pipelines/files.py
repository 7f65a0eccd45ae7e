"""Output files that are never half-written: everything a run writes goes to a temporary file beside
its destination and is renamed into place, so an interrupted or disk-full write leaves the previous
version (or nothing), never a truncated file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp alone gives 0600)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(handle)
    os.chmod(staging, FILE_MODE)
    try:
        yield staging
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(staging)
        raise


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as staging, open(staging, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())  # on the disk before it replaces the old version


def write_json(path: str, data) -> None:
    """Standard JSON only: a NaN or infinity raises here (say why a value is undefined and write null)."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False))


def finite_or_none(value):
    """``value`` with every non-finite float replaced by None (null): for logged data, where a value can
    be undefined (a spread of one sample) and strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def save_image(image, path: str) -> None:
    """A PIL image or a matplotlib figure (anything with ``save``/``savefig``), in the format of ``path``."""
    extension = os.path.splitext(path)[1].lstrip(".") or "png"
    with atomic_path(path) as staging:
        if hasattr(image, "savefig"):
            image.savefig(staging, format=extension)
        else:
            image.save(staging, format=extension.upper().replace("JPG", "JPEG"))

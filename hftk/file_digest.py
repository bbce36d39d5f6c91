"""A file's sha256, remembered under the hftk cache by where the file is, its size and its modification
time (as make and git judge a change): a second start on unchanged data reads none of its bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from hftk.cache import cache_root

DIGESTS = "file_digests"  # the folder under the hftk cache


def identity(path: Path) -> list | None:
    """(resolved path, size, mtime in ns), or None when the path is not a file."""
    path = Path(path).expanduser().resolve()
    try:
        found = path.stat()
    except OSError:
        return None
    return [str(path), found.st_size, found.st_mtime_ns] if path.is_file() else None


def file_sha256(path: Path) -> str:
    known = identity(path)
    entry = _entry(known) if known else None
    if entry is not None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            remembered = json.loads(entry.read_text())
            if remembered["identity"] == known:
                return remembered["sha256"]
    digest = hashlib.sha256()
    with Path(path).expanduser().open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if entry is not None and identity(path) == known:  # unchanged while it was read
        _remember(entry, {"identity": known, "sha256": value})
    return value


def _entry(known: list) -> Path:
    return cache_root() / DIGESTS / f"{hashlib.sha256(json.dumps(known).encode()).hexdigest()}.json"


def _remember(entry: Path, value: dict) -> None:
    """Best effort: a cache that cannot be written only makes the next start read the file again."""
    partial = entry.with_name(f".{entry.name}.{os.getpid()}.partial")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(value))
        os.replace(partial, entry)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()

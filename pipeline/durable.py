"""Durable file writes, checksums, safe manifest names and node-local locks, shared by prepared
data and checkpoints."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durably(path: Path, payload: Any) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def check_relative_name(name: str, where: str) -> str:
    """A file name read from a manifest must stay inside its directory: no absolute paths, no `..`."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or "\\" in name or any(part == ".." for part in parts):
        raise ValueError(f"{where}: refusing file name {name!r} (absolute or leaving the directory)")
    return name


@contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of one node (flock on `path`), held while the
    block runs: e.g. the ranks on a node that would otherwise prepare or download the same files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

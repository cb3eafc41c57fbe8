"""`dcgan prepare`: a source becomes uint8 shards + manifest, written atomically.

The shards are written into a temporary sibling directory and renamed into place only when
complete, so an interrupted prepare never leaves a directory that looks usable. Preparation
holds a node lock, so several processes on one node never prepare the same directory at once.

`data.prepared_dir` may also be a storage URI: the shards are built on local disk and
uploaded with the manifest last, and every node stages them to its own disk once (under the
same kind of lock), verifying each shard's sha256 (`local_prepared_dir`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import DataSection
from pipeline.data import sources
from pipeline.data.shards import FORMAT, MANIFEST, ShardWriter, parse_manifest
from pipeline.data.sources import DataError
from pipeline.durable import fsync_dir, node_lock, sha256_file, write_json_durably

log = logging.getLogger(__name__)


def prepare(cfg: DataSection, force: bool = False) -> dict[str, Any]:
    """Write the shards for `cfg` (replacing existing ones only with `force`); return the manifest."""
    with _prepare_lock(cfg):
        address = cfg.resolved_prepared_dir()
        if storage.location(address).exists(MANIFEST) and not force:
            raise DataError(f"{address} is already prepared; pass --force to rebuild it")
        return _prepare(cfg)


def _prepare_lock(cfg: DataSection):
    address = cfg.resolved_prepared_dir()
    if storage.is_uri(address):
        local = storage.cache_dir_for("prepared", address)
        return node_lock(local.with_name(local.name + ".lock"))
    target = Path(address)
    return node_lock(target.parent / f".{target.name}.lock")


def _prepare(cfg: DataSection) -> dict[str, Any]:
    address = cfg.resolved_prepared_dir()
    if storage.is_uri(address):
        return _prepare_and_upload(cfg, address)
    target = Path(address)
    _check_replaceable(target)
    description = sources.describe(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = _write_shards(cfg, staging, description)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _prepare_and_upload(cfg: DataSection, address: str) -> dict[str, Any]:
    """Build the shards where this node stages them, then upload them, the manifest last."""
    local = storage.cache_dir_for("prepared", address)
    shutil.rmtree(local, ignore_errors=True)
    manifest = _prepare(cfg.model_copy(update={"prepared_dir": str(local)}))
    remote = storage.location(address)
    remote.delete()  # --force: no old shard may sit under the new manifest
    try:
        remote.upload(local, "", last=[MANIFEST])
    except OSError as err:
        raise DataError(f"data.prepared_dir {address!r}: upload failed ({err})") from None
    return manifest


def _check_replaceable(target: Path) -> None:
    """Refuse a target that holds anything but shards: the swap below deletes what it replaces.

    Without this, data.prepared_dir pointed at the image folder (or any other directory) by
    mistake would be deleted once the new shards are written.
    """
    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and ((target / MANIFEST).exists() or not any(target.iterdir())):
        return
    raise DataError(
        f"data.prepared_dir {str(target)!r} exists and is not a prepared directory (no {MANIFEST}); "
        "refusing to replace it: choose another data.prepared_dir or remove it"
    )


def _write_shards(cfg: DataSection, staging: Path, description: dict[str, Any]) -> dict[str, Any]:
    writer = ShardWriter(staging, (cfg.image_size, cfg.image_size, cfg.channels), cfg.shard_size)
    skipped = []
    started = time.monotonic()
    for name, value in sources.take_images(sources.iterate(cfg), cfg.max_images):
        if isinstance(value, np.ndarray):
            writer.add(value)
        else:
            skipped.append({"path": name, "reason": value})
            log.warning("skipped %s: %s", name, value)
    writer.flush()
    if writer.count == 0:
        raise DataError(
            f"data.source={cfg.source}: no usable images"
            + (f" under {cfg.root} ({len(skipped)} files skipped, e.g. {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else "")
        )
    manifest = {
        "format": FORMAT,
        "count": writer.count,
        "shape": [cfg.image_size, cfg.image_size, cfg.channels],
        "dtype": "uint8",
        "shards": writer.shards,
        "source": description,
        "skipped_count": len(skipped),
        "skipped": skipped,
        "seconds": round(time.monotonic() - started, 3),
    }
    write_json_durably(staging / MANIFEST, manifest)
    fsync_dir(staging)
    return manifest


def _swap_into_place(staging: Path, target: Path) -> None:
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def ensure_prepared(cfg: DataSection) -> str:
    """The prepared directory (path or URI) for `cfg`, preparing it on first use. Runs once per
    job, on the driver, before any rank starts.

    Shards made from a different source description are never silently reused or replaced:
    that is an error naming both descriptions.
    """
    address = cfg.resolved_prepared_dir()
    with _prepare_lock(cfg):
        location = storage.location(address)
        if not location.exists(MANIFEST):
            manifest = _prepare(cfg)
            log.info("prepared %d images into %s (%d skipped)", manifest["count"], address, manifest["skipped_count"])
            return address
        try:
            found = parse_manifest(location.read_text(MANIFEST), f"{address}/{MANIFEST}")["source"]
        except (ValueError, KeyError) as err:
            raise DataError(f"{address}/{MANIFEST} is unreadable ({err}); rebuild it with dcgan prepare --force") from None
    wanted = sources.describe(cfg)
    if found != wanted:
        raise DataError(
            f"{address} was prepared from {found}, but the config asks for {wanted}; "
            "set data.prepared_dir to another directory or rebuild with dcgan prepare --force"
        )
    return address


def local_prepared_dir(cfg: DataSection) -> Path:
    """The prepared shards on this node's disk: the directory itself, or for a URI a node-local
    copy made once per node under a lock, every shard checked against the manifest's sha256."""
    address = cfg.resolved_prepared_dir()
    if not storage.is_uri(address):
        if not (Path(address) / MANIFEST).is_file():
            raise DataError(f"data.prepared_dir {address!r} holds no prepared data ({MANIFEST} missing) on this node")
        return Path(address)
    local = storage.cache_dir_for("prepared", address)
    remote = storage.location(address)
    with _prepare_lock(cfg):
        try:
            manifest = parse_manifest(remote.read_text(MANIFEST), f"{address}/{MANIFEST}")
        except FileNotFoundError:
            raise DataError(f"data.prepared_dir {address!r} holds no prepared data ({MANIFEST} missing)") from None
        local.mkdir(parents=True, exist_ok=True)
        for shard in manifest["shards"]:
            path = local / shard["file"]
            if path.is_file() and sha256_file(path) == shard["sha256"]:
                continue  # staged before by this node
            partial = path.with_name(path.name + ".part")
            try:
                remote.download_file(shard["file"], partial)
            except OSError as err:
                raise DataError(f"{address}/{shard['file']}: cannot download ({err})") from None
            if sha256_file(partial) != shard["sha256"]:
                partial.unlink()
                raise DataError(f"{address}/{shard['file']}: its sha256 differs from the manifest's")
            os.replace(partial, path)
        write_json_durably(local / MANIFEST, manifest)
    return local

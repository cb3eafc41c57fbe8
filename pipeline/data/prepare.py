"""`dcgan prepare`: a source becomes uint8 shards + manifest, written atomically.

The shards are written into a temporary sibling directory and renamed into place only when
complete, so an interrupted prepare never leaves a directory that looks usable.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataSection
from pipeline.data import sources
from pipeline.data.shards import FORMAT, MANIFEST, ShardWriter, read_manifest
from pipeline.durable import fsync_dir, write_json_durably
from pipeline.data.sources import DataError

log = logging.getLogger(__name__)


def prepare(cfg: DataSection, force: bool = False) -> dict[str, Any]:
    """Write the shards for `cfg` (replacing existing ones only with `force`); return the manifest."""
    target = cfg.resolved_prepared_dir()
    if (target / MANIFEST).exists() and not force:
        raise DataError(f"{target} is already prepared; pass --force to rebuild it")
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


def ensure_prepared(cfg: DataSection) -> Path:
    """The prepared directory for `cfg`, preparing it on first use.

    Shards made from a different source description are never silently reused or replaced:
    that is an error naming both descriptions.
    """
    target = cfg.resolved_prepared_dir()
    if not (target / MANIFEST).exists():
        manifest = prepare(cfg)
        log.info("prepared %d images into %s (%d skipped)", manifest["count"], target, manifest["skipped_count"])
        return target
    try:
        found = read_manifest(target)["source"]
    except (ValueError, KeyError) as err:
        raise DataError(f"{target / MANIFEST} is unreadable ({err}); rebuild it with dcgan prepare --force") from None
    wanted = sources.describe(cfg)
    if found != wanted:
        raise DataError(
            f"{target} was prepared from {found}, but the config asks for {wanted}; "
            "set data.prepared_dir to another directory or rebuild with dcgan prepare --force"
        )
    return target

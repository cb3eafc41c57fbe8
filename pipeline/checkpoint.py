"""The checkpoint directory protocol, independent of any tensor format.

    <run>/checkpoints/
        step-00001200/          complete: every file fsynced, manifest.json written last
            manifest.json       step, framework, world size, config, sha256 of every file
            ...                 whatever the backend and the loop wrote
        step-00001200.tmp/      in progress (or left by a crash): never read
        LATEST                  name of the newest complete checkpoint, replaced atomically

A save writes into `step-N.tmp/`, fsyncs, writes the manifest, renames the directory to
`step-N/`, fsyncs the parent, then replaces LATEST. A crash at any point leaves either the
previous checkpoint set or the new one, never a partial checkpoint that passes verification.
Discovery trusts only manifests whose checksums verify; a corrupt checkpoint is skipped with
a warning that names it, and the next older one is used.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.durable import fsync_dir, sha256_file, write_json_durably

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "LATEST"
FORMAT = "dcgan-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: incomplete, corrupt, or made for another model."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def verify(path: Path) -> CheckpointInfo:
    """Check the manifest and every file's sha256; raise CheckpointError naming what failed."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete or not a checkpoint)") from None
    except (OSError, ValueError) as err:  # ValueError: bad JSON, and bytes that are not UTF-8
        raise CheckpointError(f"{manifest_path}: unreadable ({err})") from None
    # The manifest is not covered by its own checksums, so a damaged one may still parse: any
    # shape but the one save() writes must be a CheckpointError, or latest() crashes instead of
    # falling back to the previous checkpoint.
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path}: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"{manifest_path}: malformed (needs an integer step and a files mapping)")
    for name, expected in files.items():
        file_path = path / name
        if not file_path.is_file():
            raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
        if sha256_file(file_path) != expected:
            raise CheckpointError(f"{path}: checksum mismatch in {name}")
    return CheckpointInfo(path, manifest)


def write_checkpoint(final: Path, step: int, write_files: Callable[[Path], None], metadata: dict[str, Any]) -> Path:
    """One complete checkpoint directory at `final`, through `<final>.tmp` (see the module doc)."""
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_files(staging)
        files = {str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "step": step, "created": time.time(), "files": files, **metadata}
        _fsync_tree(staging)
        # The manifest goes last: a directory without one is never treated as complete.
        write_json_durably(staging / MANIFEST, manifest)
        fsync_dir(staging)
        if final.exists():  # re-saving a step (e.g. a rerun after a crash): replace it whole
            shutil.rmtree(final)
        staging.rename(final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _fsync_tree(directory: Path) -> None:
    for item in sorted(directory.rglob("*")):
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    for sub in sorted(p for p in directory.rglob("*") if p.is_dir()):
        fsync_dir(sub)
    fsync_dir(directory)


class CheckpointManager:
    """Writes, retains and discovers the checkpoints of one run."""

    def __init__(self, directory: Path, keep: Optional[int]):
        """keep=None: never delete complete checkpoints (retention is someone else's, e.g. Ray's)."""
        assert keep is None or keep >= 2, "keep >= 2 is enforced by the config"
        self.directory = Path(directory)
        self.keep = keep

    def save(self, step: int, write_files: Callable[[Path], None], metadata: dict[str, Any]) -> Path:
        """`write_files(tmp_dir)` writes the payload; the protocol above does the rest."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = write_checkpoint(self.directory / step_dir_name(step), step, write_files, metadata)
        self._write_latest(final.name)
        self._prune()
        return final

    def _write_latest(self, name: str) -> None:
        tmp = self.directory / (LATEST + ".tmp")
        with open(tmp, "w") as handle:
            handle.write(name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.directory / LATEST)
        fsync_dir(self.directory)

    def complete_steps(self) -> list[Path]:
        """Step directories with a manifest, newest first (checksums not yet verified)."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def _prune(self) -> None:
        for old in self.complete_steps()[self.keep :] if self.keep is not None else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def latest(self) -> Optional[CheckpointInfo]:
        """The newest checkpoint that verifies; corrupt ones are skipped with a warning."""
        for path in self.complete_steps():
            try:
                return verify(path)
            except CheckpointError as err:
                log.warning("skipping checkpoint %s: %s; falling back to the previous one", path, err)
        return None

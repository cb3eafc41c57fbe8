"""The checkpoint directory protocol, independent of any tensor format.

    <run>/checkpoints/
        step-00001200/          complete: every file written, manifest.json written last
            manifest.json       step, framework, world size, config, sha256 of every file,
                                the job that wrote it and the checkpoint that job started from
            ...                 whatever the backend and the loop wrote
        step-00001200.tmp/      in progress (or left by a crash): never read
        LATEST                  name of the newest complete checkpoint, replaced whole
            scores.json         its eval/* scores and their provenance card, when it was scored
                                after it was written (Ray's asynchronous evaluation); scored
                                before, they are in the manifest
        BEST                    name of the best checkpoint by eval/fid (when evaluated): the
                                first scored, then each that beats it by more than the noise on
                                the same provenance card; retention never deletes it, nor a
                                checkpoint whose evaluation is pending
        abandoned-<time>/       steps set aside by an explicit resume of an older step

On a filesystem a save writes into `step-N.tmp/`, fsyncs, writes the manifest, renames the
directory to `step-N/`, fsyncs the parent, then replaces LATEST. In object storage (no rename,
no fsync) the directory is staged on local disk and uploaded file by file, the manifest last
and LATEST after it. Both are one path (`publish_checkpoint`): the checkpoint is written whole
on this node, then its storage Location publishes it (a rename, or an upload). Either way a
crash leaves the previous checkpoint set or the new one, never a partial checkpoint that
passes verification.

Discovery reads LATEST first and falls back to scanning when it is missing or does not verify;
it trusts only manifests whose checksums verify; a corrupt checkpoint is skipped with a warning
that names it, and the next older one is used. Checkpoints in object storage are downloaded to
node-local disk and verified there before anything loads them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from pipeline import storage
from pipeline.durable import check_relative_name, fsync_dir, node_lock, sha256_file, write_json_durably
from pipeline.storage import Location, PathOrUri

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "LATEST"
BEST = "BEST"
SCORES = "scores.json"
PENDING = "pending"  # a manifest's "evaluation" while its scores are still to come
FORMAT = "dcgan-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class Score:
    """What BEST ranks by: eval/fid, its noise (eval/fid_std; 0 = not measured) and the key of
    its provenance card (only scores with equal keys are compared)."""

    value: float
    std: float = 0.0
    card_key: Optional[str] = None

    def record(self) -> dict[str, Any]:
        return {"score": self.value if math.isfinite(self.value) else None, "score_std": self.std, "card_key": self.card_key}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: incomplete, corrupt, or made for another model."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path  # a complete, verified copy on this node's disk
    manifest: dict[str, Any]
    source: str = ""  # where it lives in the run's storage (a path or a URI); "" = at `path`

    @property
    def address(self) -> str:
        """What another process, on any node, passes to `fetch` to get this checkpoint."""
        return self.source or str(self.path)

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]


def step_of(name: str) -> int:
    """The step a step directory's name (step_dir_name) holds."""
    return int(name.removeprefix("step-"))


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
        try:
            check_relative_name(name, str(manifest_path))
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        file_path = path / name
        if not file_path.is_file():
            raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
        if sha256_file(file_path) != expected:
            raise CheckpointError(f"{path}: checksum mismatch in {name}")
    return CheckpointInfo(path, manifest)


def publish_checkpoint(
    location: Location, name: str, step: int, write_files: Callable[[Path], None], metadata: dict[str, Any]
) -> Path:
    """The one save path, for a filesystem and for object storage alike: the checkpoint is
    written whole on this node (the location's staging directory), its manifest last, then the
    location publishes it (see the module doc). Returns the complete copy on this node."""
    staging = location.staging_dir(name)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write_files(staging)
        files = {str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "step": step, "created": time.time(), "files": files, **metadata}
        _fsync_tree(staging)
        # The manifest goes last: a directory without one is never treated as complete.
        write_json_durably(staging / MANIFEST, manifest)
        fsync_dir(staging)
        return location.publish(staging, name, last=[MANIFEST])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_checkpoint(final: Path, step: int, write_files: Callable[[Path], None], metadata: dict[str, Any]) -> Path:
    """One complete checkpoint directory at the path `final` (dcgan convert's output)."""
    return publish_checkpoint(storage.LocalLocation(final.parent), final.name, step, write_files, metadata)


def _fsync_tree(directory: Path) -> None:
    for item in sorted(directory.rglob("*")):
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    for sub in sorted(p for p in directory.rglob("*") if p.is_dir()):
        fsync_dir(sub)
    fsync_dir(directory)


def fetch(address: PathOrUri) -> CheckpointInfo:
    """A verified checkpoint from a path (read in place) or a URI (downloaded to this node once,
    under a lock, so the ranks of one node share one copy).

    A node's copy is keyed on the remote manifest's content, not only on the address: a step
    name is written again after `--fresh`, an older-step resume or a dry run, and a copy of the
    old one verifies against its own manifest. A copy is downloaded into a sibling and renamed
    into place whole, so a reader never sees a torn one."""
    if not storage.is_uri(address):
        return verify(Path(address))
    address = str(address)
    location = storage.location(address)
    try:
        remote_manifest = location.read_text(MANIFEST)
    except OSError as err:
        raise CheckpointError(f"{address}: cannot read its {MANIFEST} ({err})") from None
    cached = storage.cache_dir_for("checkpoints", address)
    local = cached / hashlib.sha256(remote_manifest.encode()).hexdigest()[:16]
    with node_lock(cached.with_name(cached.name + ".lock")):
        try:
            return CheckpointInfo(local, verify(local).manifest, address)
        except CheckpointError:
            pass  # not downloaded yet, or a damaged copy: fetch it again
        staged = local.with_name(local.name + ".partial")
        shutil.rmtree(staged, ignore_errors=True)
        try:
            location.download("", staged)
        except OSError as err:
            shutil.rmtree(staged, ignore_errors=True)
            raise CheckpointError(f"{address}: cannot download ({err})") from None
        try:
            info = verify(staged)
            if (staged / MANIFEST).read_text() != remote_manifest:
                raise CheckpointError(f"{address}: rewritten while it was being downloaded; fetch it again")
        except CheckpointError:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        for other in cached.iterdir():
            if other != staged:
                shutil.rmtree(other, ignore_errors=True)  # an older content of this address, or a damaged copy
        staged.rename(local)
        return CheckpointInfo(local, info.manifest, address)


class CheckpointManager:
    """Writes, retains and discovers the checkpoints of one run, on a filesystem or by URI."""

    def __init__(
        self,
        directory: Union[PathOrUri, Location],
        keep: Optional[int],
        job: Optional[str] = None,
        best_margin: float = 0.0,
        started_from: Optional[str] = None,
    ):
        """keep=None: never delete complete checkpoints. `job`: recorded in every manifest this
        manager writes, so a job can tell its own checkpoints from older ones. `best_margin`:
        how many standard deviations of the difference (eval.best_margin) a score must beat
        BEST's by to take its place. `started_from`: the checkpoint the job started from (a
        resume, or another run's: a sweep's PBT exploit), recorded in every manifest it writes."""
        assert keep is None or keep >= 2, "keep >= 2 is enforced by the config"
        self.location = directory if isinstance(directory, Location) else storage.location(directory)
        self.keep, self.job, self.best_margin, self.started_from = keep, job, best_margin, started_from

    @property
    def directory(self) -> str:
        return str(self.location)

    def save(
        self,
        step: int,
        write_files: Callable[[Path], None],
        metadata: dict[str, Any],
        score: Union[None, float, Score] = None,
        evaluation_pending: bool = False,
    ) -> CheckpointInfo:
        """`write_files(tmp_dir)` writes the payload; the protocol above does the rest. `score`
        (lower is better, e.g. FID; NaN = not measured) makes it BEST when it beats the current
        best (`becomes_best`). `evaluation_pending`: its scores come later (`record_scores`),
        and retention keeps it until they have."""
        name = step_dir_name(step)
        metadata = {**metadata, "job": self.job} if self.job else metadata
        if self.started_from:
            metadata["started_from"] = self.started_from
        score = Score(score) if isinstance(score, (int, float)) else score
        if score is not None:
            metadata.update(score.record())
        if evaluation_pending:
            metadata["evaluation"] = PENDING
        local = publish_checkpoint(self.location, name, step, write_files, metadata)
        info = CheckpointInfo(local, _read_manifest(local), "" if self.location.is_local else str(self.location.child(name)))
        self.location.write_text(LATEST, name + "\n")
        if score is not None and self.becomes_best(score):
            self.location.write_text(BEST, name + "\n")
        self._prune()
        return info

    def record_scores(self, name: str, score: Score, scores: dict[str, float], card: dict[str, Any]) -> bool:
        """The scores of a checkpoint evaluated after it was written, beside its manifest
        (rewriting the manifest would make every node's copy of it stale). Returns whether it
        became BEST. BEST is written first: until scores.json exists the checkpoint counts as
        pending, so retention cannot delete it in between. Retention itself stays the writing
        job's (its next save): pruning from here could remove a save in progress."""
        best = self.becomes_best(score)
        if best:
            self.location.write_text(BEST, name + "\n")
        self.location.write_text(f"{name}/{SCORES}", json.dumps({"scores": scores, "card": card, **score.record()}))
        return best

    def record_failure(self, name: str, error: str) -> None:
        """An evaluation that failed: the checkpoint stays unscored, and retention may delete it."""
        self.location.write_text(f"{name}/{SCORES}", json.dumps({"error": error, "score": None}))

    def scores(self, name: str) -> Optional[dict[str, Any]]:
        """A checkpoint's ranking record (score, score_std, card_key; scores and card when
        known), from scores.json or its manifest; None when it has none or is unreadable."""
        for file in (SCORES, MANIFEST):
            try:
                record = json.loads(self.location.read_text(f"{name}/{file}"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                return None
            return record if isinstance(record, dict) and "score" in record else None
        return None

    def becomes_best(self, score: Score) -> bool:
        """Whether `score` takes BEST's place: it is finite, and BEST has no score, or one on
        another provenance card (a new ranking starts, as the log says), or it is beaten by
        more than `best_margin` standard deviations of the difference."""
        if not math.isfinite(score.value):
            return False
        best = self.best_name()
        record = self.scores(best) if best else None
        if record is None or record.get("score") is None:
            return True
        if record.get("card_key") != score.card_key:
            log.warning("%s: scored on another provenance card (%s) than BEST %s (%s): a new ranking starts",
                        self.location, score.card_key, best, record.get("card_key"))  # fmt: skip
            return True
        margin = self.best_margin * math.hypot(score.std, float(record.get("score_std") or 0.0))
        return score.value < float(record["score"]) - margin

    def best_name(self) -> Optional[str]:
        return self._pointer(BEST)

    def _pointer(self, pointer: str) -> Optional[str]:
        """The step directory a pointer file (LATEST, BEST) names; None if absent or not a step name."""
        try:
            name = self.location.read_text(pointer).strip()
        except (FileNotFoundError, OSError, UnicodeDecodeError):
            return None
        return name if _STEP_DIR.match(name) else None

    def best_score(self) -> float:
        """The score the BEST checkpoint records; infinity when there is none."""
        name = self.best_name()
        record = self.scores(name) if name else None
        try:
            return float(record["score"]) if record else math.inf
        except (TypeError, ValueError):
            return math.inf  # unreadable: the next scored checkpoint takes its place

    def complete_steps(self) -> list[str]:
        """Names of step directories with a manifest, newest first (checksums not yet verified)."""
        found = [n for n in self.location.list() if _STEP_DIR.match(n) and self.location.exists(f"{n}/{MANIFEST}")]
        return sorted(found, reverse=True)

    def fetch(self, name: str) -> CheckpointInfo:
        return fetch(self.location.path / name if self.location.is_local else str(self.location.child(name)))

    def _prune(self) -> None:
        complete = self.complete_steps()
        best = self.best_name()
        for old in complete[self.keep :] if self.keep is not None else []:
            if old != best and not self.evaluation_pending(old):
                self.location.delete(old)
        for name in self.location.list():
            if name.startswith("step-") and name.endswith(".tmp"):
                self.location.delete(name)  # left by a crash mid-save
            elif not self.location.is_local and _STEP_DIR.match(name) and name not in complete:
                self.location.delete(name)  # an upload cut short: no manifest, never read

    def evaluation_pending(self, name: str) -> bool:
        """Its scores are still to come: written for evaluation apart, unscored, and by this
        manager's job (a pending evaluation of an ended job will never come: Ray's pending
        validations end with their fit)."""
        try:
            manifest = json.loads(self.location.read_text(f"{name}/{MANIFEST}"))
        except (OSError, ValueError):
            return False
        if not isinstance(manifest, dict) or manifest.get("evaluation") != PENDING:
            return False
        if self.job is not None and manifest.get("job") != self.job:
            return False
        return not self.location.exists(f"{name}/{SCORES}")

    def latest_name(self) -> Optional[str]:
        return self._pointer(LATEST)

    def latest(self, job: Optional[str] = None) -> Optional[CheckpointInfo]:
        """The checkpoint LATEST names if it verifies, else the newest one that does; with
        `job`, only checkpoints that job wrote (their manifests are read before anything is
        downloaded or hashed)."""
        pointed = self.latest_name()
        candidates = ([pointed] if pointed else []) + [n for n in self.complete_steps() if n != pointed]
        if job is not None:
            candidates = [n for n in candidates if self._written_by(n) == job]
        for name in candidates:
            try:
                return self.fetch(name)
            except CheckpointError as err:
                log.warning("skipping checkpoint %s: %s; falling back to the previous one", name, err)
        return None

    def _written_by(self, name: str) -> Optional[str]:
        try:
            return json.loads(self.location.read_text(f"{name}/{MANIFEST}")).get("job")
        except (OSError, ValueError, AttributeError):
            return None  # unreadable: verification will say why, if it is ever a candidate

    def set_aside_after(self, step: int, keep_name: Optional[str] = None) -> Optional[str]:
        """An explicit resume of an older step starts a new line: the newer steps of the old
        line move to abandoned-<time>/, out of reach of auto-resume and retention. Returns
        where they went (None when there were none)."""
        newer = [n for n in self.location.list() if _STEP_DIR.match(n) and step_of(n) > step]
        if not newer:
            return None
        target = f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
        for name in newer:
            self.location.move(name, f"{target}/{name}")
        if keep_name is not None:
            self.location.write_text(LATEST, keep_name + "\n")
        elif self.latest_name() in newer:
            self.location.delete(LATEST)
        if self.best_name() in newer:  # the best of the abandoned line is no candidate any more
            self.location.delete(BEST)
        log.warning("resuming from step %d: moved the newer steps %s to %s/%s", step, ", ".join(newer), self.location, target)
        return target


def _read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text())

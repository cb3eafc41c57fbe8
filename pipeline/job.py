"""The job: what every rank runs, decided once by the driver.

`plan` runs in the `dcgan train` process before any rank starts. It checks the input, makes
paths absolute, prepares the data, and settles where the run starts: the checkpoint LATEST
names (else the newest that verifies), `--resume DIR`, or step 0 with `--fresh`. An explicit
resume of an older step sets the newer steps aside, so neither a later auto-resume nor
retention touches the abandoned line. The result is a `Job`, a small picklable value that a
runner ships to every rank unchanged: the runner does not know whether it runs a training run
or a dry run, and there is one home for the start of a run.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import config, storage
from pipeline.checkpoint import CheckpointError, CheckpointInfo, CheckpointManager, fetch
from pipeline.config import Config, model_mismatch
from pipeline.context import LOCAL, RankContext
from pipeline.data import ensure_prepared
from pipeline.loop import CheckpointHook, no_checkpoint_hook
from pipeline.stopping import STOP_FILE, LeaseToken, RankStop, Stop, lease_poll, stop_file_poll

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartOptions:
    fresh: bool = False  # never resume; an existing run directory is moved aside, not deleted
    resume: Optional[str] = None  # resume from this checkpoint (a path or a URI)


@dataclass(frozen=True)
class Job:
    config: dict[str, Any]  # the resolved config, every path absolute
    start: Optional[str] = None  # the verified checkpoint to start from (path or URI); None = step 0
    dry_run_steps: Optional[int] = None  # a dry run of this many steps in <run>-dryrun
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # stamped into its checkpoints
    lease: Optional[LeaseToken] = None  # the run's lease its driver holds, watched by rank 0

    def __post_init__(self) -> None:
        if isinstance(self.lease, dict):  # shipped to the ranks as plain data (dataclasses.asdict)
            object.__setattr__(self, "lease", LeaseToken(**self.lease))

    @cached_property
    def cfg(self) -> Config:
        return config.validate(self.config, "the driver's resolved config")

    @property
    def run_address(self) -> str:
        return run_address(self.cfg, self.dry_run_steps is not None)

    @property
    def total_steps(self) -> int:
        """The step at which the job is done."""
        steps = self.cfg.train.steps
        return steps if self.dry_run_steps is None else min(steps, self.dry_run_steps)

    def run(
        self,
        ctx: RankContext = LOCAL,
        on_checkpoint: CheckpointHook = no_checkpoint_hook,
        stop_requested: Callable[[], Stop] = lambda: Stop.NONE,
        restart: Optional[str] = None,
        on_ready: Callable[[], None] = lambda: None,
    ) -> Optional[dict[str, Any]]:
        """This rank's part of the job. `stop_requested`: what this process was asked (its
        runner's SIGTERM handler, a drain notice); rank 0 also watches the run's storage
        (pipeline.stopping). `restart`: a checkpoint a distributed runner restored
        after a failure inside one run (used if it verifies). `on_ready` runs once the
        framework is set up, before the first step. Returns the final metrics, or for a dry run
        the report (on the chief)."""
        if self.dry_run_steps is not None:
            from pipeline.dryrun import dry_run

            return dry_run(self.cfg, ctx, self.dry_run_steps, on_checkpoint, self.run_address)
        from pipeline.session import TrainingSession

        start = self._start(restart)
        with self._rank_stop(ctx, stop_requested) as stop, TrainingSession(
            self.cfg, ctx, start, self.run_address, None, on_checkpoint, stop, self.id
        ) as session:
            on_ready()
            summary = session.run()
        return {**summary.last_metrics, "step": summary.end_step}

    def _rank_stop(self, ctx: RankContext, requested: Callable[[], Stop]) -> RankStop:
        polls = []
        if ctx.is_chief:  # the storage is watched once, for all ranks
            polls.append(stop_file_poll(storage.location(self.run_address)))
            if self.lease is not None:
                polls.append(lease_poll(self.lease))
        return RankStop(requested, polls, self.cfg.checkpoint.stop_poll_seconds)

    def _start(self, restart: Optional[str]) -> Optional[CheckpointInfo]:
        """The driver's start, unless this job has checkpointed since (a restart inside it)."""
        if restart is not None:
            try:
                return fetch(restart)
            except CheckpointError as err:
                log.warning("the restored checkpoint %s does not verify (%s); falling back", restart, err)
        # Also when the runner restored nothing: Ray registers a reported checkpoint only at its
        # next poll of the workers, so a failure just after a save can precede the registration.
        own = _checkpoints(self.cfg).latest(job=self.id)
        if own is not None:
            return own
        return fetch(self.start) if self.start is not None else None

    def result(self, last_metrics: dict[str, Any]) -> dict[str, Any]:
        """What the driver reports once every rank is done (ranks may live in other processes)."""
        if self.dry_run_steps is not None:
            from pipeline.dryrun import read_report

            return read_report(self.run_address)
        return last_metrics


def run_dir_name(cfg: Config, dry_run: bool) -> str:
    """The directory the job writes, below cfg.runs_root: the run, or for a dry run its scratch sibling."""
    return f"{cfg.run.name}-dryrun" if dry_run else cfg.run.name


def run_address(cfg: Config, dry_run: bool) -> str:
    return storage.join(cfg.runs_root, run_dir_name(cfg, dry_run))


def plan(
    cfg: Config, options: StartOptions = StartOptions(), dry_run_steps: Optional[int] = None, lease: Optional[LeaseToken] = None
) -> Job:
    """Check, prepare and settle the start, on the driver; the caller holds the run's `lease`."""
    cfg = with_absolute_paths(cfg)
    ensure_prepared(cfg.data)  # once, here, not by N ranks at the same time
    if dry_run_steps is not None:
        storage.location(run_address(cfg, True)).delete()  # every dry run starts from an empty scratch dir
        return Job(cfg.to_dict(), None, dry_run_steps, lease=lease)
    if options.fresh:
        move_aside(cfg)
    # A STOP request is the job's it stopped (or a driver killed before it could remove it):
    # a new job starts without one.
    storage.location(cfg.run_address).delete(STOP_FILE)
    checkpoints = _checkpoints(cfg)
    start = select_start(cfg, checkpoints, options)
    if options.resume is not None and start is not None:
        own = start.address.rstrip("/").rpartition("/")[0] == str(checkpoints.location).rstrip("/")
        checkpoints.set_aside_after(start.step, keep_name=Path(start.address).name if own else None)
    return Job(cfg.to_dict(), start.address if start else None, lease=lease)


def _checkpoints(cfg: Config) -> CheckpointManager:
    return CheckpointManager(storage.join(cfg.run_address, "checkpoints"), cfg.checkpoint.keep)


def with_absolute_paths(cfg: Config) -> Config:
    """Ranks may start in another directory: every path they get is absolute (URIs stay)."""

    def absolute(value: Optional[str]) -> Optional[str]:
        return value if value is None or storage.is_uri(value) else str(Path(value).resolve())

    cfg = cfg.model_copy(deep=True)
    cfg.runtime.storage_path = absolute(cfg.runs_root)
    cfg.data.prepared_dir = absolute(cfg.data.resolved_prepared_dir())
    if cfg.data.root is not None:
        cfg.data.root = Path(absolute(str(cfg.data.root)))
    return cfg


def select_start(cfg: Config, checkpoints: CheckpointManager, options: StartOptions) -> Optional[CheckpointInfo]:
    """The checkpoint to resume from, or None for a fresh start; never a silent fresh start."""
    if options.resume is not None:
        info = fetch(options.resume)
    elif options.fresh:
        return None
    else:
        info = checkpoints.latest()
        if info is None and checkpoints.complete_steps():
            raise CheckpointError(
                f"no checkpoint in {checkpoints.directory} verifies (see the warnings above); "
                "pass --resume PATH to pick one, or --fresh to start over (the old run directory is kept)"
            )
    if info is None:
        return None
    framework = info.manifest.get("framework")
    if framework != cfg.backend:
        raise CheckpointError(
            f"{info.address} was written by backend {framework!r}, the config asks for {cfg.backend!r}; "
            f"convert it with: dcgan convert {info.address} --to {cfg.backend} --out NEW_DIR, then --resume NEW_DIR"
        )
    diffs = model_mismatch(info.config, cfg)
    if diffs:
        raise CheckpointError(f"{info.address} does not fit this config:\n  " + "\n  ".join(diffs))
    return info


def move_aside(cfg: Config) -> Optional[str]:
    """--fresh keeps the previous run: <run> becomes <run>.replaced-<time>."""
    parent = storage.location(cfg.runs_root)
    if not parent.list(cfg.run.name):
        return None
    target = f"{cfg.run.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    parent.move(cfg.run.name, target)
    log.info("--fresh: moved the previous run to %s", storage.join(cfg.runs_root, target))
    return target

"""One rank's training session: choose where to start, build, run the loop, close on every path.

The local runner runs one session in-process; a distributed runner runs one per rank with
that rank's RankContext.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline import tensorboard as tb
from pipeline.backends import Backend, create_backend
from pipeline.checkpoint import CheckpointError, CheckpointInfo, CheckpointManager, verify
from pipeline.config import Config, model_mismatch
from pipeline.context import LOCAL, RankContext
from pipeline.data import DataError, ShardedImages, ensure_prepared
from pipeline.loop import CheckpointHook, LoopSummary, TrainerState, no_checkpoint_hook, run_loop
from pipeline.progress import Progress, make_progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartOptions:
    fresh: bool = False  # never resume; an existing run directory is moved aside, not deleted
    resume: Optional[Path] = None  # resume from this checkpoint directory


def select_start(cfg: Config, checkpoints: CheckpointManager, options: StartOptions) -> Optional[CheckpointInfo]:
    """The checkpoint to resume from, or None for a fresh start; never a silent fresh start."""
    if options.resume is not None:
        info = verify(options.resume)
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
            f"{info.path} was written by backend {framework!r}, the config asks for {cfg.backend!r}; "
            f"convert it with: dcgan convert {info.path} --to {cfg.backend} --out NEW_DIR, then --resume NEW_DIR"
        )
    diffs = model_mismatch(info.config, cfg)
    if diffs:
        raise CheckpointError(f"{info.path} does not fit this config:\n  " + "\n  ".join(diffs))
    return info


def move_aside(run_dir: Path) -> Optional[Path]:
    """--fresh keeps the previous run: <run> becomes <run>.replaced-<time>."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    target = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(target)
    log.info("--fresh: moved the previous run to %s", target)
    return target


class TrainingSession:
    """Everything one rank holds while training; use as a context manager so it always closes.

    Only the chief writes (run directory, config, events, checkpoints); every rank trains.
    """

    def __init__(
        self,
        cfg: Config,
        ctx: RankContext = LOCAL,
        options: StartOptions = StartOptions(),
        run_dir: Optional[Path] = None,
        progress: Optional[Progress] = None,
        on_checkpoint: CheckpointHook = no_checkpoint_hook,
        prune_checkpoints: bool = True,
    ):
        self.cfg, self.ctx, self.on_checkpoint = cfg, ctx, on_checkpoint
        self.run_dir = Path(run_dir or cfg.run_dir)
        # Everything that can reject the input runs before the first write to the run directory.
        self.images = ShardedImages(ensure_prepared(cfg.data))
        if len(self.images) < cfg.train.global_batch_size:
            raise DataError(
                f"{self.images.directory} holds {len(self.images)} images, fewer than one global batch "
                f"(train.global_batch_size={cfg.train.global_batch_size})"
            )
        keep = cfg.checkpoint.keep if prune_checkpoints else None
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep)
        self.start = select_start(cfg, self.checkpoints, options)
        if ctx.is_chief:
            if options.fresh:
                move_aside(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.dump_yaml())

        self.backend: Backend = create_backend(cfg, ctx)
        self.state = TrainerState()
        if self.start is not None:
            self.backend.load(self.start.path)
            self.state = TrainerState.read(self.start.path)
            saved_world = self.start.manifest.get("world_size", 1)
            log.info("resuming from %s (step %d, written by %d rank(s), now %d)",
                     self.start.path, self.state.step, saved_world, ctx.world_size)  # fmt: skip
        self.writer = tb.open_writer(self.run_dir, ctx.is_chief, purge_step=self.state.step + 1 if self.start else None)
        if self.start is None:
            self.writer.hparams(tb.flat_hparams(cfg.to_dict()), {tag: 0.0 for tag in tb.SCALAR_TAGS})
        self.progress = progress or make_progress(ctx.is_chief)

    def run(self, total_steps: Optional[int] = None) -> LoopSummary:
        return run_loop(
            self.cfg, self.ctx, self.backend, self.images, self.state,
            self.checkpoints, self.writer, self.progress, total_steps, self.on_checkpoint,
        )  # fmt: skip

    def close(self) -> None:
        self.progress.close()
        self.writer.close()
        self.backend.close()

    def __enter__(self) -> "TrainingSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

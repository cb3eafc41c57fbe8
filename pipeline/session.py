"""One rank's training session: build from the start the driver chose, run the loop, close on
every path.

The local runner runs one session in-process; a distributed runner runs one per rank with
that rank's RankContext. Where the run starts is decided before, once, by the driver
(pipeline.job); a session only loads it.
"""

from __future__ import annotations

import logging
from typing import Optional

from pipeline import storage
from pipeline import tensorboard as tb
from pipeline.backends import Backend, create_backend
from pipeline.checkpoint import CheckpointInfo, CheckpointManager
from pipeline.config import Config
from pipeline.context import LOCAL, RankContext
from pipeline.data import DataError, ShardedImages, local_prepared_dir
from pipeline.loop import CheckpointHook, LoopSummary, StopCheck, TrainerState, never_stop, no_checkpoint_hook, run_loop
from pipeline.progress import Progress, make_progress

log = logging.getLogger(__name__)


class TrainingSession:
    """Everything one rank holds while training; use as a context manager so it always closes.

    Only the chief writes (run directory, config, events, checkpoints); every rank trains.
    """

    def __init__(
        self,
        cfg: Config,
        ctx: RankContext = LOCAL,
        start: Optional[CheckpointInfo] = None,
        run_address: Optional[str] = None,
        progress: Optional[Progress] = None,
        on_checkpoint: CheckpointHook = no_checkpoint_hook,
        stop_requested: StopCheck = never_stop,
        job_id: Optional[str] = None,
    ):
        self.cfg, self.ctx, self.start, self.stop_requested = cfg, ctx, start, stop_requested
        self.run_files = storage.RunDirectory(run_address or cfg.run_address)
        self.run_dir = self.run_files.local  # on this node: the run itself, or its mirror of a URI run
        # Everything that can reject the input runs before the first write to the run directory.
        self.images = ShardedImages(local_prepared_dir(cfg.data))
        if len(self.images) < cfg.train.global_batch_size:
            raise DataError(
                f"{self.images.directory} holds {len(self.images)} images, fewer than one global batch "
                f"(train.global_batch_size={cfg.train.global_batch_size})"
            )
        self.checkpoints = CheckpointManager(
            self.run_files.location.child("checkpoints"), cfg.checkpoint.keep, job_id, cfg.eval.best_margin,
            started_from=start.address if start is not None else None,
        )
        self.backend: Backend = create_backend(cfg, ctx)  # may refuse the devices or the batch split
        self.quality = None  # the chief alone evaluates in-line; may refuse a missing weights file
        if cfg.eval.every and ctx.is_chief and not ctx.evaluates_apart:
            from pipeline.quality import open_evaluator

            self.quality = open_evaluator(cfg, self.images.directory, self.backend.framework, _torch_device(self.backend))
        if ctx.is_chief:
            if start is None:
                self.run_files.start_fresh()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.dump_yaml())

        self.state = TrainerState()
        if start is not None:
            self.backend.load(start.path)
            self.state = TrainerState.read(start.path)
            saved_world = start.manifest.get("world_size", 1)
            log.info("resuming from %s (step %d, written by %d rank(s), now %d)",
                     start.address, self.state.step, saved_world, ctx.world_size)  # fmt: skip
        purge_step = self.state.step + 1 if start else None
        self.writer = tb.open_writer(self.run_dir, ctx.is_chief, purge_step)
        # Opened under either way of evaluating: a resumed run's file hides the scores an
        # interrupted line logged past its start.
        self.eval_writer = tb.open_eval_writer(self.run_dir, purge_step) if cfg.eval.every and ctx.is_chief else None
        if start is None:
            scores = {tag: tb.EVAL_RUN for tag in (tb.TAG_EVAL_FID, tb.TAG_EVAL_FID_STD)} if cfg.eval.every else {}
            self.writer.hparams(tb.flat_hparams(cfg.to_dict()), {**dict.fromkeys(tb.SCALAR_TAGS, ""), **scores})
        self.progress = progress or make_progress(ctx.is_chief)

        def on_checkpoint_synced(step: int, saved: Optional[CheckpointInfo], metrics: dict[str, float]) -> None:
            if ctx.is_chief:  # events and samples reach the run's storage with each checkpoint
                self.writer.flush()
                if self.eval_writer is not None:
                    self.eval_writer.flush()
                self.run_files.sync()
            on_checkpoint(step, saved, metrics)

        self.on_checkpoint = on_checkpoint_synced

    def run(self, total_steps: Optional[int] = None) -> LoopSummary:
        return run_loop(
            self.cfg, self.ctx, self.backend, self.images, self.state, self.checkpoints,
            self.writer, self.progress, total_steps, self.on_checkpoint, self.stop_requested, self.quality,
            self.eval_writer,
        )  # fmt: skip

    def close(self) -> None:
        if self.quality is not None:
            self.quality.close()
        self.progress.close()
        self.writer.close()
        if self.eval_writer is not None:
            self.eval_writer.close()
        if self.ctx.is_chief:
            self.run_files.sync()
        self.backend.close()

    def __enter__(self) -> "TrainingSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _torch_device(backend: Backend) -> str:
    """Where in-line evaluation computes its features: torch's training device; a TensorFlow
    chief's evaluating process (torch) uses the CPU, as TensorFlow holds the GPU's memory."""
    return str(backend.device) if backend.framework == "torch" else "cpu"

"""The framework-free training loop: cadence, the non-finite guard, logging and checkpoints.

Driven by a step count over never-ending data iterators. Metrics stay on the device and are
summed there; the host reads them only at log cadence (and at checkpoint and final steps,
which also close a log window so a resumed run logs exactly what an uninterrupted one does).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

import numpy as np

from pipeline import tensorboard as tb
from pipeline.backends.base import Backend, NonFiniteError, latent_noise
from pipeline.checkpoint import CheckpointInfo, CheckpointManager, Score, step_dir_name
from pipeline.config import Config
from pipeline.context import RankContext
from pipeline.data.sharding import DataPosition, EpochSharder
from pipeline.data.shards import ShardedImages
from pipeline.images import make_grid
from pipeline.progress import Progress
from pipeline.stopping import LeaseLost, Preempted, Stop, agree

log = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer.json"

# Called on every rank at every checkpoint step with (step, the checkpoint on the chief else
# None, the metrics of the closing log window); a distributed runner hands it to its framework.
CheckpointHook = Callable[[int, Optional[CheckpointInfo], dict[str, float]], None]

# Asked on every rank at the same steps: must this rank stop, and how (pipeline.stopping)?
# The loop agrees on the most severe answer over all ranks.
StopCheck = Callable[[], Stop]


class QualityCheck(Protocol):
    """Scores a set of generated uint8 images (pipeline.quality.evaluator.Evaluator)."""

    def evaluate(self, images: np.ndarray) -> dict[str, float]: ...

    def card(self, num_generated: int, latent_seed: int, generator: str) -> dict[str, Any]: ...


EVAL_NOISE_SEED = 2**31 - 1  # the same latents at every evaluation: the curve tracks G, not the draw
# In the metrics each checkpoint step hands its hook: this checkpoint is to be evaluated apart
# (RankContext.evaluates_apart), and what Ray ranks checkpoints by: eval/fid where it became
# BEST, NaN where not (unscored, or within the noise of BEST), so Ray's best is BEST.
EVAL_REQUESTED = "eval/requested"
RANKED_FID = "eval/ranked_fid"


def no_checkpoint_hook(step: int, saved: Optional[CheckpointInfo], metrics: dict[str, float]) -> None:
    pass


def never_stop() -> Stop:
    return Stop.NONE


def every(step: int, interval: int) -> bool:
    """The one cadence rule: true on steps interval, 2*interval, ..."""
    return interval > 0 and step % interval == 0


@dataclass
class TrainerState:
    """What the loop itself needs to resume; the backend saves the tensors."""

    step: int = 0
    position: DataPosition = DataPosition()

    def write(self, directory: Path) -> None:
        payload = {"step": self.step, "position": self.position.to_dict()}
        (Path(directory) / TRAINER_STATE_FILE).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "TrainerState":
        payload = json.loads((Path(directory) / TRAINER_STATE_FILE).read_text())
        return cls(step=int(payload["step"]), position=DataPosition.from_dict(payload["position"]))


@dataclass
class LoopSummary:
    start_step: int
    end_step: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    window_step_ms: list[float] = field(default_factory=list)  # mean step time of each log window
    checkpoints: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def steady_step_ms(self) -> float:
        """Median window step time, leaving out the first window (warm-up) when there are more."""
        windows = self.window_step_ms[1:] or self.window_step_ms
        return statistics.median(windows) if windows else float("nan")


class _Window:
    """Device-side metric sums over the steps since the last log point."""

    def __init__(self, first_step: int):
        self.first_step = first_step
        self.sums: dict[str, Any] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, metrics: Mapping[str, Any]) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1


def run_loop(
    cfg: Config,
    ctx: RankContext,
    backend: Backend,
    images: ShardedImages,
    state: TrainerState,
    checkpoints: CheckpointManager,
    writer: tb.NullWriter,
    progress: Progress,
    total_steps: Optional[int] = None,
    on_checkpoint: CheckpointHook = no_checkpoint_hook,
    stop_requested: StopCheck = never_stop,
    quality: Optional[QualityCheck] = None,
    eval_writer: Optional[tb.NullWriter] = None,
) -> LoopSummary:
    """`quality`: on the chief when eval.every is set and it evaluates in-line (None elsewhere),
    writing eval/* to `eval_writer`; each evaluation step is also a checkpoint step, so the best
    checkpoint by FID is one that exists. Under `ctx.evaluates_apart` the chief only marks each
    evaluation step's checkpoint as pending and asks the hook for its evaluation."""
    total = cfg.train.steps if total_steps is None else total_steps
    sharder = EpochSharder(
        len(images), cfg.train.global_batch_size, cfg.train.seed, ctx.rank, ctx.world_size, state.position
    )
    batches = backend.batches(images, sharder)
    summary = LoopSummary(start_step=state.step, end_step=state.step)
    window = _Window(state.step + 1)
    last_checkpoint_step = state.step
    drain_checkpointed = False  # a drain notice stays up until the node goes: one checkpoint for it
    started = time.perf_counter()
    progress.start(total, state.step)
    for step in range(state.step + 1, total + 1):
        window.add(backend.train_step(next(batches), step))
        last = step == total
        eval_now = every(step, cfg.eval.every)
        save_now = every(step, cfg.checkpoint.every) or last or eval_now
        # A collective at its own cadence, and before every save: every rank learns of a stop
        # at the same step, and nothing is written once the run is another job's.
        stop = Stop.NONE
        if every(step, cfg.checkpoint.stop_check_every) or save_now:
            stop = agree(stop_requested(), backend.any_rank)
        if stop is Stop.ABANDON:
            raise LeaseLost(step, getattr(stop_requested, "reason", lambda: "the run's lease is lost")())
        if stop is Stop.DRAIN and not drain_checkpointed:
            log.warning("step %d: a node of this run is being drained: checkpointing here and training on", step)
            save_now = drain_checkpointed = True
        save_now = save_now or stop is Stop.CHECKPOINT
        log_now = every(step, cfg.logging.every) or save_now or last
        if log_now:
            summary.last_metrics = _close_window(cfg, backend, window, step, last_checkpoint_step, writer, summary)
            progress.update(step, summary.last_metrics)
        if ctx.is_chief and (every(step, cfg.logging.samples_every) or last):  # the grid only the chief writes
            writer.image(tb.TAG_SAMPLES, step, make_grid(backend.sample()))
        if save_now:
            backend.synchronize_replicas()  # BatchNorm statistics agree: what is scored is what is saved
            scores, card = _evaluate(cfg, backend, quality, eval_writer or writer, step) if eval_now and quality else ({}, {})
            apart = eval_now and ctx.evaluates_apart
            trainer_state = TrainerState(step=step, position=sharder.position_after(state.position, step - state.step))
            saved = _save(cfg, ctx, backend, checkpoints, trainer_state, scores, card, evaluation_pending=apart)
            # A checkpoint not evaluated reports NaN: never the best (Ray sorts NaN last).
            ranked = {}
            if quality or ctx.evaluates_apart:
                became_best = saved is not None and scores and checkpoints.best_name() == step_dir_name(step)
                ranked = {tb.TAG_EVAL_FID: float("nan"), RANKED_FID: scores[tb.TAG_EVAL_FID] if became_best else float("nan")}
            requested = {EVAL_REQUESTED: 1.0} if apart else {}
            on_checkpoint(step, saved, {**summary.last_metrics, **ranked, **scores, **requested, "step": step})
            summary.checkpoints += [saved.path] if saved else []
            last_checkpoint_step = step
        if log_now:  # opened after sampling and saving, so step times measure training alone
            window = _Window(step + 1)
        summary.end_step = step
        if stop is Stop.CHECKPOINT and not last:
            writer.flush()
            raise Preempted(step, f"{checkpoints.directory}/{step_dir_name(step)}")
    writer.flush()
    summary.seconds = time.perf_counter() - started
    return summary


def _close_window(
    cfg: Config,
    backend: Backend,
    window: _Window,
    step: int,
    last_checkpoint_step: int,
    writer: tb.NullWriter,
    summary: LoopSummary,
) -> dict[str, float]:
    sums = backend.to_host(window.sums)  # the loop's one host sync, once per window
    if sums.pop("nonfinite", 0.0) > 0:
        newest = f"the newest checkpoint is from step {last_checkpoint_step}" if last_checkpoint_step else "no checkpoint was written"
        raise NonFiniteError(
            f"non-finite loss or gradient in steps {window.first_step}..{step}: those updates were skipped "
            f"and the run stops here; {newest}"
        )
    seconds = time.perf_counter() - window.started
    step_ms = 1000.0 * seconds / window.steps
    values = {name: total / window.steps for name, total in sums.items()}
    values[tb.TAG_STEP_TIME_MS] = step_ms
    values[tb.TAG_IMAGES_PER_SEC] = cfg.train.global_batch_size * window.steps / seconds
    summary.window_step_ms.append(step_ms)
    writer.scalars(step, values)
    return values


def _evaluate(
    cfg: Config, backend: Backend, quality: QualityCheck, writer: tb.NullWriter, step: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """The eval/* scores of the generator that samples (the EMA one when kept; G itself too with
    eval.score_raw_generator) and their provenance card."""
    z = latent_noise(cfg.eval.num_samples, cfg.model.nz, EVAL_NOISE_SEED)
    started = time.perf_counter()
    scores = quality.evaluate(backend.generate(z))
    if cfg.model.g_ema_decay and cfg.eval.score_raw_generator:
        scores[tb.TAG_EVAL_FID_WITHOUT_EMA] = quality.evaluate(backend.generate(z, averaged=False))[tb.TAG_EVAL_FID]
    card = quality.card(cfg.eval.num_samples, EVAL_NOISE_SEED, "ema" if cfg.model.g_ema_decay else "G")
    writer.scalars(step, scores)
    writer.text(tb.TAG_EVAL_CARD, step, json.dumps(card, indent=1))
    log.info("step %d: %s (%.1f s)", step, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()), time.perf_counter() - started)
    return scores, card


def _save(
    cfg: Config,
    ctx: RankContext,
    backend: Backend,
    checkpoints: CheckpointManager,
    state: TrainerState,
    scores: Optional[Mapping[str, float]] = None,
    card: Optional[Mapping[str, Any]] = None,
    evaluation_pending: bool = False,
) -> Optional[CheckpointInfo]:
    """After synchronize_replicas on every rank: the chief alone writes a checkpoint, and
    records its scores (BEST follows them; retention keeps BEST)."""
    if not ctx.is_chief:
        if backend.save_is_collective:  # e.g. MultiWorkerMirroredStrategy: a save every worker joins
            with tempfile.TemporaryDirectory(prefix="dcgan-save-") as scratch:
                backend.save(Path(scratch))
        return None

    def write_files(directory: Path) -> None:
        backend.save(directory)
        state.write(directory)

    metadata = {"framework": backend.framework, "world_size": ctx.world_size, "config": cfg.to_dict()}
    score = None
    if scores:
        metadata["scores"], metadata["card"] = dict(scores), dict(card or {})
        score = Score(scores[tb.TAG_EVAL_FID], scores.get(tb.TAG_EVAL_FID_STD, 0.0), (card or {}).get("key"))
    return checkpoints.save(state.step, write_files, metadata, score=score, evaluation_pending=evaluation_pending)

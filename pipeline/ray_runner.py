"""The Ray Train runner: the only module that imports ray.

The driver (the `dcgan train` process) checks the input, prepares the data, settles where the
run starts, then hands one worker function per rank to Ray Train's TorchTrainer. Each worker
runs the same TrainingSession as the local runner, with its rank's context; at every
checkpoint step every rank calls `ray.train.report` (a barrier), and the chief attaches the
checkpoint directory it has just written into the run directory, which is Ray's experiment
directory (storage_path/name), so Ray registers it in place instead of copying it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import config
from pipeline.checkpoint import CheckpointManager
from pipeline.config import Config
from pipeline.context import RankContext
from pipeline.data import ensure_prepared
from pipeline.session import StartOptions, TrainingSession, move_aside, select_start

class RunFailed(RuntimeError):
    """The Ray job ended without finishing; the message says why and what to do."""


def _absolute(cfg: Config) -> Config:
    """Workers may start in another directory: every path they get is absolute."""
    cfg = cfg.model_copy(deep=True)
    cfg.runtime.storage_path = cfg.runs_root.resolve()
    cfg.data.prepared_dir = cfg.data.resolved_prepared_dir().resolve()
    if cfg.data.root is not None:
        cfg.data.root = cfg.data.root.resolve()
    return cfg


def _connect(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.runtime.ray_address:
        ray.init(address=cfg.runtime.ray_address, logging_level=logging.WARNING)
        return
    # A new local Ray, reachable on loopback only. Its CPUs are logical: reserve enough for
    # the workers even on a smaller machine, as Ray Train will not start them otherwise.
    wanted = math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    ray.init(
        num_cpus=max(os.cpu_count() or 1, wanted),
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",  # the dashboard serves the state API Ray Train polls
        logging_level=logging.WARNING,
    )


def run(
    cfg: Config, options: StartOptions, dry_run_steps: Optional[int] = None, train_fn: Optional[Callable] = None
) -> dict[str, Any]:
    """Train (or dry-run) on Ray; returns the last reported metrics, or the dry-run report.

    `train_fn` replaces the per-worker function (tests wrap it to observe or kill a worker).
    """
    cfg = _absolute(cfg)
    ensure_prepared(cfg.data)  # once, here, not by N workers at the same time
    if dry_run_steps is not None:
        from pipeline.dryrun import reset_scratch_dir

        reset_scratch_dir(cfg)
        start = None
    else:
        if options.fresh:
            move_aside(cfg.run_dir)
        # Bad checkpoints and mismatched models are reported here, before any worker starts.
        checkpoints = CheckpointManager(cfg.run_dir / "checkpoints", keep=None)
        start = select_start(cfg, checkpoints, StartOptions(resume=options.resume))
    _connect(cfg)
    trainer = build_trainer(cfg, start.path if start else None, dry_run_steps, train_fn or _worker)
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker exceptions; say what failed and what to do
        raise RunFailed(_explain(err, cfg)) from None
    if dry_run_steps is not None:
        from pipeline.dryrun import read_report, scratch_dir

        return read_report(scratch_dir(cfg))
    return dict(result.metrics or {})


def build_trainer(cfg: Config, resume: Optional[Path], dry_run_steps: Optional[int], train_fn: Callable):
    """TorchTrainer (torch process group ready) or TensorflowTrainer (TF_CONFIG set)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from pipeline.dryrun import scratch_dir

    if cfg.backend == "tensorflow":
        from pipeline.backends.tf_backend.quiet import import_tensorflow

        import_tensorflow()  # before Ray's module imports it, so its banners stay quiet here
        from ray.train.tensorflow import TensorflowTrainer as Trainer
    else:
        from ray.train.torch import TorchTrainer as Trainer

    name = scratch_dir(cfg).name if dry_run_steps is not None else cfg.run.name
    return Trainer(
        train_fn,
        train_loop_config={
            "config": cfg.to_dict(),
            "resume": str(resume) if resume else None,
            "dry_run_steps": dry_run_steps,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        # The experiment directory storage_path/name is the run directory: Ray's checkpoint
        # registry, retention and restore work on the same step directories as ours.
        run_config=RunConfig(
            name=name,
            storage_path=str(cfg.runs_root),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )


def _explain(err: Exception, cfg: Config) -> str:
    failures = getattr(err, "worker_failures", None) or {}
    causes = [f"rank {rank}: {_root_message(cause)}" for rank, cause in sorted(failures.items())]
    text = "; ".join(causes) or _root_message(err)
    hint = ""
    if cfg.train.max_failures == 0 and any(_is_lost_worker(c) for c in failures.values()):
        hint = " (train.max_failures=0: set it above 0 to restart the workers from the last checkpoint)"
    return f"training on Ray failed after {cfg.train.max_failures} allowed restart(s): {text}{hint}"


def _root_message(err: BaseException) -> str:
    while getattr(err, "cause", None) is not None or err.__cause__ is not None:
        err = getattr(err, "cause", None) or err.__cause__
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__


def _is_lost_worker(err: BaseException) -> bool:
    import ray.exceptions

    return isinstance(err, (ray.exceptions.ActorDiedError, ray.exceptions.RayActorError)) or "died" in str(err)


# --- on each worker -----------------------------------------------------------------------


def _report(step: int, path: Optional[Path], metrics: dict[str, float]) -> None:
    import ray.train
    from ray.train import Checkpoint
    from ray.train.v2.api.report_config import CheckpointUploadMode

    checkpoint = Checkpoint.from_directory(str(path)) if path is not None else None
    # NO_UPLOAD: the directory already lies in the experiment directory on shared storage.
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    # Our progress lines at INFO; Ray's own loggers keep their levels.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    context = ray.train.get_context()
    ctx = RankContext(context.get_world_rank(), context.get_local_rank(), context.get_world_size())
    cfg = config.validate(loop_config["config"], "the driver's resolved config")
    steps = loop_config["dry_run_steps"]
    if steps is not None:
        from pipeline.dryrun import dry_run

        dry_run(cfg, ctx, steps, on_checkpoint=_report, prune_checkpoints=False)
        return
    # After a worker failure Ray restarts every worker; they continue from its newest checkpoint.
    restored = ray.train.get_checkpoint()
    resume = restored.path if restored is not None else loop_config["resume"]
    options = StartOptions(resume=Path(resume) if resume else None)
    with TrainingSession(cfg, ctx, options, on_checkpoint=_report, prune_checkpoints=False) as session:
        session.run()

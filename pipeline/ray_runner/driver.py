"""The driver's part: connect to Ray, start one fit of the job's ranks, explain how it ended.

The driver (the `dcgan train` process) gets a planned Job (pipeline.job: input checked, data
prepared, start settled) and ships it unchanged to every rank through the Ray Trainer of the
ranks' strategy (TorchTrainer, HorovodTrainer or TensorflowTrainer); it does not know whether
the job trains or dry-runs. Each fit has an experiment directory of its own, so a resubmit
never picks up an older fit's checkpoint pointers behind the driver's back.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pipeline import storage
from pipeline import tensorboard as tb
from pipeline.checkpoint import step_dir_name
from pipeline.config import Config, ConfigError
from pipeline.context import available_cpus
from pipeline.job import Job
from pipeline.loop import RANKED_FID
from pipeline.ray_runner.probes import Probe, remove_probes, write_probes
from pipeline.ray_runner.validation import evaluates_apart, validation_config
from pipeline.ray_runner.worker import LEASE_LOST, train_loop_per_worker
from pipeline.stopping import STOP_FILE, LeaseLost, Preempted

log = logging.getLogger(__name__)

RAY_DIR = ".ray"  # Ray Train's experiment directories, one per fit


@dataclass(frozen=True)
class RayTrainer:
    """How Ray Train starts the ranks of one data-parallel strategy."""

    path: str  # "module:Class" of its Trainer
    env: dict[str, str] = field(default_factory=dict)  # for every process of the job (driver and workers)
    scaling: dict[str, Any] = field(default_factory=dict)  # more ScalingConfig arguments


# Keyed by the ranks' strategy: distributed.strategy for torch, tf.distribute for TensorFlow.
RAY_TRAINERS = {
    "ddp": RayTrainer("ray.train.torch:TorchTrainer"),  # the torch process group ready
    # Horovod's Gloo rendezvous ready. Train V2 (Ray 2.60's default) has no HorovodTrainer, and
    # V1 chooses itself when ray.train is first imported, in each process. V1 also reserves a
    # CPU for its coordinating actor, which only waits on the workers: a cluster sized for the
    # workers would never start them.
    "horovod": RayTrainer(
        "ray.train.horovod:HorovodTrainer", env={"RAY_TRAIN_V2_ENABLED": "0"}, scaling={"trainer_resources": {"CPU": 0}}
    ),
    "tf.distribute": RayTrainer("ray.train.tensorflow:TensorflowTrainer"),  # TF_CONFIG set
}


def ray_trainer(cfg: Config) -> RayTrainer:
    return RAY_TRAINERS["tf.distribute" if cfg.backend == "tensorflow" else cfg.distributed.strategy]


class RunFailed(RuntimeError):
    """The Ray job ended without finishing; the message says why and what to do."""


def connect(cfg: Config, wanted_cpus: Optional[float] = None) -> None:
    """Join runtime.ray_address's cluster, or start a local Ray with at least `wanted_cpus`
    logical CPUs (default: what one job's workers and evaluations reserve)."""
    import ray

    trainer = ray_trainer(cfg)
    env = _job_env(trainer)
    if ray.is_initialized():
        check_connected_env(trainer)
        return
    runtime_env = {"env_vars": env} if env else None  # for the workers
    if cfg.runtime.ray_address:
        ray.init(address=cfg.runtime.ray_address, logging_level=logging.WARNING, runtime_env=runtime_env)
        return
    # runtime.ray_address decides which cluster: RAY_ADDRESS, left in the environment wherever a
    # head was started, would make ray.init join that one and refuse num_cpus.
    ignored = os.environ.pop("RAY_ADDRESS", None)
    if ignored:
        log.warning("RAY_ADDRESS=%s ignored: runtime.ray_address is not set, so a local Ray starts "
                    "(set runtime.ray_address=auto to use that cluster)", ignored)  # fmt: skip
    # A new local Ray, reachable on loopback only. Its CPUs are logical: reserve enough for
    # the workers even on a smaller machine, as Ray Train will not start them otherwise.
    # address="local": never the cluster another program started on this machine, which
    # ray.init() would otherwise find through /tmp/ray/ray_current_cluster.
    wanted = math.ceil(job_cpus(cfg) if wanted_cpus is None else wanted_cpus)
    ray.init(
        address="local",
        num_cpus=max(available_cpus(), wanted),
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",  # the dashboard serves the state API Ray Train polls
        logging_level=logging.WARNING,
        runtime_env=runtime_env,
    )


def job_cpus(cfg: Config) -> float:
    """The logical CPUs one job reserves: its workers', and its evaluation task's when apart."""
    return cfg.scaling.max_workers * cfg.scaling.cpus_per_worker + (cfg.eval.resources.cpus if evaluates_apart(cfg) else 0)


def check_room_for_evaluation(cfg: Config) -> None:
    """Evaluations apart need resources beside the workers': a validation task that can never be
    scheduled would hold the fit's end for ever (Ray waits for every pending one)."""
    if not evaluates_apart(cfg):
        return
    import ray

    total = ray.cluster_resources()
    workers_gpus = cfg.scaling.max_workers if cfg.scaling.use_gpu else 0
    wanted = {"CPU": job_cpus(cfg), "GPU": workers_gpus + cfg.eval.resources.gpus}
    short = {name: (need, total.get(name, 0)) for name, need in wanted.items() if need > total.get(name, 0)}
    if short:
        name, (need, have) = next(iter(short.items()))
        raise ConfigError(
            f"eval.resources={cfg.eval.resources.model_dump()} beside {cfg.scaling.max_workers} worker(s): the run needs "
            f"{need:g} {name} and the Ray cluster has {have:g}; each evaluation runs as a Ray task of its own. Lower "
            "eval.resources, or evaluate on the chief with eval.runs=in-line"
        )


def check_connected_env(trainer: RayTrainer) -> None:
    """This process joined Ray before us (a notebook): the workers get the environment of the
    job it connected with, which must carry the trainer's."""
    import ray

    job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    missing = {k: v for k, v in trainer.env.items() if job_env.get(k) != v}
    if missing:
        raise ConfigError(
            f"this process is already connected to Ray without {missing} in its runtime_env, which the workers of "
            f"{trainer.path} need: connect with "
            f"ray.init(..., runtime_env={{'env_vars': {missing}}}), or let dcgan connect (call ray.shutdown() first)"
        )


def _job_env(trainer: RayTrainer) -> dict[str, str]:
    """The trainer's environment, set in this driver before it imports ray.train."""
    unset = {k: v for k, v in trainer.env.items() if os.environ.get(k) != v}
    if unset and "ray.train" in sys.modules:
        raise RuntimeError(
            f"{trainer.path} needs {unset} before ray.train is imported, and this process has imported it "
            "already: start it with those set"
        )
    os.environ.update(trainer.env)
    return trainer.env


def run(job: Job, train_fn: Optional[Callable] = None) -> dict[str, Any]:
    """Run `job` on every rank; returns its result (the metrics reported with the newest
    checkpoint, or the dry-run report). `train_fn` replaces the per-worker function (tests wrap it to observe or kill a worker).

    A SIGTERM to this driver (`ray job stop`) asks the ranks to stop: they agree on a step,
    checkpoint there and return, and this raises Preempted."""
    connect(job.cfg)
    check_room_for_evaluation(job.cfg)
    run_dir = storage.location(job.run_address)
    # Every worker reads these back before its first step (pipeline.ray_runner.probes).
    probes = write_probes([job.run_address, job.cfg.data.resolved_prepared_dir()])
    fit_name = f"fit-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    trainer = build_trainer(job, probes, fit_name, train_fn or train_loop_per_worker)

    def ask_the_ranks_to_stop(signum, frame) -> None:
        run_dir.write_text(STOP_FILE, f"SIGTERM to the driver, pid {os.getpid()}\n")

    # Only a main thread may handle signals; a sweep's trial runs its job in another, and is
    # stopped through the STOP file.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, ask_the_ranks_to_stop) if in_main_thread else None
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker exceptions; say what failed and what to do
        raise RunFailed(_explain(err, job)) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        remove_probes(probes)
        _remove_fit_pointers(run_dir)
    metrics = dict(result.metrics or {})
    lost = _lease_lost(result, metrics)
    if lost is not None:
        raise lost
    _check_best(job, best_reported(result))
    if run_dir.exists(STOP_FILE):
        run_dir.delete(STOP_FILE)
        step = int(metrics.get("step", 0))
        if step < job.total_steps:  # a stop that came with the last step finds the run finished
            raise Preempted(step, storage.join(job.run_address, f"checkpoints/{step_dir_name(step)}"))
    return job.result(metrics)


def _remove_fit_pointers(run_dir: storage.Location) -> None:
    """Ray's pointers of this fit (the run's lease keeps other jobs out): a resubmit never reads
    them. Left behind they cost nothing, and a failure here must not hide how the fit ended
    (a store that failed mid-run fails this too)."""
    try:
        run_dir.delete(RAY_DIR)
    except OSError as err:
        log.warning("could not remove Ray's checkpoint pointers in %s: %s", storage.redacted(str(run_dir)), err)


def _lease_lost(result, metrics: dict[str, Any]) -> Optional[LeaseLost]:
    """Whether the ranks stopped without writing. Train V2's Result.metrics are those of the
    newest checkpoint, which a stop without writing never makes: rank 0's return value says it.
    Train V1 (Horovod) has no return value, and its metrics are the last report's."""
    outcome = getattr(result, "return_value", None)
    if isinstance(outcome, dict) and LEASE_LOST in outcome:
        step, reason = outcome[LEASE_LOST]
        return LeaseLost(int(step), reason)
    if metrics.get(LEASE_LOST):
        return LeaseLost(int(metrics.get("step", 0)), "the run's lease was lost while its workers trained")
    return None


def _check_best(job: Job, ray_best: Optional[tuple[int, float]]) -> None:
    """Ray's ranking of this fit's checkpoints and the run's BEST pointer (over every fit of the
    run) must agree: BEST scores no worse than Ray's best."""
    if ray_best is None:
        return
    from pipeline.checkpoint import CheckpointManager

    step, fid = ray_best
    manager = CheckpointManager(storage.join(job.run_address, "checkpoints"), None)
    if manager.best_name() != step_dir_name(step) and fid < manager.best_score():
        log.warning("Ray ranks step %d best (%s %.6g), but the run's BEST is %s (%.6g)",
                    step, tb.TAG_EVAL_FID, fid, manager.best_name(), manager.best_score())  # fmt: skip
    else:
        log.info("best checkpoint by %s: %s (%.6g)", tb.TAG_EVAL_FID, manager.best_name(), manager.best_score())


def build_trainer(job: Job, probes: list[Probe], fit_name: str, train_fn: Callable):
    """The strategy's Ray Trainer (RAY_TRAINERS); Ray's experiment directory is
    <run>/.ray/<fit_name>, one per fit."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    cfg = job.cfg
    if cfg.backend == "tensorflow":
        from pipeline.backends.tf_backend.quiet import import_tensorflow

        import_tensorflow()  # before Ray's module imports it, so its banners stay quiet here
    trainer = ray_trainer(cfg)
    module, name = trainer.path.split(":")
    Trainer = getattr(importlib.import_module(module), name)

    validation = validation_config(cfg)
    return Trainer(
        train_fn,
        train_loop_config={"job": dataclasses.asdict(job), "probes": probes},
        **({"validation_config": validation} if validation else {}),
        scaling_config=ScalingConfig(
            num_workers=(cfg.scaling.min_workers, cfg.scaling.max_workers) if cfg.scaling.elastic else cfg.scaling.max_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            **trainer.scaling,
            **elastic_scaling(cfg),
        ),
        run_config=RunConfig(
            name=fit_name,
            **ray_storage(job),
            checkpoint_config=checkpoint_config(cfg),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )


def ray_storage(job: Job) -> dict[str, Any]:
    """Ray Train's experiment directory, <run>/.ray. In object storage through the run's own
    filesystem, whose requests are bounded (pipeline.storage): with Ray's defaults, its own
    requests to a frozen store (its checkpoint pointers, its controller's state) took 105 s to
    give up where ours take seconds."""
    location = storage.location(job.run_address).child(RAY_DIR)
    if location.is_local:
        return {"storage_path": str(location)}
    return {"storage_path": location.root, "storage_filesystem": location.fs}


def elastic_scaling(cfg: Config) -> dict:
    """Train V2's elastic policy: a group of min..max workers, sized to what the cluster has room
    for at each (re)start, and restarted from the last checkpoint to grow when room returns."""
    return {"elastic_resize_monitor_interval_s": cfg.scaling.resize_check_seconds} if cfg.scaling.elastic else {}


def checkpoint_config(cfg: Config):
    """Ray keeps the pointers the way our manager keeps the checkpoints: the newest, and with
    evaluation the best by eval/ranked_fid: a checkpoint's FID where it became BEST, NaN
    elsewhere (which Ray ranks last), so Ray's best is BEST (pipeline.loop, RANKED_FID)."""
    from ray.train import CheckpointConfig

    if not cfg.eval.every:
        return CheckpointConfig(num_to_keep=2)
    return CheckpointConfig(num_to_keep=cfg.checkpoint.keep, checkpoint_score_attribute=RANKED_FID, checkpoint_score_order="min")


def best_reported(result) -> Optional[tuple[int, float]]:
    """(step, eval/ranked_fid) of the checkpoint Ray ranks best among those it kept, if any was scored."""
    scored = [metrics for _, metrics in result.best_checkpoints or [] if math.isfinite(metrics.get(RANKED_FID, math.nan))]
    if not scored:
        return None
    best = min(scored, key=lambda metrics: metrics[RANKED_FID])
    return int(best["step"]), float(best[RANKED_FID])


def _explain(err: Exception, job: Job) -> str:
    cfg = job.cfg
    failures = getattr(err, "worker_failures", None) or {}
    causes = [f"rank {rank}: {_root_message(cause)}" for rank, cause in sorted(failures.items())]
    text = "; ".join(causes) or _root_message(err)
    if not causes and isinstance(_root(err), OSError) and storage.is_uri(job.run_address):
        # Ray Train's own request to the run's store (its checkpoint pointers, its state) failed.
        text = f"object store {storage.location(job.run_address).store}: Ray Train's request failed: {text}"
    hint = ""
    if cfg.train.max_failures == 0 and any(_is_lost_worker(c) for c in failures.values()):
        hint = " (train.max_failures=0: set it above 0 to restart the workers from the last checkpoint)"
    return f"training on Ray failed after {cfg.train.max_failures} allowed restart(s): {text}{hint}"


def _root(err: BaseException) -> BaseException:
    """The innermost cause: through Python's chain and Ray Train's wrappers (a worker's
    `cause`, the controller's `controller_failure`)."""
    while True:
        inner = getattr(err, "cause", None) or getattr(err, "controller_failure", None) or err.__cause__
        if inner is None or inner is err:
            return err
        err = inner


def _root_message(err: BaseException) -> str:
    err = _root(err)
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__


def _is_lost_worker(err: BaseException) -> bool:
    import ray.exceptions

    return isinstance(err, (ray.exceptions.ActorDiedError, ray.exceptions.RayActorError)) or "died" in str(err)

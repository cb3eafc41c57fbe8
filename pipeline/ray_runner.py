"""The Ray Train runner: the only module that imports ray.

The driver (the `dcgan train` process) gets a planned Job (pipeline.job: input checked, data
prepared, start settled) and ships it unchanged to every rank through the Ray Trainer of the
ranks' strategy (TorchTrainer, HorovodTrainer or TensorflowTrainer); it does not know whether
the job trains or dry-runs.

Checkpoints live in the run's own storage under our protocol (pipeline.checkpoint), written
by rank 0. What rank 0 reports to Ray is a pointer to that checkpoint, so Ray's
`get_checkpoint()` serves exactly one purpose: after a worker failure inside one `fit`, the
restarted workers continue from the newest checkpoint of that fit (if it verifies; else they
fall back as the driver would). Each fit has an experiment directory of its own, so a
resubmit never picks up an older fit's checkpoint behind the driver's back.

Before training, every worker checks that it sees a file the driver has just written into the
run directory (and the prepared data) on a path: a node without the shared storage fails the
run at once, by name, instead of training into its own disk.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import storage
from pipeline import tensorboard as tb
from pipeline.checkpoint import CheckpointInfo, step_dir_name
from pipeline.config import Config, ConfigError
from pipeline.context import RankContext, available_cpus
from pipeline.job import Job
from pipeline.stopping import STOP_FILE, LeaseLost, Preempted, Stop

log = logging.getLogger(__name__)

POINTER_FILE = "pointer.json"
LEASE_LOST = "lease_lost"  # reported by every rank that stopped without writing (a metric of 1)
PROBE_DIR = ".storage-check"
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


def _connect(job: Job) -> None:
    import ray

    cfg = job.cfg
    trainer = ray_trainer(cfg)
    env = _job_env(trainer)
    if ray.is_initialized():
        _check_connected_env(trainer)
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
    wanted = math.ceil(cfg.scaling.max_workers * cfg.scaling.cpus_per_worker)
    ray.init(
        address="local",
        num_cpus=max(available_cpus(), wanted),
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",  # the dashboard serves the state API Ray Train polls
        logging_level=logging.WARNING,
        runtime_env=runtime_env,
    )


def _check_connected_env(trainer: RayTrainer) -> None:
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
    """Run `job` on every rank; returns its result (the last reported metrics, or the dry-run
    report). `train_fn` replaces the per-worker function (tests wrap it to observe or kill a worker).

    A SIGTERM to this driver (`ray job stop`) asks the ranks to stop: they agree on a step,
    checkpoint there and return, and this raises Preempted."""
    _connect(job)
    run_dir = storage.location(job.run_address)
    probes = write_storage_probes(job)
    fit_name = f"fit-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    trainer = build_trainer(job, probes, fit_name, train_fn or _worker)

    def ask_the_ranks_to_stop(signum, frame) -> None:
        run_dir.write_text(STOP_FILE, f"SIGTERM to the driver, pid {os.getpid()}\n")

    previous = signal.signal(signal.SIGTERM, ask_the_ranks_to_stop)
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker exceptions; say what failed and what to do
        raise RunFailed(_explain(err, job)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        remove_storage_probes(probes)
        # Pointers of this fit only (the run's lease keeps other jobs out): a resubmit never reads them.
        run_dir.delete(RAY_DIR)
    metrics = dict(result.metrics or {})
    if metrics.get(LEASE_LOST):
        raise LeaseLost(int(metrics.get("step", 0)), "the run's lease was lost while its workers trained")
    _check_best(job, best_reported(result))
    if run_dir.exists(STOP_FILE):
        run_dir.delete(STOP_FILE)
        step = int(metrics.get("step", 0))
        if step < job.total_steps:  # a stop that came with the last step finds the run finished
            raise Preempted(step, storage.join(job.run_address, f"checkpoints/{step_dir_name(step)}"))
    return job.result(metrics)


def _check_best(job: Job, ray_best: Optional[tuple[int, float]]) -> None:
    """Ray's ranking of this fit's checkpoints and the run's BEST pointer (over every fit of the
    run) must agree: BEST scores no worse than Ray's best."""
    if ray_best is None:
        return
    from pipeline.checkpoint import CheckpointManager

    step, fid = ray_best
    manager = CheckpointManager(storage.join(job.run_address, "checkpoints"), None)
    if fid < manager.best_score():
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

    return Trainer(
        train_fn,
        train_loop_config={"job": dataclasses.asdict(job), "probes": probes},
        scaling_config=ScalingConfig(
            num_workers=(cfg.scaling.min_workers, cfg.scaling.max_workers) if cfg.scaling.elastic else cfg.scaling.max_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            **trainer.scaling,
            **elastic_scaling(cfg),
        ),
        run_config=RunConfig(
            name=fit_name,
            storage_path=storage.join(job.run_address, RAY_DIR),
            checkpoint_config=checkpoint_config(cfg),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )


def elastic_scaling(cfg: Config) -> dict:
    """Train V2's elastic policy: a group of min..max workers, sized to what the cluster has room
    for at each (re)start, and restarted from the last checkpoint to grow when room returns."""
    return {"elastic_resize_monitor_interval_s": cfg.scaling.resize_check_seconds} if cfg.scaling.elastic else {}


def checkpoint_config(cfg: Config):
    """Ray keeps the pointers the way our manager keeps the checkpoints: the newest, and with
    evaluation the best by eval/fid (lower is better; a checkpoint not evaluated reports NaN,
    which Ray ranks last). The manager's BEST is the same choice (see best_reported_step)."""
    from ray.train import CheckpointConfig

    if not cfg.eval.every:
        return CheckpointConfig(num_to_keep=2)
    return CheckpointConfig(
        num_to_keep=cfg.checkpoint.keep, checkpoint_score_attribute=tb.TAG_EVAL_FID, checkpoint_score_order="min"
    )


def best_reported(result) -> Optional[tuple[int, float]]:
    """(step, eval/fid) of the checkpoint Ray ranks best among those it kept, if any was scored."""
    scored = [metrics for _, metrics in result.best_checkpoints or [] if math.isfinite(metrics.get(tb.TAG_EVAL_FID, math.nan))]
    if not scored:
        return None
    best = min(scored, key=lambda metrics: metrics[tb.TAG_EVAL_FID])
    return int(best["step"]), float(best[tb.TAG_EVAL_FID])


def _explain(err: Exception, job: Job) -> str:
    cfg = job.cfg
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


# --- shared storage -----------------------------------------------------------------------


def write_storage_probes(job: Job) -> list[Probe]:
    """A fresh object in the run's storage and in the prepared data's, written by the driver:
    every worker must read it back (the same storage: a shared path, or a store it can reach
    with credentials of its own) before its first step."""
    return write_storage_probes_at([job.run_address, job.cfg.data.resolved_prepared_dir()])


# (the storage's address, path or URI; the probe's name in it)
Probe = tuple[str, str]


def write_storage_probes_at(addresses: list[str]) -> list[Probe]:
    nonce = uuid.uuid4().hex
    for address in addresses:
        storage.location(address).write_text(f"{PROBE_DIR}/{nonce}", nonce)
    return [(address, f"{PROBE_DIR}/{nonce}") for address in addresses]


def remove_storage_probes(probes: list[Probe]) -> None:
    """The driver's probes and what the workers wrote beside them (only this job's: other jobs
    may share the prepared data)."""
    for address, name in probes:
        base, nonce = storage.location(address), name.rpartition("/")[2]
        try:
            for found in base.list(PROBE_DIR):
                if found.startswith(nonce):
                    base.delete(f"{PROBE_DIR}/{found}")
        except OSError as err:  # a leftover probe costs nothing
            log.warning("could not remove the storage probes in %s: %s", base, err)


class StorageNotShared(RuntimeError):
    """A worker does not see, or cannot reach, the storage the driver writes to."""


def this_node() -> str:
    """How errors name the node a process runs on: host, address and Ray's node id."""
    import ray
    import ray.util

    node_id = ray.get_runtime_context().get_node_id()
    return f"node {socket.gethostname()} ({ray.util.get_node_ip_address()}, Ray node {node_id[:12]})"


def check_storage_probes(probes: list[Probe], writer: str) -> None:
    """Read each of the driver's probes, and write one beside the run's (the first, as
    `writer`): a node without the shared mount, or without the store's credentials, fails
    here, before its first step, naming itself and what is missing."""
    node = this_node()
    for index, (address, name) in enumerate(probes):
        shown = storage.redacted(storage.join(address, name))
        try:
            base = storage.location(address)
            seen = base.read_text(name) if base.exists(name) else None
            if seen is not None and index == 0:
                base.write_text(f"{name}-{writer}", node)
        except OSError as err:
            raise StorageNotShared(f"{node} cannot use {shown}: {err}. {_credentials_hint(address)}") from None
        if seen != name.rpartition("/")[2]:
            where = storage.redacted(address)
            hint = (
                f"{where} is not shared storage. Every node must mount the same storage at the same path "
                "(NFS, a ReadWriteMany volume), or set runtime.storage_path / data.prepared_dir to an "
                "object-store URI (s3://bucket/prefix, gs://...)"
                if not storage.is_uri(address)
                else f"{where} is another store from this node (its endpoint or bucket differs)"
            )
            raise StorageNotShared(f"{node} does not see {shown}, which the driver has just written: {hint}")


def _credentials_hint(address: str) -> str:
    if not storage.is_uri(address):
        return "The run's directory must be readable and writable from every node"
    variables = {
        "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the node's instance role)",
        "gs": "GOOGLE_APPLICATION_CREDENTIALS (or the node's service account)",
    }.get(storage.uri_scheme(address), "the store's credentials")
    return (
        f"The node's Ray processes need {variables} in the environment its `ray start` ran with "
        "(launch/node.sh, the pod spec), not only the driver's"
    )


# --- on each worker -----------------------------------------------------------------------

_SIGTERM = threading.Event()


def _on_sigterm(signum, frame) -> None:
    _SIGTERM.set()  # the ranks agree on the next check step, checkpoint there and stop


def _install_sigterm_handler() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def _catch_sigterm() -> None:
    """Python signal handlers belong to the main thread, and Ray Train runs the training
    function in another one: the worker actor's main thread installs it (actor tasks run there)."""
    import ray

    if threading.current_thread() is threading.main_thread():
        _install_sigterm_handler()
        return
    actor = ray.get_runtime_context().current_actor
    if not hasattr(actor, "execute"):
        # Train V1 (the Horovod path): the actor's thread waits for this one's results, so it
        # cannot run the installer. A SIGTERM to a worker then ends it, and Ray restarts the
        # group from the last checkpoint (train.max_failures); the driver's STOP still works.
        log.info("Ray Train V1: SIGTERM to this worker is not caught")
        return
    ray.get(actor.execute.remote(_install_sigterm_handler))


def _stop_requested() -> Stop:
    """A SIGTERM to this worker (stop), or a node drain that Ray Train reports (checkpoint and
    train on). The driver's request (its STOP file) is rank 0's to poll (pipeline.stopping).
    Ray's preemption info is rank 0's, broadcast: a barrier that every rank calls at the same
    steps, as the loop asks."""
    import ray.train

    # Train V1 (the Horovod path) has no preemption notices. Asked first, always: a rank that
    # skipped the barrier would leave the others waiting in it.
    drained = getattr(ray.train, "get_preemption_info", lambda: None)() is not None
    if _SIGTERM.is_set():
        return Stop.CHECKPOINT
    return Stop.DRAIN if drained else Stop.NONE


def _report(step: int, saved: Optional[CheckpointInfo], metrics: dict[str, float]) -> None:
    """Every rank reports (a barrier); rank 0 attaches a pointer to the checkpoint it wrote."""
    import ray.train
    from ray.train import Checkpoint

    if saved is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="dcgan-pointer-") as directory:
        (Path(directory) / POINTER_FILE).write_text(json.dumps({"step": step, "checkpoint": saved.address}))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))


def _restored_address() -> Optional[str]:
    """The checkpoint this fit reported last, when Ray restarts the workers after a failure."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is None:
        return None
    # Into a directory of this process's own: as_directory() shares one per checkpoint and node,
    # and a worker that finished with it deleted it under another one still reading (seen with
    # two workers on one node after a drain).
    with tempfile.TemporaryDirectory(prefix="dcgan-restored-") as directory:
        restored.to_directory(directory)
        return json.loads((Path(directory) / POINTER_FILE).read_text())["checkpoint"]


def rank_context(cfg: Config) -> RankContext:
    """This worker's place in the group, and the GPU Ray reserved for it.

    TorchTrainer shares CUDA_VISIBLE_DEVICES between the workers of a node, so the device index
    is where this worker's GPU id sits in that list (Ray's get_device), not its local rank.
    TensorflowTrainer shows each worker only its own GPU: TensorFlow needs no index."""
    import ray.train

    context = ray.train.get_context()
    if not cfg.scaling.use_gpu:
        device = "cpu"  # Ray reserved no GPU for this worker: the node's GPUs belong to others
    elif cfg.backend == "torch":
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    else:
        device = "cuda"
    return RankContext(context.get_world_rank(), context.get_local_rank(), context.get_world_size(), device)


def _worker(loop_config: dict[str, Any]) -> None:
    # Our progress lines at INFO; Ray's own loggers keep their levels.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    job = Job(**loop_config["job"])
    ctx = rank_context(job.cfg)
    check_storage_probes(loop_config["probes"], f"rank{ctx.rank}")
    _catch_sigterm()
    run_dir = storage.location(job.run_address)
    try:
        # Once more when the backend is up: TensorFlow's coordination service (under
        # MultiWorkerMirroredStrategy) installs a SIGTERM handler of its own as it starts.
        job.run(ctx, _report, _stop_requested, _restored_address(), on_ready=_catch_sigterm)
    except LeaseLost as lost:
        import ray.train

        # Every rank agreed on it at the same step: the driver learns it from this report, and
        # a retry (max_failures) would only find the run another job's.
        ray.train.report({"step": lost.step, LEASE_LOST: 1.0}, checkpoint=None)
        log.error("%s", lost)
    except Preempted:
        if run_dir.exists(STOP_FILE):
            return  # the driver asked: the run ends here (a retry would only stop again)
        raise  # this worker or its node is going away: Ray restarts the group from the checkpoint

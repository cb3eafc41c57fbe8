"""What runs in each Ray Train worker: the rank's place in the group, its stop requests
(SIGTERM, a node drain), and its reports to Ray.

Each worker rebuilds the driver's Job, checks the shared storage (pipeline.ray_runner.probes),
and runs the job as one rank. Checkpoints live in the run's own storage under our protocol
(pipeline.checkpoint), written by rank 0; what rank 0 reports to Ray is a pointer to that
checkpoint, so Ray's `get_checkpoint()` serves one purpose: after a restart inside one `fit`
(a lost worker, a drained node, an elastic resize), the workers continue from the newest
checkpoint of that fit.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

from pipeline import storage
from pipeline.checkpoint import CheckpointInfo
from pipeline.config import Config
from pipeline.context import RankContext
from pipeline.job import Job
from pipeline.loop import EVAL_REQUESTED
from pipeline.ray_runner import validation
from pipeline.ray_runner.probes import Probe, check_probes
from pipeline.ray_runner.validation import evaluates_apart
from pipeline.stopping import STOP_FILE, LeaseLost, Preempted, Stop

log = logging.getLogger(__name__)

POINTER_FILE = "pointer.json"
LEASE_LOST = "lease_lost"  # reported by every rank that stopped without writing (a metric of 1)


def train_loop_per_worker(loop_config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The function Ray Train runs on every worker. What rank 0 returns reaches the driver
    (Train V2's `Result.return_value`): {LEASE_LOST: [step, reason]} when the ranks stopped
    without writing, else None."""
    # Our progress lines at INFO; Ray's own loggers keep their levels.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    job = Job(**loop_config["job"])
    ctx = rank_context(job.cfg)
    # Train V1 (Horovod) hands the config through Ray Tune, which turns each Probe into a tuple.
    check_probes([Probe(*probe) for probe in loop_config["probes"]], f"rank{ctx.rank}")
    _catch_sigterm()
    run_dir = storage.location(job.run_address)
    try:
        # Once more when the backend is up: TensorFlow's coordination service (under
        # MultiWorkerMirroredStrategy) installs a SIGTERM handler of its own as it starts.
        report = functools.partial(_report, job.run_address)
        job.run(ctx, report, _stop_requested, restored_address(), on_ready=_catch_sigterm)
    except LeaseLost as lost:
        import ray.train

        # Every rank agreed on it at the same step, so the workers end normally: a retry
        # (max_failures) would only find the run another job's. The driver learns it from rank
        # 0's return value; Train V1 (Horovod) has none and keeps the last report's metrics.
        ray.train.report({"step": lost.step, LEASE_LOST: 1.0}, checkpoint=None)
        log.error("%s", lost)
        return {LEASE_LOST: [lost.step, lost.reason]}
    except Preempted:
        if run_dir.exists(STOP_FILE):
            return None  # the driver asked: the run ends here (a retry would only stop again)
        raise  # this worker or its node is going away: Ray restarts the group from the checkpoint


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
    rank = context.get_world_rank()
    return RankContext(rank, context.get_local_rank(), context.get_world_size(), device, evaluates_apart(cfg))


def restored_address() -> Optional[str]:
    """The checkpoint this fit reported last, when Ray restarts the workers within the fit."""
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


def _report(run_address: str, step: int, saved: Optional[CheckpointInfo], metrics: dict[str, float]) -> None:
    """Every rank reports (a barrier); rank 0 attaches a pointer to the checkpoint it wrote, and
    asks for its evaluation apart when the loop did (pipeline.ray_runner.validation)."""
    import ray.train
    from ray.train import Checkpoint

    evaluate = metrics.pop(EVAL_REQUESTED, 0.0)
    if saved is None:
        ray.train.report(metrics, checkpoint=None)
        return
    extra = {"validation": validation.request(saved.address, step, run_address)} if evaluate else {}
    with tempfile.TemporaryDirectory(prefix="dcgan-pointer-") as directory:
        (Path(directory) / POINTER_FILE).write_text(json.dumps({"step": step, "checkpoint": saved.address}))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory), **extra)


# --- stop requests ----------------------------------------------------------------------------

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

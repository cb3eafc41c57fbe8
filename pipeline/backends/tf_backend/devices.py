"""The devices TensorFlow trains on: what runtime.device (or Ray) allows, and the strategy over them."""

from __future__ import annotations

import functools
import json
import os

from pipeline import precision
from pipeline.backends.tf_backend import quiet, tf
from pipeline.backends.tf_backend.quiet import native_stderr_captured
from pipeline.config import ConfigError


def use_devices(requested: str) -> None:
    """Show TensorFlow the devices `requested` (auto, cpu, cuda) allows; before its runtime starts.

    cuda with no GPU visible is an error that quotes what TensorFlow said while looking (a CPU-only
    build, a missing CUDA library, no driver), instead of a silent run on the CPU."""
    with native_stderr_captured() as native:
        gpus = tf.config.list_physical_devices("GPU")
    if requested == "cpu" and tf.config.get_visible_devices("GPU"):  # once: the runtime may be up
        tf.config.set_visible_devices([], "GPU")
    elif requested == "cuda" and not gpus:
        keywords = ("cuda", "gpu", "dlopen", "driver")
        said = quiet.import_output.lines(*keywords) + native.lines(*keywords)
        built = "a CUDA build" if tf.test.is_built_with_cuda() else "a build without CUDA (install tensorflow[and-cuda])"
        raise ConfigError(
            f"runtime.device=cuda, but TensorFlow ({built}) sees no GPU"
            + (": " + " | ".join(said[-3:]) if said else "")
        )


def _local_devices() -> list[str]:
    """What one worker mirrors over: every GPU, else the logical CPU devices (several only where
    tf.config.set_logical_device_configuration made them), else the CPU. Once a
    MultiWorkerMirroredStrategy has connected the workers, TensorFlow lists every worker's
    devices: only this task's are local."""
    with native_stderr_captured():
        gpus, cpus = tf.config.list_logical_devices("GPU"), tf.config.list_logical_devices("CPU")
    names = [d.name for d in (gpus or cpus)]
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task")
    if task and any(name.startswith("/job:") for name in names):
        mine = f"/job:{task['type']}/replica:0/task:{task['index']}/"
        names = [name for name in names if name.startswith(mine)]
    return names


def make_strategy(world_size: int) -> tf.distribute.Strategy:
    """A rank of several workers (TF_CONFIG, as Ray's TensorflowTrainer sets it, names them):
    MultiWorkerMirroredStrategy; several devices in this process: MirroredStrategy; one: the
    default strategy. A single-rank backend in a worker's process (the dry run's reload check)
    gets a local strategy, though TF_CONFIG still lists every worker: a MultiWorkerMirroredStrategy
    it built alone would wait for the others forever."""
    tf_config = os.environ.get("TF_CONFIG", "{}")
    workers = json.loads(tf_config).get("cluster", {}).get("worker", [])
    if world_size > 1 and len(workers) > 1:
        return _multi_worker_strategy(tf_config)
    devices = _local_devices()
    return tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else tf.distribute.get_strategy()


@functools.cache
def _multi_worker_strategy(tf_config: str) -> tf.distribute.MultiWorkerMirroredStrategy:
    """One per process and cluster: TensorFlow configures its collective runtime once per
    process, and a second MultiWorkerMirroredStrategy over the same workers hangs in its first
    collective (TF 2.21), so a process that trains again (a resume after a run, a dry run)
    reuses the first. Created before any other TF op: it configures the runtime."""
    with native_stderr_captured():
        return tf.distribute.MultiWorkerMirroredStrategy()


def local_replicas(requested: str) -> int:
    """How many replicas make_strategy creates in a process without TF_CONFIG (the local runner)."""
    use_devices(requested)
    return len(_local_devices())


def describe(strategy: tf.distribute.Strategy) -> dict[str, object]:
    """The strategy and the devices this worker's replicas run on, with the GPUs' names."""
    if strategy is tf.distribute.get_strategy():  # the default strategy: TF's default placement
        devices = _local_devices()[:1]
    else:
        devices = list(strategy.extended.worker_devices)
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    return {
        "strategy": type(strategy).__name__.lstrip("_"),
        "replicas": strategy.num_replicas_in_sync,
        "devices": devices,
        "gpus": names,
    }


def resolve_precision(requested: str) -> precision.Precision:
    """train.precision on the devices this process trains on (auto: bf16 where it is native)."""
    gpus = tf.config.get_visible_devices("GPU")
    if not gpus:
        return precision.resolve(requested, "cpu")
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
    return precision.resolve(requested, "gpu", gpu_has_bf16=tuple(capability) >= (8, 0))

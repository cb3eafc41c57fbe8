"""Helpers for end-to-end tests: run the real CLI in a fresh process, read real event files."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

import yaml

from tests.conftest import ROOT


def write_config(path: Path, cfg) -> Path:
    path.write_text("# test config\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def dcgan(*args: str, cwd: Path, timeout: float = 300, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`dcgan ARGS` in a new interpreter, so each run starts from a clean process state; `env`
    adds to this process's environment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def traced_worker(trace_dir: Path, kill_rank: int = -1, kill_at_step: int = 0, sig: int = signal.SIGKILL, before=None,
                  framework: str = "torch", after=None, then: tuple[tuple[int, int], ...] = (), each_step=None,
                  record_each_step: bool = False):
    """The product's Ray worker (torch), recording the indices of each batch a rank trains on;
    optionally one rank sends itself `sig` once, at the start of step `kill_at_step` of the
    first attempt (marker file `killed`), and then each `(step, sig)` of `then` in the attempts
    that follow, one per attempt, the step counted from that attempt's start (markers
    `killed-2`, `killed-3`...). `before(rank, loop_config)` runs first on every rank,
    `after(rank, loop_config)` once the worker returned, `each_step(rank, n)` before the n-th
    step of this attempt (torch). `record_each_step`: the trace is rewritten after every step
    (torch), so a process that Ray ends without warning (a lost node, a resize) leaves one too.

    The feed reads one batch ahead (a thread gathers the next batch while a step runs), so
    indices are queued when read and recorded when their step takes the batch. For
    framework="tensorflow" (tf.data prefetches too; its worker must not import torch) they are
    recorded, and the signal sent, when read."""

    def train_fn(loop_config):
        from collections import deque

        import ray.train

        from pipeline.ray_runner.worker import train_loop_per_worker
        from pipeline.data.shards import ShardedImages

        rank = ray.train.get_context().get_world_rank()
        if before is not None:
            before(rank, loop_config)
        original_gather = ShardedImages.gather
        read, seen = deque(), []
        signals = ((kill_at_step, sig), *then)
        markers = [trace_dir / ("killed" if n == 0 else f"killed-{n + 1}") for n in range(len(signals))]
        # This attempt's signal: the first not yet sent (the markers outlive the processes).
        due = next(((step, signum, m) for (step, signum), m in zip(signals, markers) if not m.exists()), None)

        def kill_if_due() -> None:
            if rank == kill_rank and due is not None and len(seen) == due[0]:
                due[2].touch()
                os.kill(os.getpid(), due[1])

        if framework == "tensorflow":

            def gather(self, indices):
                seen.append(np.asarray(indices).copy())
                kill_if_due()
                return original_gather(self, indices)

            ShardedImages.gather = gather
            try:
                return train_loop_per_worker(loop_config)
            finally:
                ShardedImages.gather = original_gather
                if seen:
                    np.save(trace_dir / f"rank{rank}-pid{os.getpid()}.npy", np.stack(seen))

        from pipeline.backends.torch_backend import TorchBackend

        original_step = TorchBackend.train_step

        def gather(self, indices):
            read.append(np.asarray(indices).copy())
            return original_gather(self, indices)

        def train_step(self, batch, step):
            seen.append(read.popleft())
            if record_each_step:
                np.save(trace_dir / f"rank{rank}-pid{os.getpid()}.npy", np.stack(seen))
            if each_step is not None:
                each_step(rank, len(seen))
            kill_if_due()
            return original_step(self, batch, step)

        ShardedImages.gather, TorchBackend.train_step = gather, train_step
        try:
            outcome = train_loop_per_worker(loop_config)  # rank 0's reaches the driver
            if after is not None:
                after(rank, loop_config)
            return outcome
        finally:
            ShardedImages.gather, TorchBackend.train_step = original_gather, original_step
            if seen:
                np.save(trace_dir / f"rank{rank}-pid{os.getpid()}.npy", np.stack(seen))

    return train_fn


@contextmanager
def local_ray(test_module: str, num_gpus: int = 0, env_vars: Optional[dict[str, str]] = None) -> Iterator[None]:
    """A real Ray on 127.0.0.1 with 4 logical CPUs for one test module. The module's closures
    and this one's (workers wrapped to observe or kill) are shipped to Ray's workers by value.
    `num_gpus` declares GPUs the machine need not have: Ray assigns them to workers (ids,
    CUDA_VISIBLE_DEVICES) exactly as it would real ones. `env_vars`: for every worker process."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[test_module])
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # traced_worker
    ray.init(address="local", num_cpus=4, num_gpus=num_gpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
             logging_level=logging.WARNING, runtime_env={"env_vars": env_vars} if env_vars else None)  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()


def checkpoint_tensors(run_dir: Path, step: int) -> dict:
    """G, D and both Adams' moments of a torch checkpoint, by name (torch tensors; torch is imported here
    because the TensorFlow tests import this module too)."""
    return tensors_in(run_dir / "checkpoints" / f"step-{step:08d}")


def tensors_in(directory: Path) -> dict:
    """checkpoint_tensors of one torch checkpoint directory."""
    import torch

    state = {}
    for name in ("generator.pt", "discriminator.pt"):
        state.update({f"{name}:{k}": v for k, v in torch.load(directory / name, weights_only=True).items()})
    optimizers = torch.load(directory / "optimizers.pt", weights_only=True)
    for net in ("generator", "discriminator"):
        for index, slots in optimizers[net]["state"].items():
            state.update({f"{net}-adam:{index}:{k}": v for k, v in slots.items()})
    return state


def read_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} through TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
    }


def read_texts(tb_dir: Path) -> dict[str, dict[int, str]]:
    """{tag: {step: text}} of the text summaries, through TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    texts = {}
    for tag in accumulator.Tags()["tensors"]:
        events = accumulator.Tensors(tag)
        texts[tag.removesuffix("/text_summary")] = {e.step: e.tensor_proto.string_val[0].decode() for e in events}
    return texts


def _s3_user(port: int) -> dict[str, str]:
    """An IAM user allowed every S3 action, then authentication on for every request after."""
    import json
    import urllib.request

    import boto3

    iam = boto3.client("iam", endpoint_url=f"http://127.0.0.1:{port}")
    iam.create_user(UserName="trainer")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    reset = f"http://127.0.0.1:{port}/moto-api/reset-auth"  # the body is read only when typed as JSON
    urllib.request.urlopen(urllib.request.Request(reset, data=b"0", method="POST", headers={"Content-Type": "application/json"}))
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@contextmanager
def s3_server(bucket: str = "dcgan-test", authenticated: bool = False) -> Iterator[str]:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 with one bucket; yields
    the base URI that pyarrow.fs (and so the pipeline and Ray Train) resolve. The usual AWS
    variables are set in os.environ, so Ray workers started afterwards inherit them.
    `authenticated`: the server checks every request's credentials, as S3 does (moto's IAM
    authentication): os.environ gets the keys of a user allowed s3:*, and a process with
    other keys is refused (403, InvalidAccessKeyId)."""
    import boto3

    from tests.ddp_harness import free_port

    port = free_port()
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(credentials)
    server = subprocess.Popen(
        [Path(sys.executable).parent / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        for _ in range(100):  # up in well under a second; allow for a loaded machine
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:  # connection refused until it listens
                time.sleep(0.1)
        else:
            raise RuntimeError("moto_server did not start")
        if authenticated:
            os.environ.update(_s3_user(port))
        yield f"s3://{bucket}/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        server.terminate()
        server.wait(timeout=30)

"""Each Ray worker trains on the GPU Ray reserved for it.

The machine has no GPU, so the local Ray declares two: Ray then hands out GPU ids and sets
CUDA_VISIBLE_DEVICES in its workers exactly as on a GPU node, and the device each worker picks
is checked against that assignment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import small_config
from tests.helpers import local_ray

ray = pytest.importorskip("ray")
from pipeline.ray_runner.worker import rank_context  # noqa: E402  (after the skip: needs ray)

pytestmark = [pytest.mark.integration, pytest.mark.ray]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # The suite hides GPUs (CUDA_VISIBLE_DEVICES=""), and Ray refuses to declare GPUs that the
    # variable excludes: the node shows two, as a two-GPU machine does.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        with local_ray(__name__, num_gpus=2):
            yield


def _record_device(loop_config: dict) -> None:
    """What the pipeline's worker would train on, next to what Ray assigned."""
    ctx = rank_context(loop_config["cfg"])
    seen = {"device": ctx.device, "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}  # fmt: skip
    Path(loop_config["out"], f"rank-{ctx.rank}.json").write_text(json.dumps(seen))


def test_two_workers_on_one_node_get_the_distinct_gpus_ray_assigned(tmp_path: Path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = small_config(tmp_path, scaling={"num_workers": 2, "use_gpu": True}, runtime={"runner": "ray", "device": "cuda"})
    TorchTrainer(
        _record_device,
        train_loop_config={"cfg": cfg, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1}),
        torch_config=TorchConfig(backend="gloo"),  # NCCL will not start without a real GPU
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()

    seen = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    # TorchTrainer shares the node's GPUs between its workers: the device index is where the
    # worker's own GPU id sits in CUDA_VISIBLE_DEVICES, which need not be its local rank.
    for worker in seen:
        (gpu_id,) = worker["gpu_ids"]
        visible = worker["visible"].split(",")
        assert sorted(visible) == ["0", "1"], worker
        assert worker["device"] == f"cuda:{visible.index(gpu_id)}", worker
    assert {worker["device"] for worker in seen} == {"cuda:0", "cuda:1"}, seen


def test_a_worker_ray_reserved_no_gpu_trains_on_the_cpu_though_the_node_has_gpus(tmp_path: Path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = small_config(tmp_path, scaling={"num_workers": 2}, runtime={"runner": "ray", "device": "auto"})
    TorchTrainer(
        _record_device,
        train_loop_config={"cfg": cfg, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()

    for rank in (0, 1):
        worker = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        # Ray leaves CUDA_VISIBLE_DEVICES alone for a worker without GPUs: it still sees the node's.
        assert worker["gpu_ids"] == [] and worker["visible"] == "0,1", worker
        assert worker["device"] == "cpu", worker

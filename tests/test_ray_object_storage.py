"""A 2-worker Ray run whose run directory and prepared data live in object storage: a real
S3-compatible server on 127.0.0.1 (moto's server mode) and a real local Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.checkpoint import LATEST, MANIFEST, fetch
from pipeline.job import plan
from tests.conftest import small_config
from tests.helpers import local_ray, read_scalars, s3_server, traced_worker

ray = pytest.importorskip("ray")
pytest.importorskip("moto")
from pipeline import ray_runner  # noqa: E402  (after the skip: needs ray)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_base():
    with s3_server() as base:  # first: the Ray workers inherit its AWS variables
        with local_ray(__name__):
            yield base


def weights(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for name in ("generator.pt", "discriminator.pt"):
        state.update({f"{name}:{k}": v for k, v in torch.load(directory / name, weights_only=True).items()})
    return state


def test_a_two_worker_run_in_a_bucket_resumes_from_it_after_a_sigkilled_worker(s3_base: str, tmp_path: Path):
    common = {"train": {"global_batch_size": 16, "steps": 12}, "scaling": {"num_workers": 2, "cpus_per_worker": 1}}
    reference = small_config(tmp_path, run={"name": "on-disk"}, runtime={"runner": "ray"}, **common)
    ray_runner.run(plan(reference))

    common["train"]["max_failures"] = 1
    cfg = small_config(
        tmp_path, run={"name": "in-bucket"}, runtime={"runner": "ray", "storage_path": s3_base},
        data={"prepared_dir": storage.join(s3_base, "prepared/synthetic")}, **common,
    )  # fmt: skip
    traces = tmp_path / "traces"
    traces.mkdir()
    metrics = ray_runner.run(plan(cfg), train_fn=traced_worker(traces, kill_rank=1, kill_at_step=7))
    assert (traces / "killed").exists() and metrics["step"] == 12

    run = storage.location(cfg.run_address)
    checkpoints = run.child("checkpoints")
    assert checkpoints.list() == [LATEST, "step-00000008", "step-00000012"]
    assert checkpoints.exists(f"step-00000012/{MANIFEST}") and checkpoints.read_text(LATEST).strip() == "step-00000012"
    # The restart read the step-4 checkpoint back from the bucket: 8 more steps on each rank.
    lengths = sorted(len(np.load(p)) for p in traces.glob("rank*-pid*.npy"))
    assert lengths[-2:] == [8, 8], lengths
    restored = fetch(storage.join(cfg.run_address, "checkpoints/step-00000012"))
    expected = weights(reference.run_dir / "checkpoints" / "step-00000012")
    for name, tensor in weights(restored.path).items():
        assert torch.equal(tensor, expected[name]), f"{name} differs from the uninterrupted run on disk"

    # Events, samples and the resolved config reached the bucket too.
    assert {"config.yaml", "tb", "samples"} <= set(run.list())
    assert "samples" in run.list() and "step-00000012.png" in run.list("samples")
    events = tmp_path / "events"
    run.download("tb", events)
    assert max(read_scalars(events)["loss/d"]) == 12

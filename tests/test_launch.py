"""launch/: a real Ray head on 127.0.0.1 with token auth, jobs submitted through the Jobs API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, small_config
from tests.ddp_harness import free_port
from tests.helpers import write_config

pytest.importorskip("ray")
pytestmark = pytest.mark.integration

RAY_CLI = Path(sys.executable).parent / "ray"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # the head's token file goes to $HOME/.ray, not ours
    env = {**os.environ, "HOME": str(home), "RAY_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port())}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(["bash", ROOT / "launch/head.sh", "start", "--num-cpus", "4"],
                             env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert started.returncode == 0, started.stderr
    address = started.stdout.strip().splitlines()[-1]
    assert address == f"http://127.0.0.1:{env['DASHBOARD_PORT']}"
    try:
        yield env, address
    finally:
        subprocess.run(["bash", ROOT / "launch/head.sh", "stop"], env=env, capture_output=True, timeout=120)


def submit(head, config: Path, *extra: str) -> subprocess.CompletedProcess:
    env, address = head
    return subprocess.run(
        ["bash", ROOT / "launch/submit.sh", config, "--address", address, "--", *extra],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_submit_streams_the_job_and_exits_with_its_status(head, tmp_path: Path):
    cfg = small_config(tmp_path, run={"name": "job"}, train={"steps": 4}, checkpoint={"every": 2, "keep": 2},
                       scaling={"num_workers": 1}, runtime={"runner": "ray"})  # fmt: skip
    config = write_config(tmp_path / "job.yaml", cfg)

    done = submit(head, config)
    assert done.returncode == 0, done.stdout + done.stderr
    logs = done.stdout + done.stderr
    assert "RayTrainWorker" in logs and "succeeded" in logs  # the job's own log lines, streamed
    assert (cfg.run_dir / "checkpoints" / "step-00000004" / "manifest.json").is_file()

    resumed = submit(head, config, "--set", "train.steps=6")  # same run name: resumes
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr and "(step 4," in resumed.stdout + resumed.stderr
    assert (cfg.run_dir / "checkpoints" / "step-00000006").is_dir()

    failed = submit(head, config, "--set", "train.steps=zero")
    assert failed.returncode != 0
    assert "train.steps" in failed.stdout + failed.stderr and "failed" in failed.stdout + failed.stderr


def test_the_head_refuses_a_client_without_its_token(head):
    env, address = head
    wrong = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
    listing = subprocess.run([RAY_CLI, "job", "list", "--address", address],
                             env=wrong, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listing.returncode != 0 and "Invalid authentication token" in listing.stdout + listing.stderr
    token_ok = subprocess.run([RAY_CLI, "job", "list", "--address", address],
                              env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert token_ok.returncode == 0, token_ok.stderr


def test_cluster_launcher_config_validates_against_rays_schema():
    import json

    import jsonschema
    import ray.autoscaler
    import yaml

    config = yaml.safe_load((ROOT / "launch/cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    gpu_types = [name for name, t in config["available_node_types"].items() if t["resources"].get("GPU")]
    assert gpu_types, "the cluster needs a GPU worker type"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])

"""Horovod end to end: launch/horovod.sh (horovodrun, 2 processes), Ray's HorovodTrainer, and
checkpoints shared with DDP runs through the one checkpoint protocol."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.config import Config
from tests.conftest import small_config
from tests.helpers import ROOT, checkpoint_tensors, read_scalars, write_config

pytestmark = [pytest.mark.integration, pytest.mark.horovod]

BATCH = 16


def horovod_config(tmp_path: Path, name: str, steps: int, **sections) -> Config:
    return small_config(
        tmp_path, run={"name": name}, train={"global_batch_size": BATCH, "steps": steps, "max_failures": 1},
        scaling={"num_workers": 2, "cpus_per_worker": 1}, **sections,
    )  # fmt: skip


def launch(config: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", ROOT / "launch/horovod.sh", config, "-np", "2", *extra],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def checkpoint_state(cfg: Config, step: int) -> dict[str, torch.Tensor]:
    return checkpoint_tensors(cfg.run_dir, step)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: {what}"


def manifest(cfg: Config, step: int) -> dict:
    return json.loads((cfg.run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Config:
    """12 uninterrupted horovodrun steps (checkpoints every 4; 8 and 12 kept): what the resumed
    and the SIGKILLed runs must end identical to."""
    tmp_path = tmp_path_factory.mktemp("horovod-reference")
    cfg = horovod_config(tmp_path, "reference", 12)
    launch(write_config(tmp_path / "reference.yaml", cfg))
    return cfg


def test_horovodrun_trains_checkpoints_and_resumes_exactly(reference, tmp_path: Path):
    first = horovod_config(tmp_path, "resumed", 4)
    launch(write_config(tmp_path / "first.yaml", first))
    resumed = horovod_config(tmp_path, "resumed", 8)
    second = launch(write_config(tmp_path / "resumed.yaml", resumed))
    assert "resuming from" in second.stderr and "(step 4, written by 2 rank(s), now 2)" in second.stderr

    assert manifest(resumed, 8)["world_size"] == 2
    assert_same(checkpoint_state(reference, 8), checkpoint_state(resumed, 8), "the resumed run differs from the straight one")
    scalars = read_scalars(resumed.run_dir / "tb")
    assert sorted(scalars["loss/d"]) == [2, 4, 6, 8]  # one event per logged step, across the resume
    assert all(np.isfinite(v) for v in scalars["loss/g"].values())


def ddp_leg(rank: int, world: int, raw: dict, scratch: str) -> None:
    """One DDP rank of a run: rank 0 plans it (resuming what the run holds), every rank trains."""
    from pipeline import config
    from pipeline.context import RankContext
    from pipeline.job import plan
    from tests.combinations import shared_job

    cfg = config.validate(raw, "ddp leg")
    shared_job(Path(scratch), "ddp", rank, lambda: plan(cfg)).run(RankContext(rank, rank, world, "cpu"))


def test_a_ddp_checkpoint_resumes_under_horovod_and_back(tmp_path: Path, caplog):
    """DDP (2 gloo ranks, as Ray's TorchTrainer starts them) to step 4, Horovod (horovodrun, 2
    processes) to step 8, DDP again to 12."""
    from tests.ddp_harness import run_ranks

    ddp = horovod_config(tmp_path, "shared", 4, runtime={"runner": "ray"})
    run_ranks(2, ddp_leg, ddp.to_dict(), str(tmp_path / "leg1"))
    assert manifest(ddp, 4)["config"]["distributed"]["strategy"] == "ddp"

    horovod = horovod_config(tmp_path, "shared", 8)
    second = launch(write_config(tmp_path / "horovod.yaml", horovod))
    assert "(step 4, written by 2 rank(s), now 2)" in second.stderr
    assert manifest(horovod, 8)["config"]["distributed"]["strategy"] == "horovod"

    back = horovod_config(tmp_path, "shared", 12, runtime={"runner": "ray"})
    run_ranks(2, ddp_leg, back.to_dict(), str(tmp_path / "leg3"))
    assert manifest(back, 12)["world_size"] == 2
    scalars = read_scalars(back.run_dir / "tb")
    assert sorted(scalars["loss/d"]) == [2, 4, 6, 8, 10, 12]  # the resumes continued the run's events
    assert all(np.isfinite(v) for v in scalars["loss/d"].values())


def test_on_ray_a_sigkilled_horovod_worker_resumes_from_the_last_checkpoint(reference, tmp_path: Path):
    """HorovodTrainer (Train V1): rank 1 dies at the start of step 7; Ray restarts both workers
    from the step-4 checkpoint, and the run ends where an uninterrupted horovodrun run ends."""

    killed = horovod_config(tmp_path, "killed", 12, runtime={"runner": "ray"}, distributed={"strategy": "horovod"})
    traces = tmp_path / "traces"
    traces.mkdir()
    command = [sys.executable, "-m", "tests.horovod_ray_job", write_config(tmp_path / "killed.yaml", killed), traces, "1", "7"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"step": 12}
    assert (traces / "killed").exists()

    # The second attempt started from the step-4 checkpoint: 8 more steps on each rank.
    lengths = sorted(len(np.load(p)) for p in traces.glob("rank*-pid*.npy"))
    assert lengths[-2:] == [8, 8], lengths
    assert_same(checkpoint_state(reference, 12), checkpoint_state(killed, 12), "differs from the uninterrupted run")


def test_the_horovodrun_runner_outside_horovodrun_is_refused_naming_the_launcher(tmp_path: Path, monkeypatch, capsys):
    cfg = horovod_config(tmp_path, "alone", 4, distributed={"strategy": "horovod"}, runtime={"runner": "horovodrun"})
    monkeypatch.delenv("HOROVOD_RANK", raising=False)
    assert cli.main(["train", "--config", str(write_config(tmp_path / "alone.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "runtime.runner='horovodrun'" in err and "launch/horovod.sh" in err
    assert not cfg.run_dir.exists()


def test_a_bad_start_on_rank_0_ends_every_process_with_its_message_before_anything_moves(tmp_path: Path):
    """runtime.device=cuda on a host without one, with --fresh over an existing run: rank 0
    refuses before the lease and before --fresh moves the run aside, and every rank ends."""
    cfg = horovod_config(tmp_path, "bad", 4, runtime={"device": "cuda"})
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text("the previous run\n")
    done = subprocess.run(["bash", ROOT / "launch/horovod.sh", write_config(tmp_path / "bad.yaml", cfg), "--", "--fresh"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "runtime.device=cuda, but torch sees no CUDA device" in output  # rank 0: the error itself
    assert "rank 0 could not start the job" in output and "runtime.device=cuda" in output.split("rank 0 could not start the job")[1]
    assert sorted(p.name for p in cfg.run_dir.parent.iterdir()) == ["bad"], "--fresh moved the run before the check"
    assert (cfg.run_dir / "config.yaml").read_text() == "the previous run\n"


def test_sigterm_to_horovodrun_checkpoints_at_a_step_boundary_and_the_rerun_resumes(tmp_path: Path):
    """horovodrun passes SIGTERM to every process and SIGKILLs them 5 s later: the ranks agree on
    the next check step and checkpoint there within that time."""
    cfg = horovod_config(tmp_path, "stopped", 100_000, checkpoint={"every": 100_000, "stop_check_every": 5})
    config = write_config(tmp_path / "stopped.yaml", cfg)
    log = tmp_path / "launch.log"
    with log.open("w") as out:
        job = subprocess.Popen(["bash", ROOT / "launch/horovod.sh", config], stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
        deadline = time.monotonic() + 240
        while "step 6/100000" not in log.read_text() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.5)
        job.send_signal(signal.SIGTERM)  # launch/horovod.sh exec'd horovodrun
        job.wait(timeout=120)
    output = log.read_text()
    assert "stopped on request" in output, output[-3000:]
    stopped_at = int((cfg.run_dir / "checkpoints" / "LATEST").read_text().strip().split("-")[1])
    assert stopped_at >= 10 and stopped_at % 5 == 0, stopped_at

    rerun = launch(config, "--", "--set", f"train.steps={stopped_at + 2}")
    assert f"(step {stopped_at}, written by 2 rank(s), now 2)" in rerun.stderr
    assert (cfg.run_dir / "checkpoints" / f"step-{stopped_at + 2:08d}").is_dir()

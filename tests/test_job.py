"""The driver's part of a run (pipeline.job): one home for the start, explicit resumes that set
the abandoned line aside, paths a cluster job can use, the run lease, node-local preparation."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest

from pipeline import config, storage
from pipeline.checkpoint import LATEST, MANIFEST, CheckpointError, verify
from pipeline.config import ConfigError
from pipeline.context import available_cpus
from pipeline.data import ShardedImages, ensure_prepared
from pipeline.job import StartOptions, plan
from pipeline.lease import LeaseHeld, RunLease
from pipeline.stopping import LeaseLost
from tests.conftest import small_config


def train(cfg, options=StartOptions()) -> dict:
    job = plan(cfg, options)
    return job.run()


def test_an_explicit_resume_of_an_older_step_sets_the_newer_steps_aside(tmp_path: Path, caplog):
    cfg = small_config(tmp_path, train={"steps": 12}, checkpoint={"every": 4, "keep": 3})
    train(cfg)
    checkpoints = cfg.run_dir / "checkpoints"
    old_12 = verify(checkpoints / "step-00000012").manifest

    with caplog.at_level(logging.WARNING):
        job = plan(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 16})}),
                   StartOptions(resume=str(checkpoints / "step-00000004")))  # fmt: skip
    assert job.start == str(checkpoints / "step-00000004")
    (abandoned,) = checkpoints.glob("abandoned-*")
    assert sorted(p.name for p in abandoned.iterdir()) == ["step-00000008", "step-00000012"]
    assert "moved the newer steps step-00000008, step-00000012" in caplog.text
    assert (checkpoints / LATEST).read_text().strip() == "step-00000004"  # auto-resume now finds the new line
    assert plan(cfg).start == str(checkpoints / "step-00000004")

    assert job.run()["step"] == 16
    # keep=3: the new line's 8, 12, 16; the resumed-from step 4 went by retention only after
    # three newer saves, and the abandoned line is untouched.
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000008", "step-00000012", "step-00000016"]
    assert verify(abandoned / "step-00000012").manifest == old_12
    new_12 = verify(checkpoints / "step-00000012").manifest
    assert new_12["created"] > old_12["created"]  # written by the new line ...
    assert new_12["files"]["generator.pt"] == old_12["files"]["generator.pt"]  # ... and resume is exact


def test_latest_is_read_first_and_a_bad_latest_falls_back_to_scanning(tmp_path: Path, caplog):
    cfg = small_config(tmp_path, train={"steps": 8}, checkpoint={"every": 4, "keep": 3})
    train(cfg)
    checkpoints = cfg.run_dir / "checkpoints"
    (checkpoints / LATEST).write_text("step-00000004\n")
    assert plan(cfg).start == str(checkpoints / "step-00000004")  # LATEST, not the newest directory

    (checkpoints / LATEST).write_text("step-00000099\n")  # names nothing: scan
    assert plan(cfg).start == str(checkpoints / "step-00000008")
    with caplog.at_level(logging.WARNING):
        (checkpoints / "step-00000008" / "trainer.json").write_text("{}")
        assert plan(cfg).start == str(checkpoints / "step-00000004")
    assert "skipping checkpoint step-00000008" in caplog.text


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"run": {"dir": "runs"}, "data": {"prepared_dir": "/abs/prepared"}}, "run.dir"),
        ({"runtime": {"storage_path": "shared/runs"}, "data": {"prepared_dir": "/abs/p"}}, "runtime.storage_path"),
        ({"data": {"prepared_dir": None}}, "data.prepared_dir"),
        ({"data": {"source": "folder", "root": "data/celeba", "prepared_dir": "/abs/p"}}, "data.root"),
    ],
)
def test_a_relative_path_under_a_cluster_address_is_a_config_error_naming_the_field(tmp_path, sections, field):
    sections = {**sections, "runtime": {"runner": "ray", "ray_address": "auto", **sections.get("runtime", {})}}
    if "run" in sections:
        sections["run"] = {"name": "t", **sections["run"]}
    with pytest.raises(ConfigError, match=rf"{field}='[^']+'.* is relative, and runtime.ray_address='auto'"):
        small_config(tmp_path, **sections)
    # URIs and absolute paths are fine, and so is a relative path for a local Ray.
    uri = {"runtime": {"runner": "ray", "ray_address": "auto", "storage_path": "s3://bucket/runs"}}
    small_config(tmp_path, **uri)
    small_config(tmp_path, run={"dir": "runs"}, runtime={"runner": "ray"})


def test_a_second_job_on_a_run_is_refused_naming_the_holder(tmp_path: Path):
    runs = storage.location(tmp_path)
    with RunLease(runs, "run"):
        with pytest.raises(LeaseHeld, match=rf"run is in use by another job: pid {os.getpid()} on host {socket.gethostname()}"):
            RunLease(runs, "run").acquire()
        with RunLease(runs, "other"):
            pass
    assert not (tmp_path / "run.lease").exists()
    with RunLease(runs, "run"):  # released: the next job takes it
        pass


def test_a_stale_lease_is_taken_over(tmp_path: Path, caplog):
    runs = storage.location(tmp_path)
    gone = multiprocessing.get_context("spawn").Process(target=int)
    gone.start()
    gone.join()
    for record in (
        {"id": "a", "host": socket.gethostname(), "pid": gone.pid, "heartbeat": 9e18},  # its process is gone
        {"id": "b", "host": "another-node", "pid": 1, "heartbeat": 0.0},  # its heartbeat stopped
    ):
        (tmp_path / "run.lease").write_text(json.dumps(record))
        with caplog.at_level(logging.WARNING), RunLease(runs, "run") as lease:
            assert json.loads((tmp_path / "run.lease").read_text())["id"] == lease.id
        assert "took over the stale lease" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "junk",
    ["not json at all", "[1, 2]", '{"heartbeat": "soon", "pid": [1], "host": 3}', '{"heartbeat": 1e999}', "DIRECTORY"],
)
def test_a_lease_holding_junk_is_taken_over_not_a_traceback(tmp_path: Path, junk: str, caplog):
    runs = storage.location(tmp_path)
    if junk == "DIRECTORY":
        (tmp_path / "run.lease" / "inside").mkdir(parents=True)
    else:
        (tmp_path / "run.lease").write_text(junk)
    with caplog.at_level(logging.WARNING), RunLease(runs, "run") as lease:
        assert json.loads((tmp_path / "run.lease").read_text())["id"] == lease.id
    assert "took over the stale lease" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_resume_may_switch_global_batchnorm(tmp_path: Path):
    """sync_batchnorm changes no tensor name or shape: a checkpoint of either setting resumes."""
    plain = small_config(tmp_path, train={"steps": 2}, checkpoint={"every": 2, "keep": 2})
    synced = small_config(tmp_path, train={"steps": 4}, checkpoint={"every": 2, "keep": 2}, model={"sync_batchnorm": True})
    assert config.model_mismatch(plain.to_dict(), synced) == []
    assert config.model_mismatch(plain.to_dict(), small_config(tmp_path, model={"ngf": 16})) != []


def test_the_lease_beats_while_held(tmp_path: Path):
    runs = storage.location(tmp_path)
    with RunLease(runs, "run", heartbeat_every=0.05) as lease:
        first = json.loads((tmp_path / "run.lease").read_text())["heartbeat"]
        import time

        time.sleep(0.3)
        assert json.loads((tmp_path / "run.lease").read_text())["heartbeat"] > first
        assert lease.id in (tmp_path / "run.lease").read_text()


def test_a_lost_lease_ends_training_at_the_next_step_without_writing(tmp_path: Path):
    """Another job took the run over (as after this holder stalled past the stale age): rank 0
    sees it within stop_poll_seconds, and the ranks end at the next agreed step, before the
    next checkpoint; the holder never writes its lease record again."""
    cfg = small_config(
        tmp_path, train={"steps": 400}, checkpoint={"every": 4, "keep": 10, "stop_check_every": 1, "stop_poll_seconds": 0.05}
    )
    runs = storage.location(cfg.runs_root)
    usurper = {"id": "usurper", "host": "elsewhere", "pid": 1, "heartbeat": 9e18}

    def take_over_after_the_first_checkpoint(step, saved, metrics) -> None:
        if step == 4:
            (tmp_path / "runs" / "t.lease").write_text(json.dumps(usurper))
            time.sleep(0.5)  # rank 0's poll thread sees it before step 5's agreement

    with RunLease(runs, "t", heartbeat_every=0.1) as lease:
        job = plan(cfg, lease=lease.token)
        with pytest.raises(LeaseLost, match="stopped at step 5 without writing: its lease is held by pid 1 on host elsewhere"):
            job.run(on_checkpoint=take_over_after_the_first_checkpoint)
        assert lease.lost.wait(2.0)
    assert sorted(p.name for p in (tmp_path / "runs" / "t" / "checkpoints").iterdir()) == [LATEST, "step-00000004"]
    assert json.loads((tmp_path / "runs" / "t.lease").read_text()) == usurper  # neither rewritten nor released


def test_available_cpus_follows_the_cgroup_quota(tmp_path: Path):
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(tmp_path / "v2") == min(affinity, 2)
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path / "v2") == affinity
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path / "v1") == 1
    assert available_cpus(tmp_path / "none") == affinity


@pytest.mark.parametrize("name", ["../../outside.bin", "/etc/passwd", "a/../../b"])
def test_manifest_names_that_leave_the_directory_are_refused(tmp_path: Path, name: str):
    cfg = small_config(tmp_path, train={"steps": 4})
    train(cfg)
    step = cfg.run_dir / "checkpoints" / "step-00000004"
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["files"][name] = manifest["files"].pop("trainer.json")
    (step / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refusing file name"):
        verify(step)

    prepared = Path(cfg.data.prepared_dir)
    shards = json.loads((prepared / MANIFEST).read_text())
    shards["shards"][0]["file"] = name
    (prepared / MANIFEST).write_text(json.dumps(shards))
    with pytest.raises(ValueError, match="refusing file name"):
        ShardedImages(prepared)


def _prepare_in_child(cfg_dict: dict, log_path: str) -> None:
    from pipeline import config

    logging.basicConfig(filename=log_path, level=logging.INFO)
    ensure_prepared(config.validate(cfg_dict).data)


def test_processes_preparing_one_directory_at_once_prepare_it_once(tmp_path: Path):
    cfg = small_config(tmp_path, data={"synthetic_count": 3000})
    spawn = multiprocessing.get_context("spawn")
    children = [spawn.Process(target=_prepare_in_child, args=(cfg.to_dict(), str(tmp_path / f"log{i}"))) for i in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    logs = "".join((tmp_path / f"log{i}").read_text() for i in range(2))
    assert logs.count("prepared 3000 images") == 1  # the other waited on the lock, then reused it
    assert len(ShardedImages(Path(cfg.data.prepared_dir))) == 3000

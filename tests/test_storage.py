"""Runs and prepared data in object storage, against a real S3-compatible server on 127.0.0.1
(moto's server mode): the checkpoint protocol, uploads cut short, staged shards, the lease."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import storage
from pipeline.checkpoint import LATEST, MANIFEST, CheckpointError, CheckpointManager, fetch
from pipeline.data import DataError, ShardedImages, ensure_prepared, local_prepared_dir
from pipeline.lease import LeaseHeld, RunLease
from tests.conftest import ROOT, small_config
from tests.helpers import s3_server

pytest.importorskip("pyarrow")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3_base():
    with s3_server() as base:
        yield base


@pytest.fixture
def bucket_dir(s3_base: str, request) -> str:
    """A fresh prefix per test."""
    return storage.join(s3_base, request.node.name.replace("[", "-").replace("]", ""))


def payload(files: dict[str, bytes]):
    def write_files(directory: Path) -> None:
        for name, data in files.items():
            (directory / name).write_bytes(data)

    return write_files


def test_a_location_in_a_bucket_reads_writes_lists_moves_and_deletes(bucket_dir: str):
    where = storage.location(bucket_dir)
    assert not where.is_local and where.list() == []
    where.write_text("a/one.txt", "1")
    where.write_text("a/b/two.txt", "2")
    assert where.list() == ["a"] and where.list("a") == ["b", "one.txt"]
    assert where.read_text("a/b/two.txt") == "2"
    where.move("a", "moved/a")
    assert where.list() == ["moved"] and where.child("moved").read_text("a/one.txt") == "1"
    with pytest.raises(FileNotFoundError):
        where.read_text("a/one.txt")
    where.delete("moved")
    assert where.list() == []


def test_checkpoints_in_a_bucket_are_uploaded_manifest_last_and_downloaded_verified(bucket_dir: str, caplog):
    manager = CheckpointManager(storage.join(bucket_dir, "checkpoints"), keep=2)
    for step in (4, 8, 12):
        saved = manager.save(step, payload({"g.bin": bytes([step]) * 1000, "trainer.json": b"{}"}), {"framework": "torch"})
        assert saved.address == storage.join(bucket_dir, f"checkpoints/step-{step:08d}")
    remote = storage.location(storage.join(bucket_dir, "checkpoints"))
    assert remote.list() == [LATEST, "step-00000008", "step-00000012"]  # keep=2 pruned step 4 in the bucket
    assert remote.read_text(LATEST).strip() == "step-00000012"

    info = fetch(saved.address)  # what a rank on another node does: download to its own disk, verify
    assert info.step == 12 and info.path.is_dir() and (info.path / "g.bin").read_bytes() == bytes([12]) * 1000

    # A corrupt newest object: discovery skips it with a warning and takes the previous one.
    remote.write_text("step-00000012/g.bin", "flipped")
    storage_cache = storage.cache_dir_for("checkpoints", saved.address)
    __import__("shutil").rmtree(storage_cache)  # another node: no copy downloaded yet
    with caplog.at_level(logging.WARNING):
        assert manager.latest().step == 8
    assert "skipping checkpoint step-00000012" in caplog.text and "checksum mismatch in g.bin" in caplog.text
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        fetch(saved.address)


def test_a_step_name_written_again_is_fetched_anew_not_from_the_nodes_copy_of_the_old_one(bucket_dir: str):
    """`--fresh`, an older-step resume and a dry run write a step name again; a node that
    fetched the old one must not load it (its copy verifies against its own manifest)."""
    first = CheckpointManager(storage.join(bucket_dir, "checkpoints"), keep=2, job="A")
    first.save(4, payload({"g.bin": b"A" * 100}), {"framework": "torch"})
    assert (first.latest(job="A").path / "g.bin").read_bytes() == b"A" * 100  # now in this node's cache

    second = CheckpointManager(storage.join(bucket_dir, "checkpoints"), keep=2, job="B")
    second.save(4, payload({"g.bin": b"B" * 100}), {"framework": "torch"})
    fetched = second.latest(job="B")
    assert fetched is not None and (fetched.path / "g.bin").read_bytes() == b"B" * 100
    assert fetched.manifest["job"] == "B"
    node_copies = sorted(p.name for p in fetched.path.parent.iterdir())
    assert node_copies == [fetched.path.name], node_copies  # the old content is gone, nothing half-downloaded


# A child process that uploads checkpoint 12 and SIGKILLs itself after the first object of it:
# no cleanup, no finally blocks, exactly what a killed pod leaves behind in the bucket.
_KILLED_UPLOAD = textwrap.dedent(
    """
    import os, signal, sys
    from pipeline import storage
    from pipeline.checkpoint import CheckpointManager

    real_upload_file = storage.ObjectLocation.upload_file
    def upload_file(self, local_file, name):
        real_upload_file(self, local_file, name)
        os.kill(os.getpid(), signal.SIGKILL)
    storage.ObjectLocation.upload_file = upload_file

    def write_files(directory):
        for name in ("a.bin", "b.bin", "trainer.json"):
            (directory / name).write_bytes(b"x" * 4096)

    CheckpointManager(sys.argv[1], keep=3).save(12, write_files, {"framework": "torch"})
    sys.exit(3)  # never reached
    """
)


def test_a_kill_in_the_middle_of_an_upload_never_leaves_a_checkpoint_resume_would_load(bucket_dir: str):
    address = storage.join(bucket_dir, "checkpoints")
    manager = CheckpointManager(address, keep=3)
    manager.save(8, payload({"a.bin": b"8" * 4096, "trainer.json": b"{}"}), {"framework": "torch"})

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", _KILLED_UPLOAD, address], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()

    remote = storage.location(address)
    assert "step-00000012" in remote.list()  # the cut-short upload is there ...
    assert not remote.exists(f"step-00000012/{MANIFEST}")  # ... without its manifest
    assert manager.complete_steps() == ["step-00000008"]
    assert manager.latest().step == 8  # never the half-uploaded one

    manager.save(16, payload({"a.bin": b"6" * 4096, "trainer.json": b"{}"}), {"framework": "torch"})
    assert "step-00000012" not in remote.list()  # the next save cleans the leftover up


def test_prepared_data_in_a_bucket_is_staged_on_each_node_and_checked(bucket_dir: str, tmp_path: Path, monkeypatch):
    address = storage.join(bucket_dir, "prepared")
    cfg = small_config(tmp_path, data={"prepared_dir": address, "synthetic_count": 40, "shard_size": 16}).data
    assert ensure_prepared(cfg) == address
    remote = storage.location(address)
    assert remote.list() == [MANIFEST, "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]

    monkeypatch.setenv("DCGAN_CACHE_DIR", str(tmp_path / "node-b"))  # a node that has nothing yet
    local = local_prepared_dir(cfg)
    assert local.is_relative_to(tmp_path / "node-b") and len(ShardedImages(local)) == 40
    assert local_prepared_dir(cfg) == local  # staged once; the second call checks and reuses

    monkeypatch.setenv("DCGAN_CACHE_DIR", str(tmp_path / "node-c"))
    with remote.fs.open_output_stream(f"{remote.root}/shard-00001.npy") as sink:
        sink.write(np.zeros(10, np.uint8).tobytes())  # the object no longer matches the manifest
    with pytest.raises(DataError, match="shard-00001.npy: its sha256 differs"):
        local_prepared_dir(cfg)


def test_a_fresh_run_in_a_bucket_uploads_none_of_the_older_runs_files(bucket_dir: str, tmp_path: Path):
    """The chief writes a URI run's live files to a mirror on its node and uploads what changed:
    after `--fresh`, the old run's events and samples must not reappear in the new one."""
    from pipeline.job import StartOptions, plan

    cfg = small_config(tmp_path, runtime={"device": "cpu", "storage_path": bucket_dir}, train={"steps": 8})
    plan(cfg).run()
    run = storage.location(cfg.run_address)
    assert run.list("samples") == ["step-00000004.png", "step-00000008.png"]
    cfg.train.steps = 4
    plan(cfg, StartOptions(fresh=True)).run()
    assert run.list("samples") == ["step-00000004.png"]
    assert len(run.list("tb")) == 1, run.list("tb")  # the new run's event file alone


def test_a_second_job_on_a_run_in_a_bucket_is_refused_and_a_stale_lease_is_taken_over(bucket_dir: str):
    runs = storage.location(bucket_dir)
    with RunLease(runs, "run-a"):
        with pytest.raises(LeaseHeld, match=r"run-a is in use by another job: pid \d+ on host"):
            RunLease(runs, "run-a").acquire()
        assert len(runs.list("run-a.lease")) == 1  # the refused contender removed its candidate
        with RunLease(runs, "run-b"):  # other runs are independent
            pass
    assert runs.list("run-a.lease") == []

    # A dead job's lease: the store last saw it written longer ago than the stale age.
    dead = {"id": "dead", "host": "elsewhere", "pid": 1, "heartbeat": time.time(), "command": "dcgan train"}
    runs.write_text("run-a.lease/00000000000000000001-dead.json", json.dumps(dead))
    time.sleep(2.1)  # S3 stamps whole seconds
    with RunLease(runs, "run-a", stale_after=1.0):
        assert len(runs.list("run-a.lease")) == 1


def test_a_lease_in_a_bucket_is_aged_by_the_stores_clock_and_a_lost_one_is_never_written_again(bucket_dir: str):
    runs = storage.location(bucket_dir)
    # A live holder on a host whose clock runs an hour behind: its own timestamp looks stale.
    skewed = {"id": "skewed", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600, "command": "dcgan train"}
    runs.write_text("run.lease/00000000000000000001-skewed.json", json.dumps(skewed))
    with pytest.raises(LeaseHeld, match="pid 1 on host elsewhere"):
        RunLease(runs, "run").acquire()
    runs.delete("run.lease")

    # A holder whose beats stall past the stale age is taken over; its next beat finds its
    # record gone and gives the lease up instead of writing it back (both would hold the run).
    stalled = RunLease(runs, "run", heartbeat_every=4.0, stale_after=1.0)
    stalled.acquire()
    time.sleep(2.1)
    with RunLease(runs, "run", stale_after=1.0) as taker:
        assert runs.list("run.lease") == [taker.name.rpartition("/")[2]]
        assert stalled.lost.wait(6.0), "the stalled holder never noticed"
        assert runs.list("run.lease") == [taker.name.rpartition("/")[2]]  # not written back
        assert stalled.token.check() is not None and taker.token.check() is None
        stalled.release()  # removes nothing of the taker's
        assert runs.list("run.lease") == [taker.name.rpartition("/")[2]]


# Bounds for the fault tests' training processes: a stalled transfer fails after 1 s, and each
# request is tried twice, so one request gives up within about 3 s.
FAULT_BOUNDS = {"DCGAN_STORAGE_TIMEOUT_S": "1", "DCGAN_STORAGE_ATTEMPTS": "2"}
FAULT_DEADLINE_S = 60  # the run's exit: a few requests on the way out (upload, mirror, lease) at ~3 s each


@pytest.mark.integration  # `dcgan train` processes
@pytest.mark.parametrize("fault", ["frozen", "killed", "bucket_gone"])
def test_a_store_that_fails_mid_run_ends_it_with_a_clear_error_and_the_last_checkpoint_intact(fault: str, tmp_path: Path):
    """The store stops answering (SIGSTOP), goes away, or loses its bucket while a run trains:
    the run ends within FAULT_DEADLINE_S naming the store and the operation, without a
    traceback; once a frozen store answers again, the rerun resumes from the last checkpoint."""
    import boto3

    from tests.helpers import write_config

    with s3_server() as base:
        endpoint = base.partition("endpoint_override=")[2].partition("&")[0]
        server = int(subprocess.check_output(["pgrep", "-f", f"moto_server -H 127.0.0.1 -p {endpoint.rpartition(':')[2]}"]).split()[0])
        cfg = small_config(tmp_path, runtime={"device": "cpu", "storage_path": base}, train={"steps": 100_000},
                           checkpoint={"every": 4, "keep": 2}, logging={"every": 4, "samples_every": 1000})  # fmt: skip
        config_path = write_config(tmp_path / "run.yaml", cfg)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", **FAULT_BOUNDS}
        command = [sys.executable, "-m", "pipeline", "train", "--config", str(config_path)]
        run = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        checkpoints = storage.location(storage.join(cfg.run_address, "checkpoints"))
        try:
            deadline = time.monotonic() + 120
            while not checkpoints.exists(LATEST):
                assert run.poll() is None and time.monotonic() < deadline, "the run never checkpointed"
                time.sleep(0.2)
            if fault == "frozen":
                os.kill(server, signal.SIGSTOP)
            elif fault == "killed":
                os.kill(server, signal.SIGKILL)
            else:
                bucket = boto3.resource("s3", endpoint_url=f"http://{endpoint}").Bucket("dcgan-test")
                for _ in range(50):  # the run keeps writing into it meanwhile
                    bucket.objects.all().delete()
                    try:
                        bucket.delete()
                        break
                    except bucket.meta.client.exceptions.ClientError:
                        continue
            faulted = time.monotonic()
            _, stderr = run.communicate(timeout=FAULT_DEADLINE_S)
            took = time.monotonic() - faulted
        finally:
            run.kill()
            os.kill(server, signal.SIGCONT) if fault == "frozen" else None
        assert run.returncode == 1, stderr[-3000:]
        assert f"error: object store s3://dcgan-test at {endpoint}:" in stderr, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        assert took < FAULT_DEADLINE_S
        print(f"{fault}: the run ended {took:.1f} s after the fault")
        if fault != "frozen":
            return  # the store's content went with it (moto keeps objects in memory)
        latest = CheckpointManager(storage.join(cfg.run_address, "checkpoints"), keep=2).latest()
        assert latest is not None  # the last good checkpoint verifies
        rerun = subprocess.run([*command, "--set", f"train.steps={latest.step + 4}"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"resuming from {latest.address} (step {latest.step}" in rerun.stderr, rerun.stderr[-3000:]

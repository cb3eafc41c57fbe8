"""Why a run ends early (pipeline.stopping): the ranks' agreement, rank 0's storage poll, the
lease watch, and the exceptions that cross process boundaries."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.lease import RunLease
from pipeline.stopping import LeaseLost, LeaseToken, Preempted, RankStop, Stop, agree, lease_poll, stop_file_poll


def test_the_ranks_agree_on_the_most_severe_level_any_of_them_saw():
    for mine in Stop:
        for theirs in Stop:
            # A world of two: the collective ORs each flag over both ranks.
            other = [theirs >= level for level in list(Stop)[1:]]
            any_rank = lambda flags: [a or b for a, b in zip(flags, other)]  # noqa: E731
            assert agree(mine, any_rank) == max(mine, theirs)


def test_a_failed_storage_poll_is_logged_and_counts_as_no_stop(tmp_path: Path, caplog):
    def unreachable() -> Stop:
        raise OSError("the store did not answer")

    stop = RankStop(polls=[unreachable, stop_file_poll(storage.location(tmp_path))])
    with caplog.at_level(logging.WARNING):
        stop.poll_once()
    assert stop() is Stop.NONE and "the store did not answer" in caplog.text
    (tmp_path / "STOP").write_text("please\n")
    stop.poll_once()
    assert stop() is Stop.CHECKPOINT


def test_the_lease_watch_abandons_a_lease_taken_over_or_unconfirmed_past_the_stale_age(tmp_path: Path, monkeypatch):
    runs = storage.location(tmp_path)
    with RunLease(runs, "run") as lease:
        poll = lease_poll(lease.token)
        assert poll() is Stop.NONE
        (tmp_path / "run.lease").write_text(json.dumps({"id": "other", "pid": 7, "host": "elsewhere"}))
        assert poll() is Stop.ABANDON and "pid 7 on host elsewhere" in poll.reason()
        (tmp_path / "run.lease").write_text(json.dumps({"id": lease.id}))  # the release must find its own

    token = LeaseToken(str(tmp_path), "run.lease", "mine", stale_after=90, heartbeat_every=15)
    (tmp_path / "run.lease").write_text(json.dumps({"id": "mine"}))
    clock = [1000.0]
    monkeypatch.setattr("pipeline.stopping.time.monotonic", lambda: clock[0])
    poll = lease_poll(token)
    monkeypatch.setattr(LeaseToken, "check", lambda self: (_ for _ in ()).throw(OSError("timed out")))
    clock[0] += 60  # a storage outage shorter than the stale age less a beat: wait and see
    with pytest.raises(OSError):
        poll()
    clock[0] += 16  # past 75 s unconfirmed: a taker may have come
    assert poll() is Stop.ABANDON and "could not be confirmed for 76 s" in poll.reason()


def test_the_stop_exceptions_survive_the_trip_between_processes():
    """Ray ships a worker's exception to the driver by pickling it."""
    for raised in (Preempted(12, "s3://bucket/runs/r/checkpoints/step-00000012"), LeaseLost(5, "its lease is gone")):
        shipped = pickle.loads(pickle.dumps(raised))
        assert type(shipped) is type(raised) and str(shipped) == str(raised) and shipped.step == raised.step


def test_a_stop_file_checkpoints_and_ends_a_local_run_and_the_next_job_resumes_without_it(tmp_path: Path):
    import time

    from pipeline.job import plan
    from tests.conftest import small_config

    cfg = small_config(tmp_path, train={"steps": 400}, checkpoint={"every": 4, "keep": 3, "stop_check_every": 1, "stop_poll_seconds": 0.05})

    def ask_to_stop_after_step_4(step, saved, metrics) -> None:
        if step == 4:
            (tmp_path / "runs" / "t" / "STOP").write_text("a user\n")
            time.sleep(0.5)  # rank 0's poll thread sees it before step 5's agreement

    with pytest.raises(Preempted, match="at step 5"):
        plan(cfg).run(on_checkpoint=ask_to_stop_after_step_4)
    assert (tmp_path / "runs" / "t" / "checkpoints" / "step-00000005").is_dir()
    cfg.train.steps = 8
    assert plan(cfg).run()["step"] == 8  # the STOP was the stopped job's: this one runs to the end
    assert not (tmp_path / "runs" / "t" / "STOP").exists()


def test_the_lease_token_reaches_the_ranks_whole():
    """Ray ships the Job to its workers as `dataclasses.asdict` (nested dataclasses too)."""
    import dataclasses

    from pipeline.job import Job

    token = LeaseToken("s3://bucket/runs", "r.lease/1-abc.json", "abc", stale_after=90, heartbeat_every=15)
    shipped = Job(**dataclasses.asdict(Job({"backend": "torch"}, lease=token)))
    assert shipped.lease == token and shipped.lease.give_up_after == 75

"""One trial of a sweep: a whole job of ours, run by a Tune trainable.

The trainable is the trial's driver (Ray's pattern for Train inside Tune): it plans the job
(pipeline.job, with the trial's own run directory and lease) and runs it through the Ray
runner, whose Trainer starts the trial's `scaling.num_workers` workers with their own
resources; the trainable itself reserves a hundredth of a CPU. The job runs in a thread; `step` returns each
scored checkpoint to Tune in step order, as the evaluations land (in-line, or apart as Ray's
checkpoint validation): eval/fid, its std and its card key, which the schedulers read.

Tune's checkpoints of a trial are pointers to ours (`pointer.json`: the address of the
checkpoint last reported). PBT's exploit restores a worse trial from a better one's pointer: the
job then resumes from that checkpoint with the trial's new (perturbed) config, whose learning
rates the backends take over the checkpoint's. A trial Tune stops (ASHA, an exploit, the end
of the sweep) is asked through its run's STOP file: the ranks agree on a step, checkpoint
there and return, and the lease is released; a later start of the trial (Tune may start it
before the old actor is done) waits for that.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from ray import tune

from pipeline import storage
from pipeline import tensorboard as tb
from pipeline.checkpoint import CheckpointError, CheckpointManager, fetch, step_dir_name, step_of
from pipeline.config import Config
from pipeline.stopping import STOP_FILE, Preempted
from pipeline.sweep.schedulers import CARD_KEY, TIME_ATTR
from pipeline.sweep.space import trial_config

log = logging.getLogger(__name__)

POINTER = "pointer.json"
CHECKPOINT = "checkpoint"  # a result's address of the checkpoint it scores
POLL_SECONDS = 0.5
STOP_WAIT_SECONDS = 600  # how long a stopped trial's ranks get to checkpoint and return


def trial_run_config(sweep: Config, values: dict[str, Any], trials_root: str, trial_id: str) -> Config:
    """The trial's config: the sweep's with the trial's values, run under <sweep>/trials/<trial_id>."""
    cfg = trial_config(sweep, values)
    cfg.runtime.storage_path = trials_root
    cfg.run.name = trial_id
    return cfg


class Trial(tune.Trainable):
    def setup(self, config: dict[str, Any], sweep: Optional[dict[str, Any]] = None, trials_root: str = "") -> None:
        from pipeline import config as config_module

        self.cfg = trial_run_config(config_module.validate(sweep, "the sweep's config"), config, trials_root, self.trial_id)
        self.run_address = self.cfg.run_address
        self.checkpoints = CheckpointManager(storage.join(self.run_address, "checkpoints"), None)
        self.start_from: Optional[str] = None  # another trial's checkpoint (PBT)
        self.reported_step, self.reported_address = 0, None
        self.last_result: dict[str, Any] = {tb.TAG_EVAL_FID: float("nan")}
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.stop_requested = threading.Event()

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        pointer = json.loads((Path(checkpoint_dir) / POINTER).read_text())
        self.reported_step, self.reported_address = pointer["step"], pointer["checkpoint"]
        if pointer["checkpoint"] and not self._is_own(pointer["checkpoint"]):
            self.start_from = pointer["checkpoint"]  # an exploit: start from the better trial's
            log.info("trial %s starts from %s with %s", self.trial_id, self.start_from, self.config)
        # Else its own: the job resumes from its run's newest checkpoint by itself.

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        """The pointer: the checkpoint last reported (what a trial exploiting this one starts
        from). Once this actor's job has trained in the trial's own run, never a donor's: a
        trial paused after an exploit resumes its own line, not the donor's again."""
        address = self.reported_address
        if self.thread is not None and (address is None or not self._is_own(address)):
            latest = self.checkpoints.latest_name()
            address = storage.join(self.run_address, f"checkpoints/{latest}") if latest else address
        pointer = {"checkpoint": address, "step": self.reported_step, "run": self.run_address}
        (Path(checkpoint_dir) / POINTER).write_text(json.dumps(pointer))
        return checkpoint_dir

    def _is_own(self, address: str) -> bool:
        return address.startswith(self.run_address.rstrip("/") + "/")

    def step(self) -> dict[str, Any]:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run_job, name=f"trial-{self.trial_id}", daemon=True)
            self.thread.start()
        while True:
            finished = not self.thread.is_alive()  # read first: what it wrote before ending is then seen
            result = self._next_scored()
            if result is not None:
                return result
            if finished:
                if self.error is not None:
                    raise self.error
                # The last score again (Tune wants its metric in every result), at the final step.
                latest = self.checkpoints.latest_name()
                end = max(self.reported_step, step_of(latest) if latest else 0)
                return {**self.last_result, TIME_ATTR: end, "done": True}
            time.sleep(POLL_SECONDS)

    def cleanup(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            return
        self.stop_requested.set()
        self._write_stop()
        self.thread.join(STOP_WAIT_SECONDS)
        if self.thread.is_alive():
            log.warning("trial %s: its ranks did not stop within %d s", self.trial_id, STOP_WAIT_SECONDS)

    def _write_stop(self) -> None:
        storage.location(self.run_address).write_text(STOP_FILE, f"stopped by the sweep (trial {self.trial_id})\n")

    def _run_job(self) -> None:
        from pipeline import ray_runner
        from pipeline.job import StartOptions, plan
        from pipeline.preflight import check_before_writing

        try:
            check_before_writing(self.cfg)
            with self._lease() as lease:
                job = plan(self.cfg, StartOptions(resume=self._donor_checkpoint()), None, lease.token)
                # Only this job's pending evaluations will come: older ones ended with their fit.
                self.checkpoints = CheckpointManager(self.checkpoints.location, None, job=job.id)
                if self.stop_requested.is_set():  # asked before planning, which clears a STOP left behind
                    self._write_stop()
                ray_runner.run(job)
        except Preempted:
            log.info("trial %s stopped at a checkpoint", self.trial_id)
        except BaseException as err:  # the trial fails with it (step raises it), the sweep goes on
            self.error = err

    @contextmanager
    def _lease(self) -> Iterator:
        """The trial's run lease. Tune starts a paused or exploited trial's new actor while the
        old one still stops (its ranks checkpoint at the STOP request, then release the
        lease): the new one waits for that, up to the time a stop gets."""
        from pipeline.lease import LeaseHeld, RunLease

        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while True:
            lease = RunLease(storage.location(self.cfg.runs_root), self.cfg.run.name)
            try:
                lease.acquire()
                break
            except LeaseHeld:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        try:
            yield lease
        finally:
            lease.release()

    def _donor_checkpoint(self) -> Optional[str]:
        """The better trial's checkpoint an exploit named, or, when its retention has deleted
        that one since (it trains on), its newest."""
        if self.start_from is None:
            return None
        try:
            return fetch(self.start_from).address
        except (CheckpointError, FileNotFoundError) as err:
            donor = CheckpointManager(self.start_from.rstrip("/").rpartition("/")[0], None).latest()
            if donor is None:
                raise
            log.warning("trial %s: %s is gone (%s); starting from that trial's newest, %s",
                        self.trial_id, self.start_from, err, donor.address)  # fmt: skip
            return donor.address

    def _next_scored(self) -> Optional[dict[str, Any]]:
        """The oldest checkpoint past the last reported one that has its scores, as a result;
        None while there is none, or an older one's evaluation is still pending (results go
        to Tune in step order)."""
        for name in sorted(self.checkpoints.complete_steps()):
            step = step_of(name)
            if step <= self.reported_step:
                continue
            record = self.checkpoints.scores(name)
            if record is None:
                if self.checkpoints.evaluation_pending(name):
                    return None
                continue  # not an evaluation step, or its evaluation failed
            if record.get("error"):
                continue
            self.reported_step = step
            self.reported_address = storage.join(self.run_address, f"checkpoints/{step_dir_name(step)}")
            self.last_result = _result(step, record, self.reported_address)
            return self.last_result
        return None


def _result(step: int, record: dict[str, Any], address: str) -> dict[str, Any]:
    scores = {k: float(v) for k, v in (record.get("scores") or {}).items() if isinstance(v, (int, float))}
    score = record.get("score")
    return {
        **scores,
        TIME_ATTR: step,
        tb.TAG_EVAL_FID: float(score) if score is not None else float("nan"),
        tb.TAG_EVAL_FID_STD: float(record.get("score_std") or 0.0),
        CARD_KEY: record.get("card_key"),
        CHECKPOINT: address,
    }

"""Why a run ends before train.steps, decided in one place for every runner.

A rank can learn of three things, and the ranks agree at the same steps on the most severe:

- a node drain that Ray reports (a spot reclaim, a scale-down): the ranks write a checkpoint at
  the agreed step and keep training. When the node goes, Ray restarts the group from that
  checkpoint and charges the loss to its preemption budget (unlimited by default), not to
  `train.max_failures`: this is Ray's documented reaction to `get_preemption_info()`.
- a stop request: SIGTERM to this process (the runner's handler), or a STOP file in the run
  directory (`ray job stop` makes the driver write one; a user may too). The ranks checkpoint
  at the agreed step, then end (`Preempted`).
- the run's lease lost: another job has taken the run over (its holder's heartbeats stalled past
  the stale age). The ranks end at the agreed step *without writing* (`LeaseLost`, exit 3).

What needs storage (the STOP file, the lease record) is polled by time on rank 0 alone, in a
thread: no storage request runs in-line with a step, and one that fails is logged and taken as
"no stop" (a storage hiccup must not end a run). The other ranks learn the answer from the
agreement, one all-reduce at the loop's check steps.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from pipeline import storage

log = logging.getLogger(__name__)

STOP_FILE = "STOP"  # in the run directory: checkpoint at the next check step and end


class Stop(enum.IntEnum):
    """Ordered by severity: the ranks act on the most severe that any of them saw."""

    NONE = 0
    DRAIN = 1  # checkpoint at the agreed step (once) and keep training: this node is going away
    CHECKPOINT = 2  # checkpoint at the agreed step, then end
    ABANDON = 3  # end at the agreed step and write nothing more: the run is another job's now


class Preempted(RuntimeError):
    """The ranks stopped at a step boundary on request, after writing a checkpoint there."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(
            f"stopped on request (SIGTERM or a STOP file) at step {step}, after writing {checkpoint}; "
            "running the same job again resumes there"
        )
        self.step, self.checkpoint = step, checkpoint

    def __reduce__(self):  # rebuilt from its arguments where Ray ships it between processes
        return type(self), (self.step, self.checkpoint)


class LeaseLost(RuntimeError):
    """The ranks stopped without writing: another job holds the run's lease now."""

    def __init__(self, step: int, reason: str):
        super().__init__(
            f"stopped at step {step} without writing: {reason}. Another job may be writing this run; "
            "check which (its lease record names it) before running this one again"
        )
        self.step, self.reason = step, reason

    def __reduce__(self):
        return type(self), (self.step, self.reason)


@dataclass(frozen=True)
class LeaseToken:
    """What identifies the lease a job's driver holds, shipped to its ranks (picklable)."""

    runs: str  # the directory that holds the lease (a path or a URI)
    record: str  # the lease record's name below it
    id: str  # the holder's id, written in the record
    stale_after: float  # seconds after which another job may take a silent lease over
    heartbeat_every: float

    @property
    def give_up_after(self) -> float:
        """Unconfirmed for this long, the holder must assume it lost the lease: a beat before
        another job could take a stale one over."""
        return max(self.stale_after - self.heartbeat_every, self.heartbeat_every)

    def check(self) -> Optional[str]:
        """Why the lease is no longer ours (None while it is); OSError when storage fails."""
        try:
            text = storage.location(self.runs).read_text(self.record)
        except FileNotFoundError:
            return f"its lease record {self.record} is gone (taken over as stale)"
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None  # a record being rewritten: a file lease is replaced by link, never torn
        if isinstance(holder, dict) and holder.get("id") != self.id:
            return f"its lease is held by pid {holder.get('pid')} on host {holder.get('host')} now"
        return None


def stop_file_poll(run: storage.Location) -> Callable[[], Stop]:
    def poll() -> Stop:
        return Stop.CHECKPOINT if run.exists(STOP_FILE) else Stop.NONE

    return poll


def lease_poll(token: LeaseToken) -> Callable[[], Stop]:
    """ABANDON once the lease is someone else's, or could not be confirmed for give_up_after
    seconds (after that, a stale takeover may have happened unseen)."""
    confirmed = time.monotonic()
    lost: list[str] = []

    def poll() -> Stop:
        nonlocal confirmed
        if lost:
            return Stop.ABANDON
        try:
            reason = token.check()
        except OSError as err:
            unconfirmed = time.monotonic() - confirmed
            if unconfirmed < token.give_up_after:
                raise
            reason = f"its lease could not be confirmed for {unconfirmed:.0f} s ({err})"
        if reason is None:
            confirmed = time.monotonic()
            return Stop.NONE
        lost.append(reason)
        log.error("the run's lease is lost: %s", reason)
        return Stop.ABANDON

    poll.reason = lambda: lost[0] if lost else None  # type: ignore[attr-defined]
    return poll


class RankStop:
    """One rank's answer to "must we stop?", without I/O at the call: flags this process sets
    (signal handlers, a drain notice) and, on rank 0, what a thread last polled from storage
    every `poll_every` seconds. Use as a context manager: the thread runs inside it."""

    def __init__(
        self,
        requested: Callable[[], Stop] = lambda: Stop.NONE,
        polls: Sequence[Callable[[], Stop]] = (),
        poll_every: float = 5.0,
    ):
        self.requested, self.polls, self.poll_every = requested, list(polls), poll_every
        self._polled = Stop.NONE
        self._reasons: list[str] = []
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __call__(self) -> Stop:
        return max(self._polled, self.requested())

    def reason(self) -> str:
        return "; ".join(self._reasons) or "agreed with the other ranks (rank 0 watches the STOP file and the lease)"

    def poll_once(self) -> None:
        for poll in self.polls:
            try:
                found = poll()
            except OSError as err:
                log.warning("checking for a stop request failed (taken as none; next try in %.0f s): %s", self.poll_every, err)
                continue
            except Exception:  # a defect, not the storage: loud, but the other polls go on
                log.exception("checking for a stop request failed")
                continue
            if found > self._polled:
                reason = getattr(poll, "reason", lambda: None)()
                self._reasons += [reason] if reason else []
                self._polled = found

    def _run(self) -> None:
        while not self._closed.is_set() and self._polled < Stop.ABANDON:
            self.poll_once()
            self._closed.wait(self.poll_every)

    def __enter__(self) -> "RankStop":
        if self.polls:
            self._thread = threading.Thread(target=self._run, name="stop-poll", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()


def agree(level: Stop, any_rank: Callable[[Sequence[bool]], Sequence[bool]]) -> Stop:
    """The most severe level any rank saw, on every rank (one collective: `any_rank`)."""
    severities = list(Stop)[1:]
    seen = any_rank([level >= severity for severity in severities])
    return max((severity for severity, flag in zip(severities, seen) if flag), default=Stop.NONE)


def on_signal(flag: "threading.Event") -> Callable[[], Stop]:
    """A runner's `requested`: a stop once its signal handler set `flag`."""
    return lambda: Stop.CHECKPOINT if flag.is_set() else Stop.NONE

"""One writer per run: a lease beside the run directory, held by the driver for the whole job.

A second job on the same run (a double submit, a retry that overlaps the old cluster) fails at
start with a message naming the holder, before it touches anything. The holder refreshes a
heartbeat; a lease whose heartbeat is older than `stale_after` seconds, or whose holder process
on this same host is gone, belongs to a dead job and is taken over.

The lease lies beside the run (`<runs>/<name>.lease`), not in it, so `--fresh`, which moves
the run directory aside, keeps it.

A holder that finds its record gone or someone else's, or cannot rewrite it for nearly the
stale age (after which a taker may come), has lost the lease: it stops beating, never writes
the record again, and the job's rank 0, which watches the record too (pipeline.stopping),
ends training without writing.

- On a filesystem (local, NFS): an exclusive create of `<runs>/<name>.lease` (a hard link of a
  fully written file). A stale lease is renamed
  aside first; the rename is atomic, and the taker checks that what it renamed is the stale
  lease it read (else puts it back), so two takers never both win.
- In object storage (no exclusive create through pyarrow): each contender writes its own
  `<runs>/<name>.lease/<time>-<id>.json`, then lists that prefix, and holds the lease only if no other
  live candidate is there. With read-after-write consistent listing (S3, GCS) at most one
  contender wins: of two, the one that wrote second sees the first. A tie fails both, which
  is safe: neither has started. A candidate's age is the store's clock: the time the store
  stamped on it against the one it stamped on the contender's own, just written (hosts'
  clocks may disagree by minutes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from pipeline.stopping import LeaseToken
from pipeline.storage import Location

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live job holds this run."""


class RunLease:
    """Use as a context manager around everything a job does to its run directory."""

    def __init__(self, runs: Location, run_name: str, heartbeat_every: float = 15.0, stale_after: float = 90.0):
        """`runs`: the directory that holds the run directory `run_name`."""
        self.runs, self.heartbeat_every, self.stale_after = runs, heartbeat_every, stale_after
        self.id = uuid.uuid4().hex[:12]
        self.lease = f"{run_name}.lease"
        self.name = self.lease if runs.is_local else f"{self.lease}/{time.time_ns():020d}-{self.id}.json"
        self.label = str(runs.child(run_name)).partition("?")[0]  # the query only says how to connect
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def token(self) -> LeaseToken:
        """What the job's ranks need to watch this lease."""
        return LeaseToken(str(self.runs), self.name, self.id, self.stale_after, self.heartbeat_every)

    def _record(self) -> dict[str, Any]:
        return {
            "id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
            "submission": os.environ.get("DCGAN_SUBMISSION_ID"), "command": " ".join(sys.argv[:6]),
            "heartbeat": time.time(),
        }  # fmt: skip

    def _is_stale(self, record: dict[str, Any], age: Optional[float] = None) -> bool:
        """`age`: seconds since its holder last wrote it, by the store's clock where known;
        else its heartbeat against this host's clock."""
        if (time.time() - _heartbeat(record) if age is None else age) > self.stale_after:
            return True
        if record.get("host") == socket.gethostname():
            try:
                os.kill(int(record["pid"]), 0)
            except ProcessLookupError:
                return True  # its process is gone: no need to wait for the heartbeat to age
            except (PermissionError, KeyError, TypeError, ValueError, OverflowError):
                pass
        return False

    def _held_error(self, record: dict[str, Any]) -> LeaseHeld:
        age = time.time() - _heartbeat(record)
        job = f", Ray job submission {record['submission']}" if record.get("submission") else ""
        return LeaseHeld(
            f"run {self.label} is in use by another job: pid {record.get('pid')} on host {record.get('host')}"
            f"{job} ({record.get('command')!r}), heartbeat {age:.0f} s ago. Wait for it to finish, stop it, "
            f"or use another run.name; a lease whose heartbeat is older than {self.stale_after:.0f} s is taken over"
        )

    # --- acquire / release ---------------------------------------------------------------

    def acquire(self) -> None:
        if self.runs.is_local:
            self._acquire_exclusive_create()
        else:
            self._acquire_by_listing()
        self._thread = threading.Thread(target=self._heartbeat, name="run-lease", daemon=True)
        self._thread.start()

    def _acquire_exclusive_create(self) -> None:
        path = self.runs.path / self.lease
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a private name, then linked: link() is an exclusive create (on
        # NFS too) that never exposes a half-written lease.
        mine = path.with_name(f"{self.lease}.new-{self.id}")
        mine.write_text(json.dumps(self._record()))
        try:
            for _ in range(3):
                try:
                    os.link(mine, path)
                    return
                except FileExistsError:
                    record = _read(self.runs, self.lease)
                    if record is not None and not self._is_stale(record):
                        raise self._held_error(record) from None
                    self._take_over_file(record)
            raise LeaseHeld(f"run {self.label}: could not take the lease {path} (contended); try again")
        finally:
            mine.unlink(missing_ok=True)

    def _take_over_file(self, stale: Optional[dict[str, Any]]) -> None:
        path = self.runs.path / self.lease
        aside = path.with_name(f"{self.lease}.stale-{self.id}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # someone else moved it: contend again
        moved = _read(self.runs, aside.name)
        if stale is not None and moved is not None and moved.get("id") != stale.get("id"):
            try:  # we moved a fresh lease that another taker wrote meanwhile: put it back
                os.link(aside, path)
            except FileExistsError:
                pass
        else:
            log.warning("took over the stale lease of %s (pid %s on %s)", self.label,
                        (stale or {}).get("pid"), (stale or {}).get("host"))  # fmt: skip
        _remove(aside)

    def _acquire_by_listing(self) -> None:
        self.runs.write_text(self.name, json.dumps(self._record()))
        now = self.runs.modified(self.name)  # the store's clock
        for name in self.runs.list(self.lease):
            other = f"{self.lease}/{name}"
            if other == self.name:
                continue
            record = _read(self.runs, other)
            if record is None:
                continue
            try:
                written = self.runs.modified(other)
            except FileNotFoundError:
                continue  # released meanwhile
            if self._is_stale(record, None if now is None or written is None else now - written):
                log.warning("took over the stale lease of %s (pid %s on %s)", self.label, record.get("pid"), record.get("host"))
                self.runs.delete(other)
                continue
            self.runs.delete(self.name)
            raise self._held_error(record)

    def _heartbeat(self) -> None:
        confirmed = time.monotonic()
        while not self._stop.wait(self.heartbeat_every):
            try:
                reason = self.token.check()
                if reason is None:
                    self.runs.write_text(self.name, json.dumps(self._record()))
                    confirmed = time.monotonic()
                    continue
            except OSError as err:  # storage hiccup: the next beat tries again, up to a point
                log.warning("lease heartbeat on %s failed: %s", self.label, err)
                if time.monotonic() - confirmed < self.token.give_up_after:
                    continue
                reason = f"no heartbeat could be written for {time.monotonic() - confirmed:.0f} s ({err})"
            # Taken over (our beats stalled past stale_after), or about to be: never write it again.
            log.error("lost the lease of %s: %s", self.label, reason)
            self.lost.set()
            return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        record = _read(self.runs, self.name)
        if record is not None and record.get("id") == self.id:
            self.runs.delete(self.name)

    def __enter__(self) -> "RunLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _heartbeat(record: dict[str, Any]) -> float:
    """The record's heartbeat time; 0 (long stale) for junk, which no live holder writes."""
    try:
        beat = float(record.get("heartbeat", 0))
    except (TypeError, ValueError):
        return 0.0
    return beat if math.isfinite(beat) else 0.0


def _remove(path: Path) -> None:
    """A stale lease set aside: a file, or whatever junk stood in its place."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _read(run: Location, name: str) -> Optional[dict[str, Any]]:
    try:
        record = json.loads(run.read_text(name))
    except (FileNotFoundError, ValueError, OSError):
        return None  # gone, or half-written by a create that is still in progress
    return record if isinstance(record, dict) else None

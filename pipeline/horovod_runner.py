"""The horovodrun runner: the processes `horovodrun` started (launch/horovod.sh) train as one job.

Every process runs `dcgan train` with the same arguments. Rank 0 is the driver: it takes the
run's lease, plans the job (pipeline.job: input checked, data prepared, start settled) and
broadcasts it; the others wait for it and so never write to the run directory before rank 0
has decided what it holds. From there each process runs its rank of the job, as a Ray worker
would. A planning error on rank 0 ends every process with its message.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import AbstractContextManager, ExitStack
from typing import Any, Callable, Optional

from pipeline.config import ConfigError
from pipeline.context import RankContext
from pipeline.job import Job
from pipeline.stopping import on_signal


class PlanFailed(RuntimeError):
    """Rank 0 could not plan the job; the other ranks end with its message."""


def rank_context() -> RankContext:
    """This process's place among horovodrun's (the device follows runtime.device and the local rank)."""
    if "HOROVOD_RANK" not in os.environ:  # hvd.init() would quietly make a job of one
        raise ConfigError(
            "runtime.runner='horovodrun' runs in the processes horovodrun starts, and this one was not: "
            "use launch/horovod.sh CONFIG [-np N], or another runtime.runner"
        )
    from pipeline.preflight import require_horovod

    require_horovod()
    import horovod.torch as hvd

    hvd.init()
    return RankContext(hvd.rank(), hvd.local_rank(), hvd.size())


def run(planned: Callable[[], AbstractContextManager[Job]]) -> Optional[tuple[Job, dict[str, Any]]]:
    """`planned()`: rank 0's lease and plan, held while the job runs. Returns (the job, its
    result) on rank 0, None on the others."""
    import horovod.torch as hvd

    ctx = rank_context()
    if not ctx.is_chief:
        outcome, value = hvd.broadcast_object(None, root_rank=0, name="job")
        if outcome == "failed":
            raise PlanFailed(f"rank 0 could not start the job: {value}")
        _run_rank(value, ctx)
        return None
    with ExitStack() as held:
        try:
            job = held.enter_context(planned())
        except BaseException as err:  # the other ranks wait for the plan: tell them why there is none
            hvd.broadcast_object(("failed", str(err)), root_rank=0, name="job")
            raise
        hvd.broadcast_object(("planned", job), root_rank=0, name="job")
        return job, job.result(_run_rank(job, ctx) or {})


def _run_rank(job: Job, ctx: RankContext) -> Optional[dict[str, Any]]:
    """SIGTERM (horovodrun passes it on) asks for a stop: the ranks agree on a step, checkpoint
    there and end with Preempted, as under the other runners."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        return job.run(ctx, stop_requested=on_signal(stop))
    finally:
        signal.signal(signal.SIGTERM, previous)

"""The Ray Train runner: the only package that imports ray (and only when it is used).

- driver: connect, start one fit of the job's ranks through the strategy's Ray Trainer, and
  explain how it ended (`run`, `RunFailed`).
- worker: what each Ray Train worker runs: its rank, its stop requests, its reports.
- probes: the shared-storage check every worker (and doctor, on every node) makes before the
  first step.
- validation: each evaluation step's checkpoint scored apart from the ranks, as Ray's
  checkpoint validation.
- doctor: `dcgan doctor`, what a cluster run needs, checked before it spends cluster time.
"""

from pipeline.ray_runner.driver import RAY_TRAINERS, RunFailed, run

__all__ = ["RAY_TRAINERS", "RunFailed", "run"]

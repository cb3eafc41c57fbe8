"""Who am I in the job: rank, world size, chief, and the seeds that follow from them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class RankContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # Under Ray, the device Ray reserved for this worker: "cuda:1", or "cpu" when it reserved
    # none. None without Ray: runtime.device decides.
    device: Optional[str] = None
    # Under Ray Train V2 each evaluation step's checkpoint is scored apart from the ranks, as
    # Ray's checkpoint validation (pipeline.ray_runner.validation): the chief never evaluates.
    evaluates_apart: bool = False

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.world_size, (self.rank, self.world_size)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def batch_slice(self, global_batch_size: int) -> slice:
        """This rank's rows of a global batch (the data sharder slices the same way)."""
        local = global_batch_size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    @staticmethod
    def step_noise_seed(seed: int, step: int) -> int:
        """Latent noise is drawn for the whole global batch from (seed, step), and each rank
        takes its slice: ranks get different noise, and the noise of a step depends on neither
        the world size nor on whether the run was restarted, so resumes stay exact and N
        ranks x B/N compute what 1 rank x B does."""
        return int(np.random.SeedSequence([seed, 1, step]).generate_state(1)[0])

    def process_seed(self, seed: int) -> int:
        """For the framework's global RNG, which torch otherwise seeds at random per process."""
        return int(np.random.SeedSequence([seed, 3, self.rank]).generate_state(1)[0])

    @staticmethod
    def init_seed(seed: int) -> int:
        """Weights start identical on every rank (data-parallel replicas must agree)."""
        return int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])

    @staticmethod
    def fixed_noise_seed(seed: int) -> int:
        """The sample grid's noise is the same on every rank and across resumes."""
        return int(np.random.SeedSequence([seed, 2]).generate_state(1)[0])


LOCAL = RankContext()


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    os.cpu_count() reports the host's cores, which inside a container (a Kubernetes pod with a
    CPU limit) can be many times what the process is allowed to run on."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota(cgroup_root)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _cgroup_cpu_quota(root: Path) -> float | None:
    try:  # cgroup v2: "max 100000" (no limit) or "150000 100000"
        limit, period = (root / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 means no limit
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None

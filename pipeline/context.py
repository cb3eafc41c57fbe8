"""Who am I in the job: rank, world size, chief, and the seeds that follow from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

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

"""Which images each rank reads at each step: framework-free, resumable index sharding.

Every epoch has one global permutation drawn from (seed, epoch), identical on every rank.
Step s of the epoch uses the global batch perm[s*B:(s+1)*B]; rank r takes its r-th slice of
it. So ranks are disjoint, together they cover the epoch, all of them run the same number of
steps (the remainder of fewer than B images is dropped, a different one each epoch), and the
global batch at a given step does not depend on the world size, which is what lets a run
resume on a different number of ranks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    step_in_epoch: int = 0  # global batches of this epoch already consumed

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "DataPosition":
        return cls(epoch=int(raw["epoch"]), step_in_epoch=int(raw["step_in_epoch"]))


class EpochSharder:
    """A never-ending iterator of this rank's index batches, starting at a `DataPosition`."""

    def __init__(
        self,
        num_images: int,
        global_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: DataPosition = DataPosition(),
    ):
        if world_size < 1 or not 0 <= rank < world_size:  # a rank outside it would read another rank's slice
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world size {world_size})")
        if global_batch_size % world_size:
            raise ValueError(
                f"train.global_batch_size={global_batch_size} is not divisible by the world size {world_size}"
            )
        if num_images < global_batch_size:
            raise ValueError(
                f"the dataset has {num_images} images, fewer than one global batch (train.global_batch_size={global_batch_size})"
            )
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.steps_per_epoch = num_images // global_batch_size
        self.num_images = num_images
        self.seed = seed
        self.rank = rank
        self.position = start
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def position_after(self, start: DataPosition, batches: int) -> DataPosition:
        """Where reading resumes once `batches` global batches past `start` are consumed.

        Computed, not read from the iterator: a prefetching input pipeline runs ahead of the
        step that is being checkpointed."""
        total = start.epoch * self.steps_per_epoch + min(start.step_in_epoch, self.steps_per_epoch) + batches
        return DataPosition(*divmod(total, self.steps_per_epoch))

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_images)

    def indices_at(self, position: DataPosition) -> np.ndarray:
        if position.epoch != self._order_epoch:
            self._order, self._order_epoch = self.epoch_order(position.epoch), position.epoch
        start = position.step_in_epoch * self.global_batch_size + self.rank * self.local_batch_size
        return self._order[start : start + self.local_batch_size]

    def __iter__(self) -> "EpochSharder":
        return self

    def __next__(self) -> np.ndarray:
        """This rank's indices at the current position; then advance by one global batch."""
        position = self.position
        if position.step_in_epoch >= self.steps_per_epoch:  # e.g. resumed from a larger dataset
            position = DataPosition(position.epoch + 1, 0)
        batch = self.indices_at(position)
        self.position = DataPosition(position.epoch, position.step_in_epoch + 1)
        if self.position.step_in_epoch == self.steps_per_epoch:
            self.position = DataPosition(position.epoch + 1, 0)
        return batch

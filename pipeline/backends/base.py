"""The Backend protocol: the few things the framework-free loop asks of a framework."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ContextManager, Iterator, Mapping, Optional, Protocol, Sequence

import numpy as np

from pipeline.data.sharding import EpochSharder
from pipeline.data.shards import ShardedImages


def num_resolution_doublings(image_size: int) -> int:
    """Stride-2 layers between 4x4 and image_size in either DCGAN network (both backends)."""
    steps = math.log2(image_size / 4)
    assert steps.is_integer() and steps >= 2, f"image_size must be a power of two >= 16, got {image_size}"
    return int(steps)


STANDING_SEED = 2**31 - 2  # the latents of standing statistics: not those evaluation scores with


def latent_noise(num: int, nz: int, seed: int) -> np.ndarray:
    """`num` latent vectors from `seed`, the same in both frameworks (float32, shape (num, nz))."""
    return np.random.default_rng(seed).standard_normal((num, nz)).astype(np.float32)


def warmed_up_decay(decay: float, step: int) -> float:
    """The EMA decay of G's average at `step` (from 1): min(decay, (1 + step) / (10 + step)), as
    TensorFlow's ExponentialMovingAverage warms up, so that early on the average follows G
    instead of holding on to its random initialization."""
    return min(decay, (1.0 + step) / (10.0 + step))


# The framework-neutral weights (`dcgan convert`): numpy arrays under PyTorch's state-dict names,
# prefixed generator., discriminator. and, where G's average is kept, generator_ema.
NEUTRAL_AVERAGE = "generator_ema"


def holds_average(arrays: Mapping[str, Any]) -> bool:
    return any(name.startswith(NEUTRAL_AVERAGE + ".") for name in arrays)


class NonFiniteError(RuntimeError):
    """A loss, gradient or state tensor became NaN or infinite; the run stops."""


class ReplicaMismatchError(RuntimeError):
    """Data-parallel replicas that should be identical are not."""


class Backend(Protocol):
    framework: str  # recorded in every checkpoint manifest
    save_is_collective: bool  # every rank must call save() (non-chief ranks into a throw-away dir)

    def batches(self, images: ShardedImages, sharder: EpochSharder) -> Iterator[Any]:
        """Never-ending batches of this rank's images, in the form train_step takes."""

    def train_step(self, batch: Any, step: int) -> Mapping[str, Any]:
        """One D update then one G update on this rank's batch of uint8 images; `step` counts from 1.

        Returns scalars that stay on the device (no host sync): the tags of
        pipeline.tensorboard.SCALAR_TAGS that come from the step, plus "nonfinite", which is
        1 when an update was skipped because its loss or gradient was not finite.
        """

    def to_host(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Accumulated device scalars as Python floats, averaged over ranks (the loop's only sync).

        Collective: every rank calls it at the same steps."""

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        """For each flag, true on every rank when it is true on any rank. Collective."""

    def synchronize_replicas(self) -> None:
        """Before a checkpoint: make per-rank state (e.g. BatchNorm statistics) agree, then
        check every replica identical, raising with the first differing tensor. Collective."""

    def sample(self, num: Optional[int] = None, seed: Optional[int] = None) -> np.ndarray:
        """uint8 NHWC images from G in inference mode: the fixed noise, or `num` from
        latent_noise(num, nz, seed)."""

    def generate(self, z: np.ndarray) -> np.ndarray:
        """uint8 NHWC images from float32 latents of shape (N, nz), in batches; no collective."""

    def standing_statistics(self) -> ContextManager[None]:
        """Inside the block, G's average holds BatchNorm statistics re-estimated from fresh
        latents (STANDING_SEED) when model.g_ema_standing_statistics asks; generate() and
        export use it. No collective."""

    def save(self, directory: Path) -> None:
        """Write the full training state; refuse (NonFiniteError) if any tensor is not finite."""

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote. Tensors load with safe, non-pickling readers only."""

    def export_weights(self) -> dict[str, np.ndarray]:
        """G, D (BatchNorm statistics included) and the fixed noise in the framework-neutral
        layout: numpy arrays under PyTorch's names and in its tensor order."""

    def import_weights(self, arrays: Mapping[str, np.ndarray]) -> None:
        """The inverse of export_weights; optimizer state is left as it is."""

    def fingerprint(self) -> dict[str, str]:
        """A digest of every state tensor, to prove two states identical."""

    def describe(self) -> dict[str, Any]:
        """Device, parameter counts and peak accelerator memory, for reports."""

    def close(self) -> None:
        ...

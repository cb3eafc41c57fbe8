"""uint8 NHWC batches from the shards -> float NCHW in [-1, 1] on the training device.

Only bytes reach the device; the float conversion runs there. Two ways to get them there
(data.device_cache):
- resident: the whole uint8 dataset lives in device memory, and a batch is an index_select
  there: no per-step host work beyond 8 bytes an index.
- prefetched: a thread gathers the next batch from the memory-mapped shards (into pinned memory
  on a GPU, so the copy is asynchronous) while the current step runs.
Both yield the batches of the same sharder in the same order, so the choice never changes a run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from pipeline.data.sharding import EpochSharder
from pipeline.data.shards import ShardedImages

# auto keeps the dataset on a GPU when it takes at most this share of the free device memory:
# the rest is for activations, and for other workers sharing the GPU.
DEVICE_CACHE_SHARE = 0.25


def keeps_on_device(setting, images: ShardedImages, device: torch.device) -> bool:
    """data.device_cache resolved: True / False as given; auto = a GPU with room to spare."""
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return False  # the memory map already is host memory: a prefetched gather costs nothing extra
    free, _total = torch.cuda.mem_get_info(device)
    return dataset_bytes(images) <= DEVICE_CACHE_SHARE * free


def dataset_bytes(images: ShardedImages) -> int:
    return len(images) * int(np.prod(images.shape))


def resident_batches(images: ShardedImages, sharder: EpochSharder, device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 NHWC batches gathered on the device from a copy of the whole dataset there."""
    resident = torch.empty((len(images), *images.shape), dtype=torch.uint8, device=device)
    for array, start in zip(images.arrays, images.starts):  # one shard in host memory at a time
        resident[start : start + len(array)].copy_(torch.from_numpy(np.array(array)))
    for indices in sharder:
        yield resident.index_select(0, torch.from_numpy(indices).to(device, non_blocking=True))


def prefetched_batches(images: ShardedImages, sharder: EpochSharder, device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 NHWC batches on the device, the next one gathered by a thread while this one trains."""
    pin = device.type == "cuda"

    def gather(indices: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(images.gather(indices))
        return pixels.pin_memory() if pin else pixels

    indices = iter(sharder)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcgan-batches")
    try:
        pending = pool.submit(gather, next(indices))
        while True:
            ready = pending.result()
            pending = pool.submit(gather, next(indices))
            yield ready.to(device, non_blocking=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def to_float(pixels: torch.Tensor, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC on the device -> float NCHW in [-1, 1]; the permuted view of NHWC bytes is
    channels-last already, so that layout costs no copy."""
    images = pixels.permute(0, 3, 1, 2).to(dtype).div_(127.5).sub_(1.0)
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def to_device(batch: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A host uint8 NHWC batch -> float NCHW on `device`, in one call (bench/feed.py)."""
    pixels = torch.from_numpy(np.ascontiguousarray(batch))
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    return to_float(pixels.to(device, non_blocking=True), dtype)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC on the host."""
    pixels = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()

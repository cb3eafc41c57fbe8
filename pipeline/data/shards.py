"""Prepared data on disk: uint8 NHWC `.npy` shards plus `manifest.json`, read through memory maps."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.durable import check_relative_name, sha256_file

MANIFEST = "manifest.json"
FORMAT = "dcgan-shards/1"


class ShardWriter:
    """Collects images into fixed-size shards, each written once and fsynced."""

    def __init__(self, directory: Path, image_shape: tuple[int, int, int], shard_size: int):
        self.directory = directory
        self.image_shape = image_shape
        self.buffer = np.empty((shard_size, *image_shape), dtype=np.uint8)
        self.filled = 0
        self.shards: list[dict[str, Any]] = []

    @property
    def count(self) -> int:
        return sum(shard["count"] for shard in self.shards) + self.filled

    def add(self, image: np.ndarray) -> None:
        assert image.shape == self.image_shape, (image.shape, self.image_shape)
        self.buffer[self.filled] = image
        self.filled += 1
        if self.filled == len(self.buffer):
            self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            return
        path = self.directory / f"shard-{len(self.shards):05d}.npy"
        with open(path, "wb") as handle:
            np.save(handle, self.buffer[: self.filled])
            handle.flush()
            os.fsync(handle.fileno())
        self.shards.append({"file": path.name, "count": self.filled, "sha256": sha256_file(path)})
        self.filled = 0


class ShardedImages:
    """All shards of a prepared directory as one indexable uint8 (N, H, W, C) collection.

    The shards are memory-mapped, so a batch costs a gather of the bytes it touches and no
    decode; conversion to float happens later, on the training device.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.shape = tuple(self.manifest["shape"])
        self.arrays = []
        for shard in self.manifest["shards"]:
            path = self.directory / shard["file"]
            array = np.load(path, mmap_mode="r")
            if array.shape != (shard["count"], *self.shape) or array.dtype != np.uint8:
                raise ValueError(f"shard {path} holds {array.dtype}{array.shape}, manifest says {shard['count']} x {self.shape}")
            self.arrays.append(array)
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Images at global `indices`, in that order."""
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for shard in np.unique(shard_of):
            rows = np.nonzero(shard_of == shard)[0]
            out[rows] = self.arrays[shard][indices[rows] - self.starts[shard]]
        return out


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    return parse_manifest(path.read_text(), str(path))


def parse_manifest(text: str, where: str) -> dict[str, Any]:
    """A shard manifest, checked: its format, and shard names that stay inside the directory."""
    manifest = json.loads(text)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{where}: unknown format {found!r}, expected {FORMAT!r}")
    for shard in manifest.get("shards", []):
        check_relative_name(str(shard.get("file", "")), where)
    return manifest

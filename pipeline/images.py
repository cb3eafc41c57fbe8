"""Image grids and PNG files from uint8 NHWC batches (framework-free)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, padding: int = 2, columns: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows*H', cols*W', C) image, near-square by default."""
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), dtype=np.uint8
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def save_png(image_hwc: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = image_hwc[:, :, 0] if image_hwc.shape[2] == 1 else image_hwc
    Image.fromarray(pixels).save(path)

"""uint8 NHWC batches from the shards -> float NCHW in [-1, 1] on the training device.

Only bytes cross to the device; the float conversion runs there.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(batch: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    pixels = torch.from_numpy(np.ascontiguousarray(batch))
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    pixels = pixels.to(device, non_blocking=True)
    return pixels.permute(0, 3, 1, 2).to(dtype).div_(127.5).sub_(1.0).contiguous()


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC on the host."""
    pixels = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()

"""Standing BatchNorm statistics for G's average (model.g_ema_standing_statistics), as the torch
backend computes them (pipeline/backends/torch_backend/standing.py says why and how): each
BatchNorm layer in turn, in forward order, gets the mean and unbiased variance of its inputs
over all the latents, computed in inference mode with the layers before it re-estimated."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import keras
import numpy as np


@contextmanager
def standing_statistics(net: keras.Model, latents: np.ndarray, batch_size: int = 256) -> Iterator[None]:
    """`net` with re-estimated BatchNorm statistics inside the block; restored after."""
    layers = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]
    try:
        for layer in layers:
            inputs = keras.Model(net.input, layer.input)  # the network up to this layer
            total, total_sq, count = 0.0, 0.0, 0
            for start in range(0, len(latents), batch_size):
                x = np.asarray(inputs(latents[start : start + batch_size], training=False), dtype=np.float64)
                x = x.reshape(-1, x.shape[-1])  # channels last
                total, total_sq, count = total + x.sum(axis=0), total_sq + (x * x).sum(axis=0), count + len(x)
            mean = total / count
            variance = np.maximum((total_sq / count - mean * mean) * count / max(count - 1, 1), 0.0)
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(variance.astype(np.float32))
        yield
    finally:
        for layer, (mean, variance) in zip(layers, saved):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)

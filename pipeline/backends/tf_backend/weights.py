"""Keras DCGAN weights <-> the framework-neutral layout: numpy arrays under PyTorch's names.

The neutral layout is what pipeline/backends/torch_backend state dicts hold
("generator.main.0.weight", ... in PyTorch's NCHW kernel order), so a checkpoint of either
framework converts to the other through plain arrays, without both frameworks in a process.
"""

from __future__ import annotations

import keras
import numpy as np

# (kh, kw, in, out) / (kh, kw, out, in) <-> (out, in, kh, kw) / (in, out, kh, kw)
_TO_TORCH, _TO_KERAS = (3, 2, 0, 1), (2, 3, 1, 0)
_BN = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"), ("running_var", "moving_variance"))


def _torch_index(model: keras.Model, layer_name: str) -> int:
    """Position of the layer in the PyTorch `main` Sequential (see the models' layer order)."""
    kind, index = layer_name.rsplit("_", 1)
    index = int(index)
    if model.name == "generator":  # ConvT, BN, ReLU per block
        return 3 * index + (1 if kind == "bn" else 0)
    if index == 0:  # D: Conv, LeakyReLU, then Conv, BN, LeakyReLU per block
        return 0
    return 3 * index - (1 if kind == "conv" else 0)


def _weighted_layers(model: keras.Model):
    return [layer for layer in model.layers if layer.weights]


def to_neutral(model: keras.Model, name: str = "") -> dict[str, np.ndarray]:
    """Under `name` (default the model's own: generator, discriminator); G's average is a
    generator saved as generator_ema."""
    arrays = {}
    for layer in _weighted_layers(model):
        prefix = f"{name or model.name}.main.{_torch_index(model, layer.name)}"
        if isinstance(layer, keras.layers.BatchNormalization):
            for torch_name, keras_name in _BN:
                arrays[f"{prefix}.{torch_name}"] = np.asarray(getattr(layer, keras_name).numpy())
        else:
            arrays[f"{prefix}.weight"] = np.ascontiguousarray(layer.kernel.numpy().transpose(_TO_TORCH))
    return arrays


def from_neutral(model: keras.Model, arrays: dict[str, np.ndarray], name: str = "") -> None:
    for layer in _weighted_layers(model):
        prefix = f"{name or model.name}.main.{_torch_index(model, layer.name)}"
        if isinstance(layer, keras.layers.BatchNormalization):
            for torch_name, keras_name in _BN:
                getattr(layer, keras_name).assign(arrays[f"{prefix}.{torch_name}"])
        else:
            kernel = arrays[f"{prefix}.weight"].transpose(_TO_KERAS)
            if tuple(kernel.shape) != tuple(layer.kernel.shape):
                raise ValueError(f"{prefix}.weight: shape {kernel.shape} does not fit {layer.name} {layer.kernel.shape}")
            layer.kernel.assign(kernel)

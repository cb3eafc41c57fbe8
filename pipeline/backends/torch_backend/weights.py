"""PyTorch DCGAN weights <-> the framework-neutral layout (numpy arrays under PyTorch's names).

See pipeline/backends/tf_backend/weights.py for the other side; `num_batches_tracked` has no
counterpart in Keras and is left as it is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def to_neutral(nets: dict[str, nn.Module]) -> dict[str, np.ndarray]:
    """`nets` by neutral prefix: generator, discriminator, generator_ema (G's average)."""
    arrays = {}
    for prefix, net in nets.items():
        for name, tensor in net.state_dict().items():
            if not name.endswith("num_batches_tracked"):
                arrays[f"{prefix}.{name}"] = tensor.detach().cpu().numpy()
    return arrays


def from_neutral(nets: dict[str, nn.Module], arrays: dict[str, np.ndarray]) -> None:
    for prefix, net in nets.items():
        state = net.state_dict()
        for name, tensor in state.items():
            if name.endswith("num_batches_tracked"):
                continue
            value = torch.from_numpy(np.asarray(arrays[f"{prefix}.{name}"]))
            if value.shape != tensor.shape:
                raise ValueError(f"{prefix}.{name}: shape {tuple(value.shape)} does not fit {tuple(tensor.shape)}")
            state[name] = value.to(tensor.dtype)
        net.load_state_dict(state)

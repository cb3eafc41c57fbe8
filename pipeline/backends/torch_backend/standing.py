"""Standing BatchNorm statistics for G's average (model.g_ema_standing_statistics).

The average's BatchNorm statistics are an average of G's statistics over the steps, which
belong to no single set of weights; StudioGAN re-estimates them from fresh latents before it
samples ("standing statistics"). Here each BatchNorm layer in turn, in forward order, gets the
mean and variance of its inputs over all the latents, computed in eval mode with the layers
before it already re-estimated: the statistics eval mode then uses are exactly those of this
network on these latents, and no layer runs in training mode (a synchronized BatchNorm would
start a collective the other ranks never join).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

@contextmanager
@torch.no_grad()
def standing_statistics(net: nn.Module, latents: torch.Tensor, batch_size: int = 256) -> Iterator[None]:
    """`net` (eval mode) with re-estimated BatchNorm statistics inside the block; restored after."""
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
    try:
        for layer in layers:
            total, total_sq, count = 0.0, 0.0, 0

            def capture(module, inputs):
                nonlocal total, total_sq, count
                x = inputs[0].double()
                dims = [d for d in range(x.dim()) if d != 1]
                total = total + x.sum(dim=dims)
                total_sq = total_sq + (x * x).sum(dim=dims)
                count += x.numel() // x.shape[1]

            handle = layer.register_forward_pre_hook(capture)
            try:
                for batch in latents.split(batch_size):
                    net(batch)
            finally:
                handle.remove()
            mean = total / count
            variance = (total_sq / count - mean * mean) * count / max(count - 1, 1)  # unbiased, as BatchNorm keeps it
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(variance.clamp_min(0))
        yield
    finally:
        for layer, (mean, var) in zip(layers, saved):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)

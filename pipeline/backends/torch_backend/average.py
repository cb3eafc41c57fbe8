"""G's exponential moving average (model.g_ema_decay), BatchNorm statistics included.

The decay warms up with the step (base.warmed_up_decay): a fixed 0.999 would still hold 60% of
G's random initialization after 500 steps. The step is the loop's, so a resumed run averages
exactly as an uninterrupted one, and no device value is read on the host (torch's
AveragedModel reads its counter at every update).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.backends.base import warmed_up_decay


class GeneratorAverage:
    def __init__(self, net: nn.Module, decay: float):
        self.module = copy.deepcopy(net).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        weight = 1.0 - warmed_up_decay(self.decay, step)
        averaged = [t for t in (*self.module.parameters(), *self.module.buffers()) if t.is_floating_point()]
        current = [t for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]
        torch._foreach_lerp_(averaged, current, weight)  # in place, one fused kernel per dtype/device
        for mine, theirs in zip(self.module.buffers(), net.buffers()):
            if not mine.is_floating_point():
                mine.copy_(theirs)  # BatchNorm's batch counter

"""The data-parallel seam of the torch backend: one strategy object per rank.

The backend trains through a `DataParallel` and never asks which one it is: DDP over a
torch.distributed process group (parallel_ddp) or Horovod (parallel_horovod). A strategy
supplies the framework-specific parts (how a network is wrapped, how an optimizer reduces
gradients, three collectives); the checks built on those collectives (the mean of the logged
metrics, "did any rank ask to stop", BatchNorm statistics agreeing, replicas proven identical
before a checkpoint) are written once here. With one rank every collective is a no-op.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Optional, Sequence

import torch
from torch import nn

# Differentiable sum over ranks: what GlobalBatchNorm2d needs from a strategy.
WorldSum = Callable[[torch.Tensor], torch.Tensor]


class DataParallel:
    """How the ranks of one job cooperate. Subclasses implement the methods that raise."""

    name = "single"
    channels_last_weights = True  # False where the collectives need contiguous tensors

    def __init__(self, world_size: int, device: torch.device):
        self.world_size, self.device = world_size, device

    # --- what a strategy supplies -------------------------------------------------------

    def _wrap(self, module: nn.Module) -> nn.Module:
        """The module that trains across ranks (already on the device, BatchNorm converted)."""
        return module

    def world_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks that autograd differentiates (the gradient is the sum of gradients)."""
        raise NotImplementedError

    def _all_reduce_(self, tensor: torch.Tensor, op: str) -> None:
        """In place, op "sum" or "max"."""
        raise NotImplementedError

    def _broadcast_(self, tensor: torch.Tensor) -> None:
        """In place, from rank 0."""
        raise NotImplementedError

    def distributed_optimizer(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> torch.optim.Optimizer:
        """The optimizer to step: one that reduces `module`'s gradients, where the wrapper does not."""
        return optimizer

    def gradients_reduced(self, optimizer: torch.optim.Optimizer) -> ContextManager:
        """Around what reads gradients after backward (the non-finite check, the step): entered,
        the gradients are the mean over ranks."""
        return nullcontext()

    def no_sync(self, module: nn.Module) -> ContextManager:
        """A phase in which `module` takes part in backward but does not train: no gradient reduction."""
        return nullcontext()

    def broadcast_state(self, modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Make every rank start from rank 0's parameters, buffers and optimizer state (at the
        start and after a resume), where the wrapper does not already."""

    def close(self) -> None:
        """Before the ranks go away."""
        gc.collect()

    # --- written once on top of them ----------------------------------------------------

    def wrap(self, module: nn.Module, sync_batchnorm: bool, compile: bool = False) -> nn.Module:
        """The module to train; torch.compile'd (forward and backward) when asked."""
        if self.world_size > 1:
            if sync_batchnorm:
                use_global_batchnorm(module, self.world_sum, self.world_size)
            module = self._wrap(module)
        return torch.compile(module) if compile else module

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        values = values.clone()
        self._all_reduce_(values, "sum")
        return values / self.world_size

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag true everywhere when true on some rank (one MAX all-reduce)."""
        if self.world_size == 1:
            return [bool(flag) for flag in flags]
        values = torch.tensor([1 if flag else 0 for flag in flags], device=self.device)
        self._all_reduce_(values, "max")
        return [bool(value) for value in values.tolist()]

    def synchronize_buffers(self, modules: Iterable[nn.Module]) -> None:
        """Average the floating-point buffers (BatchNorm running mean / var) across ranks."""
        if self.world_size == 1:
            return
        for module in modules:
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    self._all_reduce_(buffer, "sum")
                    buffer.div_(self.world_size)

    def first_mismatch(self, named: list[tuple[str, torch.Tensor]]) -> Optional[str]:
        """Broadcast every tensor from rank 0 and compare; the first name that differs on any rank."""
        if self.world_size == 1:
            return None
        differs = []
        for _, tensor in named:
            reference = tensor.detach().clone()
            self._broadcast_(reference)
            differs.append(not torch.equal(reference, tensor))
        flags = torch.tensor(differs, dtype=torch.int32, device=named[0][1].device if named else "cpu")
        self._all_reduce_(flags, "max")  # every rank learns which tensors differ anywhere
        for (name, _), flag in zip(named, flags.tolist()):
            if flag:
                return name
        return None


def create(strategy: str, rank: int, world_size: int, device: torch.device) -> DataParallel:
    """distributed.strategy's implementation; frameworks are imported only when chosen. One rank
    needs none (a dry run, or a checkpoint loaded by sample / export / evaluate)."""
    if world_size == 1:
        return DataParallel(world_size, device)
    if strategy == "horovod":
        from pipeline.backends.torch_backend.parallel_horovod import HorovodStrategy

        return HorovodStrategy(rank, world_size, device)
    from pipeline.backends.torch_backend.parallel_ddp import DDPStrategy

    return DDPStrategy(world_size, device)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch, on any device and strategy.

    torch's SyncBatchNorm refuses CPU tensors (its kernels are GPU-only), and our tests and dry
    runs are on CPU. The mean and variance are summed across ranks with the strategy's
    differentiable sum (two passes, for accuracy); every rank holds an equal slice, so the
    global count is the local one times the world size. Parameter and buffer names are
    BatchNorm2d's, so checkpoints load either way.
    """

    def __init__(self, *args, world_sum: WorldSum, world_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.world_sum, self.world_size = world_sum, world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        # Statistics at least in float32, as BatchNorm keeps them: under bf16 / fp16 autocast x is
        # half precision, and so would be the running statistics' update (a dtype error).
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        count = x.numel() // x.shape[1] * self.world_size
        mean = self.world_sum(x.sum(dim=(0, 2, 3), dtype=stats_dtype)) / count
        centered = x.to(stats_dtype) - mean[None, :, None, None]
        var = self.world_sum(centered.square().sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * count / (count - 1), self.momentum)  # unbiased, as BatchNorm
        out = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        return (out * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)


def use_global_batchnorm(module: nn.Module, world_sum: WorldSum, world_size: int) -> None:
    """Replace every BatchNorm2d below `module` with GlobalBatchNorm2d, keeping its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum,
                world_sum=world_sum, world_size=world_size, device=child.weight.device, dtype=child.weight.dtype,
            )  # fmt: skip
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            use_global_batchnorm(child, world_sum, world_size)

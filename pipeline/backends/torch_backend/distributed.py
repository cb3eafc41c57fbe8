"""Everything that touches torch.distributed: wrapping, cross-rank averages, replica checks.

The process group itself belongs to whoever started the ranks (Ray Train's TorchTrainer, or a
test harness); this module only uses it. With one rank every function is a no-op.
"""

from __future__ import annotations

import gc
import inspect
from contextlib import nullcontext
from typing import ContextManager, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

# torch 2.14 renamed broadcast_buffers to forward_sync_buffers; both mean "no buffer sync in forward".
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch, on any device.

    torch's SyncBatchNorm refuses CPU tensors (its kernels are GPU-only), and our tests and dry
    runs are on CPU. The mean and variance are summed across ranks with an all-reduce that
    autograd differentiates (two passes, for accuracy); every rank holds an equal
    slice, so the global count is the local one times the world size. Parameter and buffer
    names are BatchNorm2d's, so checkpoints load either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        world_size = dist.get_world_size()
        count = x.numel() // x.shape[1] * world_size
        mean = _AllReduceSum.apply(x.sum(dim=(0, 2, 3))) / count
        centered = x - mean[None, :, None, None]
        var = _AllReduceSum.apply(centered.square().sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * count / (count - 1), self.momentum)  # unbiased, as BatchNorm
        out = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        return out * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def use_global_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d below `module` with GlobalBatchNorm2d, keeping its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, device=child.weight.device, dtype=child.weight.dtype
            )
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            use_global_batchnorm(child)


def wrap(module: nn.Module, device: torch.device, world_size: int, sync_batchnorm: bool, compile: bool = False) -> nn.Module:
    """The module to train: DDP across ranks, the module itself with one rank; torch.compile'd
    (its forward and backward; DDP's graph breaks at bucket boundaries keep the overlap) when asked.

    No buffer sync in forward: D runs forward twice per step (real, then fake), and DDP's
    buffer broadcast is an in-place write that breaks autograd there (pytorch/pytorch#110363).
    Each rank keeps its own BatchNorm running statistics instead, and they are averaged across
    ranks before every checkpoint (synchronize_buffers).
    """
    if world_size > 1:
        if sync_batchnorm:
            use_global_batchnorm(module)
        device_ids = [device.index] if device.type == "cuda" else None
        module = DDP(module, device_ids=device_ids, **_NO_FORWARD_BUFFER_SYNC)
    return torch.compile(module) if compile else module


def no_sync(module: nn.Module) -> ContextManager:
    """Skip the gradient all-reduce of a network that is not being trained in this phase."""
    module = getattr(module, "_orig_mod", module)  # under torch.compile, the module it compiled
    return module.no_sync() if isinstance(module, DDP) else nullcontext()


def mean_over_ranks(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world_size


def any_rank(flag: bool, device: torch.device, world_size: int) -> bool:
    """True everywhere when true on some rank (one MAX all-reduce of a single value)."""
    if world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def synchronize_buffers(modules: Iterable[nn.Module], world_size: int) -> None:
    """Average the floating-point buffers (BatchNorm running mean / var) across ranks."""
    if world_size == 1:
        return
    for module in modules:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(world_size)


def first_mismatch(named: list[tuple[str, torch.Tensor]], world_size: int) -> Optional[str]:
    """Broadcast every tensor from rank 0 and compare; the first name that differs on any rank."""
    if world_size == 1:
        return None
    differs = []
    for _, tensor in named:
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        differs.append(not torch.equal(reference, tensor))
    flags = torch.tensor(differs, dtype=torch.int32, device=named[0][1].device if named else "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank learns which tensors differ anywhere
    for (name, _), flag in zip(named, flags.tolist()):
        if flag:
            return name
    return None


def release(world_size: int) -> None:
    """Before the process group goes away: free DDP reducers, then meet at a barrier.

    Dropping the DDP modules and collecting them before the last barrier avoids the gloo
    SIGABRT at interpreter exit seen on our machines (docs/ARCHITECTURE.md, traps).
    """
    gc.collect()
    if world_size > 1 and dist.is_initialized():
        dist.barrier()

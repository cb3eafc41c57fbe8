"""DistributedDataParallel over the torch.distributed process group.

The process group belongs to whoever started the ranks (Ray Train's TorchTrainer, or a test
harness); this strategy only uses it.
"""

from __future__ import annotations

import inspect
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.backends.torch_backend.parallel import DataParallel

# torch 2.14 renamed broadcast_buffers to forward_sync_buffers; both mean "no buffer sync in forward".
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


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


class DDPStrategy(DataParallel):
    """DDP reduces gradients in backward (overlapped with it, bucket by bucket) and broadcasts
    rank 0's parameters when it wraps a module: the optimizers stay plain."""

    name = "ddp"

    def _wrap(self, module: nn.Module) -> nn.Module:
        """No buffer sync in forward: D runs forward twice per step (real, then fake), and DDP's
        buffer broadcast is an in-place write that breaks autograd there (pytorch/pytorch#110363).
        Each rank keeps its own BatchNorm running statistics instead, and they are averaged
        across ranks before every checkpoint (synchronize_buffers)."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=device_ids, **_NO_FORWARD_BUFFER_SYNC)

    def world_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(tensor)

    def _all_reduce_(self, tensor: torch.Tensor, op: str) -> None:
        dist.all_reduce(tensor, op=_OPS[op])

    def _broadcast_(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=0)

    def no_sync(self, module: nn.Module) -> ContextManager:
        module = getattr(module, "_orig_mod", module)  # under torch.compile, the module it compiled
        return module.no_sync()

    def close(self) -> None:
        """Free the DDP reducers (the caller dropped its modules), then meet at a barrier: this
        avoids the gloo SIGABRT at interpreter exit seen on our machines (docs/ARCHITECTURE.md, traps)."""
        super().close()
        if dist.is_initialized():
            dist.barrier()

"""Everything that touches torch.distributed: wrapping, cross-rank averages, replica checks.

The process group itself belongs to whoever started the ranks (Ray Train's TorchTrainer, or a
test harness); this module only uses it. With one rank every function is a no-op.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from typing import ContextManager, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


class ReplicaMismatchError(RuntimeError):
    """Data-parallel replicas that should be identical are not."""


def wrap(module: nn.Module, device: torch.device, world_size: int, sync_batchnorm: bool) -> nn.Module:
    """The module to train: DDP across ranks, the module itself with one rank.

    broadcast_buffers=False: D runs forward twice per step (real, then fake), and DDP's buffer
    broadcast is an in-place write that breaks autograd there (pytorch/pytorch#110363). Each
    rank keeps its own BatchNorm running statistics instead, and they are averaged across ranks
    before every checkpoint (synchronize_buffers).
    """
    if world_size == 1:
        return module
    if sync_batchnorm:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # in place below the top module
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=device_ids, broadcast_buffers=False)


def no_sync(module: nn.Module) -> ContextManager:
    """Skip the gradient all-reduce of a network that is not being trained in this phase."""
    return module.no_sync() if isinstance(module, DDP) else nullcontext()


def mean_over_ranks(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world_size


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
    SIGABRT at interpreter exit seen on our machines (DESIGN.md, traps).
    """
    gc.collect()
    if world_size > 1 and dist.is_initialized():
        dist.barrier()

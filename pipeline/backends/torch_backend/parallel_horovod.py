"""Horovod: ring all-reduce driven by the optimizers, over Gloo (CPU tensors) or NCCL (GPU ones).

Horovod's processes come from `horovodrun` (launch/horovod.sh) or Ray Train's HorovodTrainer;
hvd.init() joins them (it is idempotent). The wheel is built by `make horovod`: PyTorch only
(README, support table).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from pipeline.backends.torch_backend.parallel import DataParallel


class HorovodStrategy(DataParallel):
    """The networks stay plain modules; each optimizer is an hvd.DistributedOptimizer, whose
    per-parameter hooks start an asynchronous all-reduce as each gradient is ready (overlapped
    with the rest of backward, as DDP's buckets are) and whose synchronize() waits for them."""

    name = "horovod"
    # Horovod reduces and broadcasts contiguous tensors only, and a gradient takes its
    # parameter's layout: the weights stay contiguous (train.channels_last still lays out the
    # activations).
    channels_last_weights = False

    def __init__(self, rank: int, world_size: int, device: torch.device):
        import horovod.torch as hvd

        hvd.init()
        if (hvd.rank(), hvd.size()) != (rank, world_size):  # the data shard and the noise slice follow `rank`
            raise RuntimeError(
                f"Horovod made this process rank {hvd.rank()} of {hvd.size()}, but the runner says {rank} of {world_size}"
            )
        if device.type == "cuda" and not hvd.cuda_built():
            raise RuntimeError(
                "this Horovod was built without GPU operations (a CPU variant), so it cannot reduce CUDA "
                "tensors: build the GPU variant where the CUDA toolkit is complete (`make horovod` there, or "
                "the Dockerfile), or train on the CPU (runtime.device=cpu)"
            )
        super().__init__(world_size, device)
        self.hvd = hvd
        self._ops = {"sum": hvd.Sum, "max": hvd.Max}

    def world_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Sum)  # differentiable: the backward is an all-reduce too

    def _all_reduce_(self, tensor: torch.Tensor, op: str) -> None:
        self.hvd.allreduce_(tensor, op=self._ops[op])

    def _broadcast_(self, tensor: torch.Tensor) -> None:
        self.hvd.broadcast_(tensor, root_rank=0)

    def distributed_optimizer(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> torch.optim.Optimizer:
        """Named parameters: Horovod matches each rank's all-reduces by name ("D.main.0.weight"),
        so the ranks agree on them whatever order the gradients arrive in."""
        prefix = type(module).__name__
        named = [(f"{prefix}.{name}", parameter) for name, parameter in module.named_parameters()]
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=named)

    @contextmanager
    def gradients_reduced(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Wait for the all-reduces, then step without waiting again (Horovod's recipe for a
        GradScaler, which reads the gradients between backward and step)."""
        optimizer.synchronize()
        with optimizer.skip_synchronize():
            yield

    # no_sync: nothing to skip. In G's phase D's parameters do not require gradients, so no
    # gradient of D is computed and its hooks (the all-reduces) never fire.

    def broadcast_state(self, modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer]) -> None:
        for module in modules:
            self.hvd.broadcast_parameters(module.state_dict(), root_rank=0)
        for optimizer in optimizers:
            # A fresh optimizer has no state to send; Horovod would first create some with a
            # zero-gradient step, which counts as Adam's step 1 and shifts its bias correction.
            if optimizer.state:
                self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

"""Which device a rank trains on, and the kernel settings that make that device reproducible."""

from __future__ import annotations

import os
from typing import Optional

import torch

from pipeline import precision
from pipeline.config import ConfigError

# cuBLAS picks among workspace-dependent reduction orders unless its workspace is fixed; torch's
# deterministic mode requires one of the two documented sizes, set before cuBLAS starts.
CUBLAS_WORKSPACE = ":4096:8"


def pick_device(requested: str, local_rank: int = 0, assigned: Optional[str] = None) -> torch.device:
    """CPU, or this rank's CUDA device.

    `assigned` is the device Ray reserved for this worker: ray.train.torch.get_device() (the
    position of its GPU id in CUDA_VISIBLE_DEVICES, which Ray shares between the workers of a
    node), or "cpu" when it reserved no GPU. Without Ray (a single local rank, a test harness)
    the rank's local index picks."""
    if requested == "cpu" or assigned == "cpu":
        return torch.device("cpu")
    if assigned is not None:
        if not torch.cuda.is_available():
            raise RuntimeError(f"Ray assigned this worker {assigned}, but torch sees no CUDA device")
        return torch.device(assigned)
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise ConfigError("runtime.device=cuda, but torch sees no CUDA device (use auto or cpu)")
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def make_deterministic(enabled: bool) -> None:
    """Deterministic kernels on (bit-identical reruns and resumes on GPU) or off (cuDNN may
    benchmark and pick the fastest algorithm, which can differ from run to run).

    Process-wide, and must run before the first CUDA op: the backend does it first thing."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def resolve_precision(requested: str, device: torch.device) -> precision.Precision:
    """train.precision on this device (auto: bf16 where it is native; pipeline/precision.py)."""
    if device.type == "cuda":
        return precision.resolve(requested, "gpu", gpu_has_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    return precision.resolve(requested, "cpu")

"""The device a rank trains on, and the deterministic-kernel settings (CPU machine: no CUDA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.backends.torch_backend.backend import TorchBackend
from pipeline.backends.torch_backend.device import CUBLAS_WORKSPACE, make_deterministic, pick_device
from pipeline.config import ConfigError
from pipeline.context import RankContext
from tests.conftest import small_config

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")


def test_cpu_unless_cuda_is_asked_for_and_missing():
    assert pick_device("auto", local_rank=3) == torch.device("cpu")
    assert pick_device("cpu", local_rank=0, assigned="cuda:1") == torch.device("cpu")
    with pytest.raises(ConfigError, match="runtime.device=cuda, but torch sees no CUDA device"):
        pick_device("cuda")


def test_a_gpu_ray_assigned_but_torch_cannot_see_is_an_error_not_a_silent_cpu_run():
    with pytest.raises(RuntimeError, match="Ray assigned this worker cuda:1, but torch sees no CUDA device"):
        pick_device("auto", local_rank=0, assigned="cuda:1")


@pytest.fixture
def restore_determinism():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))  # fmt: skip
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_backend_applies_runtime_deterministic(tmp_path: Path, restore_determinism, deterministic):
    make_deterministic(not deterministic)  # start from the opposite
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    TorchBackend(small_config(tmp_path, runtime={"deterministic": deterministic}), RankContext())
    assert torch.are_deterministic_algorithms_enabled() is deterministic
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.backends.cudnn.benchmark is not deterministic  # benchmarking picks kernels per run
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (CUBLAS_WORKSPACE if deterministic else None)

"""Shared fixtures: small configs, data prepared once per session, isolated working dirs."""

from __future__ import annotations

import os
import sys
import tempfile
import types
from pathlib import Path

import pytest

from pipeline import config

ROOT = Path(__file__).resolve().parents[1]

# Keep every test on CPU and deterministic in thread count, whatever the machine has.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Node-local caches (staged checkpoints and shards of runs in object storage) stay out of $HOME;
# Ray workers started by the tests inherit it.
os.environ.setdefault("DCGAN_CACHE_DIR", tempfile.mkdtemp(prefix="dcgan-test-cache-"))
# TensorBoard's EventAccumulator imports TensorFlow when it is installed, which must not happen
# in a process that runs torch (docs/ARCHITECTURE.md, traps); this marker module makes it use its stub.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


TF_TESTS = ROOT / "tests" / "tf"


def pytest_ignore_collect(collection_path, config):
    """tests/tf runs in a pytest process of its own (`make test` runs it beside this one): torch and
    TensorFlow must not share a process. It is collected only when named on the command line."""
    path = Path(collection_path).resolve()
    if path != TF_TESTS and TF_TESTS not in path.parents:
        return None
    asked = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    return not any(a == TF_TESTS or TF_TESTS in a.parents for a in asked)


def pytest_collection_modifyitems(config, items):
    """tf for everything under tests/tf; unit for every test that is none of integration, ray,
    horovod, slow (what `make test-fast` runs)."""
    for item in items:
        if TF_TESTS in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.tf)
        if not any(item.get_closest_marker(name) for name in ("integration", "ray", "horovod", "slow")):
            item.add_marker(pytest.mark.unit)


def small_config(tmp_path: Path, backend: str = "torch", **sections) -> config.Config:
    """A tiny, fast config rooted in tmp_path; keyword sections override the defaults."""
    raw = {
        "backend": backend,
        "run": {"name": "t", "dir": str(tmp_path / "runs")},
        "data": {"source": "synthetic", "synthetic_count": 256, "image_size": 32, "channels": 1,
                 "prepared_dir": str(tmp_path / "prepared")},
        "model": {"nz": 16, "ngf": 8, "ndf": 8},
        "train": {"steps": 8, "global_batch_size": 16, "seed": 3, "precision": "fp32"},
        "checkpoint": {"every": 4, "keep": 2},
        "logging": {"every": 2, "samples_every": 4, "num_samples": 16},
        "runtime": {"device": "cpu"},
    }  # fmt: skip
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config.validate(raw, "test")


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> config.Config:
    return small_config(tmp_path)

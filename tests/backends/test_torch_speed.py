"""The torch step's speed settings change how fast it runs, never what it computes (or, for the
layout and the compiler, only by float32 rounding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backends.torch_backend import TorchBackend, feed
from pipeline.context import LOCAL
from pipeline.data import EpochSharder, ShardedImages, ensure_prepared
from tests.conftest import small_config

STEPS = 4


def _train(cfg, images: ShardedImages) -> TorchBackend:
    backend = TorchBackend(cfg, LOCAL)
    batches = backend.batches(images, EpochSharder(len(images), cfg.train.global_batch_size, cfg.train.seed))
    for step in range(1, STEPS + 1):
        backend.train_step(next(batches), step)
    return backend


@pytest.fixture
def images(tmp_path: Path) -> ShardedImages:
    cfg = small_config(tmp_path, data={"shard_size": 100})  # 256 images in 3 shards: gathers cross shards
    return ShardedImages(ensure_prepared(cfg.data))


def test_resident_and_prefetched_batches_are_the_sharders_batches(images: ShardedImages):
    device = torch.device("cpu")
    expected = [images.gather(indices) for _, indices in zip(range(10), EpochSharder(len(images), 48, seed=5))]
    for batches in (feed.resident_batches, feed.prefetched_batches):
        got = [b.numpy() for _, b in zip(range(10), batches(images, EpochSharder(len(images), 48, seed=5), device))]
        assert all(np.array_equal(a, b) for a, b in zip(expected, got)), batches.__name__
    assert not feed.keeps_on_device("auto", images, device)  # on a CPU the memory map is host memory already
    assert feed.keeps_on_device(True, images, device) and feed.dataset_bytes(images) == 256 * 32 * 32


def test_device_cache_changes_no_bit_of_training(tmp_path: Path, images: ShardedImages):
    cached = _train(small_config(tmp_path, data={"device_cache": True}), images)
    prefetched = _train(small_config(tmp_path, data={"device_cache": False}), images)
    assert cached.describe()["data_feed"] == "resident in device memory"
    assert prefetched.describe()["data_feed"] == "prefetched by a thread"
    assert cached.fingerprint() == prefetched.fingerprint()


def test_channels_last_trains_the_same_function_and_its_checkpoint_loads_anywhere(tmp_path: Path, images: ShardedImages):
    nhwc = _train(small_config(tmp_path, train={"channels_last": True}), images)
    nchw = _train(small_config(tmp_path, train={"channels_last": False}), images)
    assert nhwc.netD.main[0].weight.is_contiguous(memory_format=torch.channels_last)
    for name, value in nhwc.netG.state_dict().items():  # different kernels, the same arithmetic up to rounding
        torch.testing.assert_close(value, nchw.netG.state_dict()[name], rtol=1e-3, atol=1e-4, msg=name)
    nhwc.save(tmp_path)
    fresh = TorchBackend(small_config(tmp_path, train={"channels_last": False}), LOCAL)
    fresh.load(tmp_path)
    assert fresh.fingerprint() == nhwc.fingerprint()  # the bytes of the values, whatever the layout
    # Adam's moments take the loading parameters' layout, as the fused step and Horovod's all-reduce need.
    assert all(slots["exp_avg"].is_contiguous() for slots in fresh.optD.state.values())


def test_bf16_autocast_trains_with_float32_weights(tmp_path: Path, images: ShardedImages):
    backend = _train(small_config(tmp_path, train={"precision": "bf16"}), images)
    assert backend.describe()["precision"] == "bf16 (set in the config)"
    assert all(p.dtype == torch.float32 for p in backend.netG.parameters())
    metrics = backend.to_host(backend.train_step(images.gather(np.arange(16)), STEPS + 1))
    assert metrics["nonfinite"] == 0 and np.isfinite(metrics["loss/d"]) and np.isfinite(metrics["loss/g"])


def test_compiled_step_matches_the_eager_one(tmp_path: Path, images: ShardedImages):
    compiled = _train(small_config(tmp_path, train={"compile": True}), images)
    eager = _train(small_config(tmp_path, train={"compile": False}), images)
    assert compiled.describe()["compiled"]
    for name, value in compiled.netD.state_dict().items():
        torch.testing.assert_close(value, eager.netD.state_dict()[name], rtol=1e-3, atol=1e-4, msg=name)

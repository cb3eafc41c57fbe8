"""Sample quality with the TensorFlow backend: G's moving average, evaluation during training in
a torch process of its own, and `dcgan evaluate` of a TensorFlow checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline import tensorboard as tb
from pipeline.backends.base import warmed_up_decay
from pipeline.backends.tf_backend import tf
from pipeline.backends.tf_backend.backend import TFBackend
from pipeline.context import LOCAL
from pipeline.data import EpochSharder, ShardedImages, ensure_prepared
from tests.conftest import small_config
from tests.helpers import dcgan, read_scalars, write_config

DECAY = 0.9


def test_the_average_follows_the_warmed_up_recurrence(tmp_path: Path):
    """One device here: a second MirroredStrategy in this process would reuse the collective
    keys of test_tf_backend's; tests/tf/test_tf_ray.py trains an average on two workers."""
    cfg = small_config(tmp_path, backend="tensorflow", model={"g_ema_decay": DECAY})
    backend = TFBackend(cfg, LOCAL, tf.distribute.OneDeviceStrategy("/device:CPU:0"))
    images = ShardedImages(ensure_prepared(cfg.data))
    batches = backend.batches(images, EpochSharder(len(images), cfg.train.global_batch_size, cfg.train.seed))
    expected = [w.numpy() for w in backend.netG_ema.weights]  # starts as G
    for step in range(1, 5):
        backend.train_step(next(batches), step)
        decay = warmed_up_decay(DECAY, step)
        expected = [decay * e + (1 - decay) * w.numpy() for e, w in zip(expected, backend.netG.weights)]
    for average, value in zip(backend.netG_ema.weights, expected):
        np.testing.assert_allclose(average.numpy(), value, rtol=1e-5, atol=1e-6, err_msg=average.path)
    assert backend.sampling_net is backend.netG_ema
    z = np.random.default_rng(0).standard_normal((8, cfg.model.nz)).astype(np.float32)
    assert not np.array_equal(backend.generate(z), backend.generate(z, averaged=False))

    backend.save(tmp_path)
    fresh = TFBackend(cfg, LOCAL, tf.distribute.OneDeviceStrategy("/device:CPU:0"))
    fresh.load(tmp_path)
    assert np.array_equal(fresh.generate(z), backend.generate(z))


def test_standing_statistics_are_those_of_the_average_on_fresh_latents_and_leave_it_as_it_was(tmp_path: Path):
    """As in torch (tests/backends/test_torch_average.py): inside the block each BatchNorm layer
    of the average normalizes its inputs over the standing latents to mean 0 and variance 1;
    after it the averaged statistics are back."""
    import keras

    from pipeline.backends.base import STANDING_SEED, latent_noise

    cfg = small_config(tmp_path, backend="tensorflow", model={"g_ema_decay": DECAY, "g_ema_standing_statistics": 512})
    backend = TFBackend(cfg, LOCAL, tf.distribute.OneDeviceStrategy("/device:CPU:0"))
    images = ShardedImages(ensure_prepared(cfg.data))
    batches = backend.batches(images, EpochSharder(len(images), cfg.train.global_batch_size, cfg.train.seed))
    for step in range(1, 4):
        backend.train_step(next(batches), step)
    net = backend.netG_ema
    layers = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
    before = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]
    z = latent_noise(512, cfg.model.nz, STANDING_SEED)
    with backend.standing_statistics():
        for layer in layers:
            out = keras.Model(net.input, layer.output)(z, training=False).numpy().astype(np.float64)
            normalized = ((out - layer.beta.numpy()) / layer.gamma.numpy()).reshape(-1, out.shape[-1])
            np.testing.assert_allclose(normalized.mean(axis=0), 0.0, atol=1e-4, err_msg=layer.name)
            np.testing.assert_allclose(normalized.var(axis=0), 1.0, atol=1e-2, err_msg=layer.name)
    for layer, (mean, variance) in zip(layers, before):
        assert np.array_equal(layer.moving_mean.numpy(), mean) and np.array_equal(layer.moving_variance.numpy(), variance)
    assert len(layers) == 3


@pytest.mark.integration
def test_training_evaluates_in_a_torch_process_and_evaluate_reproduces_the_scores(tmp_path: Path):
    cfg = small_config(
        tmp_path, backend="tensorflow",
        data={"source": "digits", "prepared_dir": str(tmp_path / "digits")},
        model={"nz": 32, "ngf": 16, "ndf": 16},
        train={"steps": 20, "global_batch_size": 32, "lr": 1e-3},
        checkpoint={"every": 1000, "keep": 2},
        logging={"every": 10, "samples_every": 1000},
        eval={"every": 10, "num_samples": 200, "best_margin": 0.0},
    )  # fmt: skip
    done = dcgan("train", "--config", write_config(tmp_path / "eval.yaml", cfg), cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    scalars = read_scalars(cfg.run_dir / "tb" / tb.EVAL_RUN)
    for tag in tb.EVAL_TAGS:
        assert sorted(scalars[tag]) == [10, 20] and all(math.isfinite(v) for v in scalars[tag].values()), tag
    checkpoints = cfg.run_dir / "checkpoints"
    fid = scalars[tb.TAG_EVAL_FID]
    best = (checkpoints / "BEST").read_text().strip()
    assert best == f"step-{min(fid, key=fid.get):08d}"

    done = dcgan("evaluate", "--checkpoint", checkpoints / best, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["framework"] == "tensorflow" and result["generator"] == "G"
    recorded = json.loads((checkpoints / best / "manifest.json").read_text())["scores"]
    for tag, value in recorded.items():
        assert result["metrics"][tag] == pytest.approx(value, rel=1e-9, abs=1e-12), tag

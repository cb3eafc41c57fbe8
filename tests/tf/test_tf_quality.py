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

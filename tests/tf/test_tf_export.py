"""`dcgan export` of a TensorFlow checkpoint: the SavedModel serves what the checkpoint samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.backends.base import latent_noise
from pipeline.backends.tf_backend import tf
from pipeline.backends.tf_backend.backend import TFBackend
from pipeline.context import LOCAL
from tests.conftest import small_config
from tests.helpers import dcgan, write_config

pytestmark = pytest.mark.integration

# The SavedModel runs the same kernels as the Keras model, but a traced graph may fuse them
# differently; a last-bit difference can move a value across .5 before rounding to uint8.
MAX_ROUNDING_FLIPS = 8


def test_saved_model_serves_what_the_checkpoint_samples(tmp_path: Path):
    # The large learning rate moves G's outputs well away from 0 in 4 steps (see test_export.py).
    cfg = small_config(tmp_path, "tensorflow", train={"steps": 4, "lr": 0.05}, data={"channels": 3})
    trained = dcgan("train", "--config", write_config(tmp_path / "t.yaml", cfg), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    checkpoint = cfg.run_dir / "checkpoints" / "step-00000004"
    out = tmp_path / "exported"
    done = dcgan("export", "--checkpoint", checkpoint, "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "saved_model" in done.stdout

    summary = json.loads((out / "export.json").read_text())
    assert (summary["framework"], summary["step"], summary["nz"], summary["image_size"], summary["channels"]) == (
        "tensorflow", 4, 16, 32, 3
    )
    assert summary["output"]["layout"] == "NHWC" and summary["output"]["shape"] == [None, 32, 32, 3]
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "saved_model"]

    backend = TFBackend(cfg, LOCAL, tf.distribute.OneDeviceStrategy("/device:CPU:0"))
    backend.load(checkpoint)
    z = latent_noise(16, cfg.model.nz, seed=3)
    served = tf.saved_model.load(str(out / "saved_model"))
    images = served.serve(tf.constant(z))["images"].numpy()
    assert images.shape == (16, 32, 32, 3)
    expected = backend.sampling_net(z, training=False).numpy()
    assert np.abs(images - expected).max() <= 1e-5
    assert images.std() > 0.1, "small outputs would hide a wrong graph"
    signature = served.signatures["serving_default"](z=tf.constant(z[:3]))  # what TF Serving calls
    np.testing.assert_allclose(signature["images"].numpy(), images[:3], atol=1e-6)

    ours = np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)
    difference = np.abs(ours.astype(np.int16) - backend.sample(num=16, seed=3))
    assert difference.max() <= 1 and np.count_nonzero(difference) <= MAX_ROUNDING_FLIPS

    again = dcgan("export", "--checkpoint", checkpoint, "--out", out, cwd=tmp_path)
    assert again.returncode == 2 and f"--out {out} exists and is not empty" in again.stderr

"""The Keras DCGAN: shapes, initialisation, and numerical parity with the PyTorch one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.backends.tf_backend import tf
from pipeline.backends.tf_backend.models import build_discriminator, build_generator, count_parameters
from pipeline.backends.tf_backend.weights import from_neutral, to_neutral

ROOT = Path(__file__).resolve().parents[2]


def torch_outputs(weights: Path, inputs: Path, tmp_path: Path, shape: tuple) -> dict[str, np.ndarray]:
    """G and D outputs of the torch models in a separate process (see torch_side.py)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, ROOT / "tests/tf/torch_side.py", weights, inputs, tmp_path / "out.npz", *shape]
    done = subprocess.run(list(map(str, args)), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return dict(np.load(tmp_path / "out.npz"))


@pytest.mark.parametrize("size", [32, 64, 128])
def test_shapes_and_parameter_counts_match_the_torch_model(size):
    netG, netD = build_generator(16, 8, 3, size, 0), build_discriminator(8, 3, size, 1)
    images = netG(tf.random.normal((3, 16)))
    assert images.shape == (3, size, size, 3)
    assert netD(images).shape == (3,)
    if size == 64:  # the canonical example's counts, as in tests/backends/test_torch_models.py
        assert count_parameters(build_generator(100, 64, 3, 64, 0)) == 3_576_704
        assert count_parameters(build_discriminator(64, 3, 64, 0)) == 2_765_568


def test_init_statistics():
    netG = build_generator(100, 64, 3, 64, 0)
    kernels = np.concatenate([w.numpy().ravel() for w in netG.trainable_weights if "kernel" in w.path])
    gammas = np.concatenate([w.numpy().ravel() for w in netG.trainable_weights if "gamma" in w.path])
    assert abs(kernels.mean()) < 1e-3 and kernels.std() == pytest.approx(0.02, rel=0.02)
    assert gammas.mean() == pytest.approx(1.0, abs=0.01) and gammas.std() == pytest.approx(0.02, rel=0.15)
    batchnorms = [layer for layer in netG.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    assert all(layer.momentum == 0.9 and layer.epsilon == 1e-5 for layer in batchnorms)


def test_neutral_round_trip_is_exact():
    a, b = build_generator(16, 8, 1, 32, 0), build_generator(16, 8, 1, 32, 5)
    from_neutral(b, to_neutral(a))
    assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.weights, b.weights))


@pytest.mark.parametrize("channels, size", [(3, 64), (1, 32)])
def test_same_weights_same_outputs_in_both_frameworks(tmp_path: Path, channels: int, size: int):
    nz, ngf, ndf = 16, 8, 8
    netG, netD = build_generator(nz, ngf, channels, size, 3), build_discriminator(ndf, channels, size, 4)
    # With the N(0, 0.02) init, G's eval-mode output is ~1e-4, too small for a 1e-4 comparison:
    # larger kernels make every output O(1).
    for net, factor in ((netG, 25.0), (netD, 5.0)):  # D's logits then stay O(1), not O(100)
        for weight in net.weights:
            if "kernel" in weight.path:
                weight.assign(weight * factor)
    # Move BatchNorm statistics away from (0, 1) so inference mode is really compared.
    netG(tf.random.normal((16, nz), seed=1), training=True)
    netD(tf.random.uniform((16, size, size, channels), -1, 1, seed=2), training=True)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((8, nz)).astype(np.float32)
    images = rng.uniform(-1, 1, (8, size, size, channels)).astype(np.float32)
    ours = {}
    for mode, training in (("eval", False), ("train", True)):
        # Outputs first: a training-mode call moves Keras' moving statistics afterwards.
        ours[f"g_{mode}"] = netG(z, training=training).numpy()
        ours[f"d_{mode}"] = netD(images, training=training).numpy()
        if mode == "eval":
            weights = {**to_neutral(netG), **to_neutral(netD), "z": z, "images": images}
            np.savez(tmp_path / "in.npz", **weights)

    theirs = torch_outputs(tmp_path / "in.npz", tmp_path / "in.npz", tmp_path, (nz, ngf, ndf, channels, size))
    for name, value in ours.items():
        worst = np.abs(value - theirs[name]).max()
        print(f"{name}: max |x| {np.abs(value).max():.3g}, max abs difference {worst:.3g}")
        assert worst <= 1e-4, f"{name}: max abs difference {worst:.3g}"
        assert np.abs(value).max() > 0.1, f"{name} is too small for the comparison to mean anything"

"""The DCGAN of pipeline/backends/torch_backend/models.py, in Keras, with no distributed code.

Same layers, widths, initialisation and BatchNorm settings (PyTorch momentum 0.1 is Keras
momentum 0.9; epsilon 1e-5). Keras on CPU runs channels-last, so images are NHWC and kernels
are stored (kh, kw, in, out) for Conv2D and (kh, kw, out, in) for Conv2DTranspose; weights.py
converts both ways. "same" padding with kernel 4 and stride 2 pads one pixel on each side,
exactly as PyTorch's padding=1, so the two compute the same function.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import keras
from keras import layers

from pipeline.backends.base import num_resolution_doublings

BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5


def _conv_init(seed: int) -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(0.0, 0.02, seed=seed)


def _batchnorm(seed: int, name: str, synchronized: bool) -> layers.BatchNormalization:
    return layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name, synchronized=synchronized,
        gamma_initializer=keras.initializers.RandomNormal(1.0, 0.02, seed=seed), beta_initializer="zeros",
    )  # fmt: skip



@contextmanager
def _dtype_policy(policy: str) -> Iterator[None]:
    """Layers built inside take `policy` (Keras reads the global policy at construction)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_generator(
    nz: int, ngf: int, channels: int, image_size: int, seed: int, synchronized: bool = False, policy: str = "float32"
) -> keras.Model:
    """z (N, nz) -> images (N, size, size, channels) in [-1, 1], float32 whatever the `policy`
    (a Keras dtype policy: mixed_bfloat16 computes in bf16 with float32 variables)."""
    with _dtype_policy(policy):
        hidden = num_resolution_doublings(image_size) - 1
        width = ngf * 2**hidden
        z = keras.Input((nz,), name="z")
        x = layers.Reshape((1, 1, nz))(z)
        x = layers.Conv2DTranspose(width, 4, 1, "valid", use_bias=False, kernel_initializer=_conv_init(seed),
                                   name="convt_0")(x)  # fmt: skip
        x = layers.ReLU()(_batchnorm(seed + 1, "bn_0", synchronized)(x))
        for index in range(1, hidden + 1):
            width //= 2
            x = layers.Conv2DTranspose(width, 4, 2, "same", use_bias=False, kernel_initializer=_conv_init(seed + 2 * index),
                                       name=f"convt_{index}")(x)  # fmt: skip
            x = layers.ReLU()(_batchnorm(seed + 2 * index + 1, f"bn_{index}", synchronized)(x))
        x = layers.Conv2DTranspose(channels, 4, 2, "same", use_bias=False, kernel_initializer=_conv_init(seed + 99),
                                   name=f"convt_{hidden + 1}")(x)  # fmt: skip
        image = layers.Activation("tanh", dtype="float32")(x)  # float32 out, whatever the compute dtype
    return keras.Model(z, image, name="generator")


def build_discriminator(
    ndf: int, channels: int, image_size: int, seed: int, synchronized: bool = False, policy: str = "float32"
) -> keras.Model:
    """images (N, size, size, channels) -> float32 logits (N,). No BatchNorm on the first layer."""
    with _dtype_policy(policy):
        image = keras.Input((image_size, image_size, channels), name="image")
        x = layers.Conv2D(ndf, 4, 2, "same", use_bias=False, kernel_initializer=_conv_init(seed), name="conv_0")(image)
        x = layers.LeakyReLU(0.2)(x)
        width = ndf
        for index in range(1, num_resolution_doublings(image_size)):
            width *= 2
            x = layers.Conv2D(width, 4, 2, "same", use_bias=False, kernel_initializer=_conv_init(seed + 2 * index),
                              name=f"conv_{index}")(x)  # fmt: skip
            x = layers.LeakyReLU(0.2)(_batchnorm(seed + 2 * index + 1, f"bn_{index}", synchronized)(x))
        x = layers.Conv2D(1, 4, 1, "valid", use_bias=False, kernel_initializer=_conv_init(seed + 99),
                          name=f"conv_{num_resolution_doublings(image_size)}")(x)  # fmt: skip
        logits = layers.Reshape((), dtype="float32")(x)
    return keras.Model(image, logits, name="discriminator")


def count_parameters(model: keras.Model) -> int:
    return int(sum(math.prod(w.shape) for w in model.trainable_weights))

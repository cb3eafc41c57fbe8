"""Paths through the latent space (framework-free), for interpolation strips."""

from __future__ import annotations

import numpy as np


def slerp(start: np.ndarray, end: np.ndarray, steps: int) -> np.ndarray:
    """`steps` latents from `start` to `end` along the arc between them: (..., nz) pairs give
    float32 (..., steps, nz), the first and last exactly `start` and `end`.

    Spherical, not linear: a Gaussian latent lies near the sphere of radius sqrt(nz), where G was
    trained, and the midpoint of a straight line between two of them does not (its norm is about
    sqrt(nz / 2)). Latents of equal norm keep that norm all along, in equal angular steps.
    Parallel latents (no arc to follow) interpolate linearly."""
    a, b = np.asarray(start, np.float64)[..., None, :], np.asarray(end, np.float64)[..., None, :]
    t = np.linspace(0.0, 1.0, steps)[:, None]  # exactly 0 and 1 at the ends
    norms = np.linalg.norm(a, axis=-1, keepdims=True) * np.linalg.norm(b, axis=-1, keepdims=True)
    cosine = np.sum(a * b, axis=-1, keepdims=True) / norms
    omega = np.arccos(np.clip(cosine, -1.0, 1.0))
    sine = np.sin(omega)
    parallel = sine < 1e-7
    safe = np.where(parallel, 1.0, sine)
    weight_a = np.where(parallel, 1.0 - t, np.sin((1.0 - t) * omega) / safe)  # exactly 1.0 at t = 0
    weight_b = np.where(parallel, t, np.sin(t * omega) / safe)
    return (weight_a * a + weight_b * b).astype(np.float32)

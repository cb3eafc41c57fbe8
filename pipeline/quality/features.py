"""Feature extractors for FID and KID: uint8 NHWC images in, float64 (N, D) features out, on the
device the evaluation runs on, in batches.

An extractor's `name` identifies its feature space (weights included), so cached real
features are reused only for the same one; `card` is its part of a score's provenance card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from pipeline.config import Config
from pipeline.durable import sha256_file
from pipeline.preflight import inception_weights_file
from pipeline.quality import digits, inception


class Extractor(Protocol):
    name: str
    classifies: bool  # whether embed() also returns class probabilities
    card: dict[str, Any]

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(features (N, D), class probabilities (N, classes) or None)."""


class DigitsFeatures:
    """The digits classifier's penultimate layer, and its class probabilities."""

    classifies = True
    batch = 250

    def __init__(self, weights: Path, device: str):
        digest = sha256_file(weights)
        self.model = digits.load(weights).to(device)
        self.device = device
        self.name = f"digits-{digest[:12]}"
        self.card = {"extractor": "digits", "weights_sha256": digest, "resize": f"area-{digits.SIZE}-grayscale"}

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        features, probabilities = [], []
        for start in range(0, len(images), self.batch):
            hidden = self.model.features(digits.to_input(images[start : start + self.batch]).to(self.device))
            features.append(hidden.double().cpu())
            probabilities.append(torch.softmax(self.model.head(hidden).double(), dim=1).cpu())
        return torch.cat(features).numpy(), torch.cat(probabilities).numpy()


class InceptionFeatures:
    """InceptionV3 pool features (2048-d) with the standard FID weights (pipeline.quality.inception)."""

    classifies = False
    batch = 64  # StyleGAN2-ADA's per-GPU batch: 299x299 activations, about 1.5 GB in float32

    def __init__(self, weights: Path, device: str):
        digest = sha256_file(weights)
        self.model = inception.load_network(weights, digest, device)
        self.device = device
        self.name = f"inception-{digest[:12]}"
        self.card = {
            "extractor": "inception", "weights_sha256": digest,
            "weights_format": "torchscript (NVIDIA layout)" if inception.is_torchscript(weights) else "torch-fidelity state dict",
            "resize": inception.RESIZE,
        }  # fmt: skip

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        features = []
        for start in range(0, len(images), self.batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch])).to(self.device)
            x = x.permute(0, 3, 1, 2)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grayscale as RGB
            features.append(self.model(x).double().cpu())  # uint8 in; it resizes to 299 itself
        return torch.cat(features).numpy(), None


def make_extractor(cfg: Config, local_prepared: Path, device: str = "cpu") -> Extractor:
    """The configured extractor on `device`. The digits classifier is the one stored beside the
    prepared set (trained at its first evaluation)."""
    if cfg.eval.resolved_extractor(cfg.data.source) == "digits":
        return DigitsFeatures(digits.reference_weights(cfg.data.resolved_prepared_dir(), local_prepared), device)
    return InceptionFeatures(inception_weights_file(cfg.eval.inception_weights), device)

"""Feature extractors for FID and KID: uint8 NHWC images in, float64 (N, D) features out.

An extractor's `name` identifies its feature space (weights included), so cached real
features are reused only for the same one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from pipeline.config import EvalSection
from pipeline.durable import sha256_file
from pipeline.preflight import inception_weights_file
from pipeline.quality import digits

BATCH = 250


class Extractor(Protocol):
    name: str
    classifies: bool  # whether embed() also returns class probabilities

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(features (N, D), class probabilities (N, classes) or None)."""


class DigitsFeatures:
    """The digits classifier's penultimate layer, and its class probabilities."""

    classifies = True

    def __init__(self, model: digits.DigitsClassifier, weights_digest: str):
        self.model = model
        self.name = f"digits-{weights_digest[:12]}"

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        features, probabilities = [], []
        for start in range(0, len(images), BATCH):
            hidden = self.model.features(digits.to_input(images[start : start + BATCH]))
            features.append(hidden.double())
            probabilities.append(torch.softmax(self.model.head(hidden).double(), dim=1))
        return torch.cat(features).numpy(), torch.cat(probabilities).numpy()


class InceptionFeatures:
    """InceptionV3 pool features (2048-d) with the standard FID weights, through torchmetrics."""

    classifies = False

    def __init__(self, weights: Path):
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.model = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
        ).eval()
        self.name = f"inception-{sha256_file(weights)[:12]}"

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        features = []
        for start in range(0, len(images), BATCH):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + BATCH])).permute(0, 3, 1, 2)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grayscale as RGB
            features.append(self.model(x).double())  # uint8 in; it resizes to 299 itself
        return torch.cat(features).numpy(), None


def make_extractor(cfg: EvalSection, source: str) -> Extractor:
    """The configured extractor; the digits classifier is trained at first use (and cached)."""
    if cfg.resolved_extractor(source) == "digits":
        model = digits.load_or_train()
        return DigitsFeatures(model, sha256_file(digits.weights_path()))
    return InceptionFeatures(inception_weights_file(cfg.inception_weights))


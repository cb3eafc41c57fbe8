"""The numbers: FID and KID by torchmetrics over precomputed features, and mode coverage.

torchmetrics' FID and KID take a feature extractor module. Ours run once per image set and
their features are cached (the real set's beside the shards), so the metrics get a
pass-through module and the features themselves.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

# A class counts as covered when at least this share of its fair 1/num_classes of the samples
# is predicted as it with confidence: a few stray samples do not make a collapsed G diverse.
COVERAGE_MIN_SHARE = 0.1
CONFIDENT = 0.9
# KID averages over random subsets; 25 (torchmetrics: 100) keeps an evaluation of 1,000 samples
# at about a second on 2 CPU cores, with a standard deviation reported beside the mean.
KID_SUBSETS = 25


class PassThrough(nn.Module):
    """A "feature extractor" for features computed beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


# The chief scores alone: torchmetrics would otherwise all-gather its states over the training
# process group at compute(), which the other ranks never join.
LOCAL_ONLY = dict(sync_on_compute=False)


def _as_double(features: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float64))


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two (N, D) feature sets."""
    metric = FrechetInceptionDistance(feature=PassThrough(real.shape[1]), **LOCAL_ONLY).double()
    metric.update(_as_double(real), real=True)
    metric.update(_as_double(fake), real=False)
    return float(metric.compute())


def gaussian(features: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of (N, D) features, in float64: what the Frechet distance compares."""
    values = _as_double(features)
    return values.mean(dim=0), torch.cov(values.T)


def frechet_distance_std(
    real: np.ndarray, fake: np.ndarray, resamples: int, seed: int = 0, real_stats: Optional[tuple] = None
) -> float:
    """The noise of `frechet_distance(real, fake)` from the finite generated set: the std of the
    FID over `resamples` bootstrap resamples (with replacement) of the generated features. The
    real statistics (`real_stats`, from `gaussian(real)`, when the caller keeps them) are
    computed once; each resample goes through torchmetrics' own formula (`_compute_fid`, what
    FrechetInceptionDistance.compute runs)."""
    from torchmetrics.image.fid import _compute_fid

    mu_real, sigma_real = real_stats if real_stats is not None else gaussian(real)
    fake_t = _as_double(fake)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        sample = fake_t[torch.randint(0, len(fake_t), (len(fake_t),), generator=generator)]
        values.append(float(_compute_fid(sample.mean(dim=0), torch.cov(sample.T), mu_real, sigma_real)))
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def kernel_distance(real: np.ndarray, fake: np.ndarray, subset_size: int, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets) between two (N, D) feature sets; subsets drawn from `seed`."""
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": that is what KID needs
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=PassThrough(real.shape[1]), subsets=KID_SUBSETS, subset_size=size, **LOCAL_ONLY)
    metric.update(_as_double(real), real=True)
    metric.update(_as_double(fake), real=False)
    with torch.random.fork_rng():  # KID draws its subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall(real: np.ndarray, fake: np.ndarray, neighborhood: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) by torch-fidelity's `prc`: the
    share of generated samples inside the real manifold (k-NN balls, k = 3), and of real ones
    inside the generated manifold."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(_as_double(fake).float(), _as_double(real).float(), prc_neighborhood=neighborhood,
                                 prc_batch_size=10_000, save_cpu_ram=True, verbose=False)  # fmt: skip
    return float(out["precision"]), float(out["recall"])


def memorization_informed_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """torchmetrics' MiFID: FID divided by a memorisation penalty when generated samples sit
    closer (cosine distance) to real ones than the real set's own spread suggests."""
    from torchmetrics.image.mifid import MemorizationInformedFrechetInceptionDistance

    metric = MemorizationInformedFrechetInceptionDistance(feature=PassThrough(real.shape[1]), **LOCAL_ONLY).double()
    metric.update(_as_double(real), real=True)
    metric.update(_as_double(fake), real=False)
    return float(metric.compute())


def mode_coverage(probabilities: np.ndarray) -> float:
    """Share of the classes that confident predictions hit (stacked-MNIST's "modes covered")."""
    samples, classes = probabilities.shape
    confident = probabilities.max(axis=1) >= CONFIDENT
    counts = np.bincount(probabilities.argmax(axis=1)[confident], minlength=classes)
    needed = max(1.0, COVERAGE_MIN_SHARE * samples / classes)
    return float((counts >= needed).sum() / classes)


def class_kl(probabilities: np.ndarray) -> float:
    """KL divergence of the predicted-class histogram from uniform: 0 when every class is
    equally frequent, log(num_classes) when one class takes everything."""
    samples, classes = probabilities.shape
    share = np.bincount(probabilities.argmax(axis=1), minlength=classes) / samples
    hit = share > 0
    return float(np.sum(share[hit] * np.log(share[hit] * classes)))

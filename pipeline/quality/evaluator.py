"""Evaluation of generated images against the prepared real set: the tags eval/*, each score
set with its provenance card.

The real set's features are computed once per prepared dataset, extractor and number of real
images, and cached in `<prepared>/eval/` beside the shards (a `prepare --force` rebuilds the
directory, and with it the cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline import tensorboard as tb
from pipeline.config import Config
from pipeline.data.shards import MANIFEST, ShardedImages
from pipeline.durable import node_lock
from pipeline.quality import metrics
from pipeline.quality.features import Extractor, make_extractor

log = logging.getLogger(__name__)

CACHE_DIR = "eval"
# The card's fields that make two scores comparable; the tool versions are recorded beside them.
CARD_VERSIONS = ("torch", "torchmetrics", "torch-fidelity", "dcgan-pipeline")
# Torchvision's datasets are read as their training split; the other sources whole.
SPLITS = {"mnist": "train", "cifar10": "train"}


def real_subset(count: int, limit: int) -> np.ndarray:
    """Indices of at most `limit` real images, evenly spread over the prepared set."""
    return np.unique(np.linspace(0, count - 1, num=min(count, limit)).round().astype(np.int64))


class Evaluator:
    """Scores uint8 NHWC image sets against the real images of one prepared directory, with
    features computed on `device`."""

    def __init__(self, cfg: Config, prepared_dir: Path, device: str = "cpu"):
        self.cfg = cfg
        self.cache = Path(prepared_dir) / CACHE_DIR
        self.extractor: Extractor = make_extractor(cfg, Path(prepared_dir), device)
        images = ShardedImages(Path(prepared_dir))
        # The real images the scores compare with: evenly spread, eval.num_real of them (all by default).
        self.real_indices = real_subset(len(images), cfg.eval.num_real or len(images))
        with node_lock(self.cache.parent / f".{CACHE_DIR}.lock"):  # ranks and jobs of a node share it
            self.real = self._real_features(images)
        self.real_stats = None  # their mean and covariance, at the first bootstrap
        self.reference = {
            "prepared_sha256": _prepared_digest(Path(prepared_dir)),
            "source": cfg.data.source,
            "split": SPLITS.get(cfg.data.source, "all"),
            "num_real": len(self.real),
            "of": len(images),
        }

    def _real_features(self, images: ShardedImages) -> np.ndarray:
        path = self.cache / f"real-{self.extractor.name}-{len(self.real_indices)}.npy"
        if path.is_file():
            return np.load(path)
        features, _ = self.extractor.embed(images.gather(self.real_indices))
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".tmp")
        with open(staging, "wb") as handle:
            np.save(handle, features)
        staging.replace(path)
        log.info("cached the features of %d real images at %s", len(features), path)
        return features

    def evaluate(self, images: np.ndarray, bootstrap: int | None = None, extra: Sequence[str] | None = None) -> dict[str, float]:
        """FID and KID against the real set, each with its noise (FID: the std over bootstrap
        resamples of the generated features; KID: over its subsets); mode coverage and the
        class KL with the digits classifier; `extra` (default eval.extra_metrics): precision and
        recall, MiFID."""
        features, probabilities = self.extractor.embed(images)
        extra = self.cfg.eval.extra_metrics if extra is None else extra
        kid, kid_std = metrics.kernel_distance(self.real, features, self.cfg.eval.kid_subset_size)
        scores = {tb.TAG_EVAL_FID: metrics.frechet_distance(self.real, features), tb.TAG_EVAL_KID: kid,
                  tb.TAG_EVAL_KID_STD: kid_std}  # fmt: skip
        resamples = self.cfg.eval.bootstrap if bootstrap is None else bootstrap
        if resamples:
            self.real_stats = self.real_stats or metrics.gaussian(self.real)
            scores[tb.TAG_EVAL_FID_STD] = metrics.frechet_distance_std(self.real, features, resamples, real_stats=self.real_stats)
        if "precision_recall" in extra:
            scores[tb.TAG_EVAL_PRECISION], scores[tb.TAG_EVAL_RECALL] = metrics.precision_recall(self.real, features)
        if "mifid" in extra:
            scores[tb.TAG_EVAL_MIFID] = metrics.memorization_informed_fid(self.real, features)
        if probabilities is not None:
            scores[tb.TAG_EVAL_COVERAGE] = metrics.mode_coverage(probabilities)
            scores[tb.TAG_EVAL_CLASS_KL] = metrics.class_kl(probabilities)
        return scores

    def card(self, num_generated: int, latent_seed: int, generator: str) -> dict[str, Any]:
        """What a score was measured with (`key`: the digest two comparable scores share)."""
        comparable = {
            **self.extractor.card, "quantisation": "uint8", "num_generated": num_generated,
            "reference": self.reference, "latent_seed": latent_seed, "generator": generator,
        }  # fmt: skip
        key = hashlib.sha256(json.dumps(comparable, sort_keys=True).encode()).hexdigest()[:16]
        return {**comparable, "key": key, "versions": {name: _version(name) for name in CARD_VERSIONS}}

    def close(self) -> None:
        pass


def _prepared_digest(prepared_dir: Path) -> str:
    """The prepared set's identity: its shards' checksums, shape and source."""
    manifest = json.loads((prepared_dir / MANIFEST).read_text())
    identity = {key: manifest.get(key) for key in ("shards", "shape", "source", "count")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"

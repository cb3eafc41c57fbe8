"""Evaluation of generated images against the prepared real set: the tags eval/*.

The real set's features are computed once per prepared dataset and extractor, and cached in
`<prepared>/eval/` beside the shards (a `prepare --force` rebuilds the directory, and with it
the cache).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline import tensorboard as tb
from pipeline.config import Config
from pipeline.data.shards import ShardedImages
from pipeline.durable import node_lock
from pipeline.quality import metrics
from pipeline.quality.features import Extractor, make_extractor

log = logging.getLogger(__name__)

CACHE_DIR = "eval"
MAX_REAL = 10_000  # real images whose features stand for the real distribution (evenly spaced)



def real_subset(count: int, limit: int = MAX_REAL) -> np.ndarray:
    """Indices of at most `limit` real images, evenly spread over the prepared set."""
    return np.unique(np.linspace(0, count - 1, num=min(count, limit)).round().astype(np.int64))


class Evaluator:
    """Scores uint8 NHWC image sets against the real images of one prepared directory."""

    def __init__(self, cfg: Config, prepared_dir: Path):
        self.cfg = cfg
        self.cache = Path(prepared_dir) / CACHE_DIR
        self.extractor: Extractor = make_extractor(cfg.eval, cfg.data.source)
        with node_lock(self.cache.parent / f".{CACHE_DIR}.lock"):  # ranks and jobs of a node share it
            self.real = self._real_features(ShardedImages(Path(prepared_dir)))

    def _real_features(self, images: ShardedImages) -> np.ndarray:
        path = self.cache / f"real-{self.extractor.name}.npy"
        if path.is_file():
            return np.load(path)
        features, _ = self.extractor.embed(images.gather(real_subset(len(images))))
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".tmp")
        with open(staging, "wb") as handle:
            np.save(handle, features)
        staging.replace(path)
        log.info("cached the features of %d real images at %s", len(features), path)
        return features

    def evaluate(self, images: np.ndarray) -> dict[str, float]:
        """FID and KID against the real set; mode coverage and the class KL with the digits
        classifier."""
        features, probabilities = self.extractor.embed(images)
        kid, _ = metrics.kernel_distance(self.real, features, self.cfg.eval.kid_subset_size)
        scores = {tb.TAG_EVAL_FID: metrics.frechet_distance(self.real, features), tb.TAG_EVAL_KID: kid}
        if probabilities is not None:
            scores[tb.TAG_EVAL_COVERAGE] = metrics.mode_coverage(probabilities)
            scores[tb.TAG_EVAL_CLASS_KL] = metrics.class_kl(probabilities)
        return scores

    def close(self) -> None:
        pass


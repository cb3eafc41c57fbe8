"""An Evaluator in a process of its own, for processes that must not import torch.

torch and TensorFlow never share a process (docs/ARCHITECTURE.md, traps), and the metrics run
in torch: a TensorFlow chief hands its uint8 samples to this spawned process. This module
imports no framework; the child imports torch.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.config import Config

_evaluator: Optional[Any] = None  # in the child: built by the first call


def _start(cfg: dict[str, Any], prepared_dir: str) -> None:
    global _evaluator
    from pipeline.config import validate
    from pipeline.quality.evaluator import Evaluator

    _evaluator = Evaluator(validate(cfg, "the training config"), Path(prepared_dir))


def _evaluate(images: np.ndarray) -> dict[str, float]:
    assert _evaluator is not None, "_start runs first"
    return _evaluator.evaluate(images)


def _card(num_generated: int, latent_seed: int, generator: str) -> dict[str, Any]:
    assert _evaluator is not None, "_start runs first"
    return _evaluator.card(num_generated, latent_seed, generator)


class EvaluatorProcess:
    """Evaluator's interface; the work happens in one spawned child process."""

    def __init__(self, cfg: Config, prepared_dir: Path):
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        # A call rather than a pool initializer: its errors (a missing weights file) come back as they are.
        self.pool.submit(_start, cfg.to_dict(), str(prepared_dir)).result()

    def evaluate(self, images: np.ndarray) -> dict[str, float]:
        return self.pool.submit(_evaluate, images).result()

    def card(self, num_generated: int, latent_seed: int, generator: str) -> dict[str, Any]:
        return self.pool.submit(_card, num_generated, latent_seed, generator).result()

    def close(self) -> None:
        self.pool.shutdown()

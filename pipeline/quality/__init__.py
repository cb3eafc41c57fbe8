"""Sample quality: FID and KID (torchmetrics) over pluggable features, and mode coverage.

Inputs are uint8 NHWC images, whatever framework made them; the metrics run in torch. A
TensorFlow process hands its samples to a torch process (pipeline.quality.remote), as torch
and TensorFlow never share one.
"""

from __future__ import annotations

from pathlib import Path


def open_evaluator(cfg, prepared_dir: Path, framework: str):
    """An Evaluator (pipeline.quality.evaluator) in this process for torch; in a torch process
    of its own for TensorFlow. Imports no framework itself."""
    if framework == "torch":
        from pipeline.quality.evaluator import Evaluator

        return Evaluator(cfg, prepared_dir)
    from pipeline.quality.remote import EvaluatorProcess

    return EvaluatorProcess(cfg, prepared_dir)

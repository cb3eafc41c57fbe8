"""`dcgan evaluate`: the sample quality of one checkpoint, from either framework.

The checkpoint's generator runs in a process of its own framework (pipeline.quality.generate);
this process scores the images in torch, with the extractor and cached real features that
training uses, so the numbers match the eval/* scalars of the run.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline import config
from pipeline import tensorboard as tb
from pipeline.checkpoint import CheckpointError, fetch
from pipeline.data import ensure_prepared, local_prepared_dir


def evaluate_checkpoint(
    address: str, num_samples: Optional[int] = None, device: str = "auto", inception_weights: Optional[Path] = None
) -> dict[str, Any]:
    from pipeline.quality.evaluator import Evaluator

    info = fetch(address)
    cfg = config.validate(info.config, f"{address}/manifest.json")
    if num_samples is not None:
        cfg.eval.num_samples = num_samples
    if inception_weights is not None:
        cfg.eval.inception_weights = inception_weights
    ensure_prepared(cfg.data)  # the real images: the embedded digits are prepared on the spot
    evaluator = Evaluator(cfg, local_prepared_dir(cfg.data))
    with tempfile.TemporaryDirectory(prefix="dcgan-evaluate-") as scratch:
        _generate(info.path, cfg.eval.num_samples, device, Path(scratch))
        from pipeline.quality.generate import SAMPLES, SAMPLES_WITHOUT_EMA

        scores = evaluator.evaluate(np.load(Path(scratch) / SAMPLES))
        without_ema = Path(scratch) / SAMPLES_WITHOUT_EMA
        if without_ema.is_file():
            scores[tb.TAG_EVAL_FID_WITHOUT_EMA] = evaluator.evaluate(np.load(without_ema))[tb.TAG_EVAL_FID]
    return {
        "checkpoint": info.address,
        "step": info.step,
        "framework": info.manifest.get("framework"),
        "num_samples": cfg.eval.num_samples,
        "num_real": len(evaluator.real),
        "extractor": evaluator.extractor.name,
        "generator": "ema" if cfg.model.g_ema_decay else "G",
        "metrics": scores,
    }


def _generate(checkpoint: Path, num: int, device: str, out: Path) -> None:
    command = [sys.executable, "-m", "pipeline.quality.generate", "--checkpoint", str(checkpoint),
               "--num", str(num), "--device", device, "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise CheckpointError(f"{checkpoint}: its generator could not sample (exit {done.returncode}):\n{tail}")


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['checkpoint']} (step {result['step']}, {result['framework']}, G: {result['generator']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.6g}")
    table.caption = f"{result['num_samples']} generated vs {result['num_real']} real images, features {result['extractor']}"
    Console().print(table)

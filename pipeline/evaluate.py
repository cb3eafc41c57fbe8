"""`dcgan evaluate`: the sample quality of checkpoints, from either framework.

A torch checkpoint's generator samples in this process; a TensorFlow one's in a process of its
own framework (pipeline.quality.generate), one for all the TensorFlow checkpoints asked for, so
this process never imports TensorFlow. This process scores the images in torch, with the
extractor and cached real features that training uses, so the numbers match the eval/* scalars
of the run.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from pipeline import config
from pipeline import tensorboard as tb
from pipeline.checkpoint import CheckpointError, CheckpointInfo, fetch
from pipeline.data import ensure_prepared, local_prepared_dir
from pipeline.loop import EVAL_NOISE_SEED
from pipeline.quality.generate import SAMPLES, SAMPLES_WITHOUT_EMA, SampleRequest, write_samples


def evaluate_checkpoint(
    address: str, num_samples: Optional[int] = None, device: str = "auto", inception_weights: Optional[Path] = None
) -> dict[str, Any]:
    return evaluate_checkpoints([address], num_samples, device, inception_weights)[0]


def evaluate_checkpoints(
    addresses: Sequence[str], num_samples: Optional[int] = None, device: str = "auto", inception_weights: Optional[Path] = None
) -> list[dict[str, Any]]:
    """The scores of each checkpoint, in order. Every checkpoint is fetched and its config
    checked before any generator samples."""
    infos = [fetch(address) for address in addresses]
    configs = []
    for address, info in zip(addresses, infos):
        cfg = config.validate(info.config, f"{address}/manifest.json")
        if num_samples is not None:
            cfg.eval.num_samples = num_samples
        if inception_weights is not None:
            cfg.eval.inception_weights = inception_weights
        configs.append(cfg)
    with tempfile.TemporaryDirectory(prefix="dcgan-evaluate-") as scratch:
        requests = [SampleRequest(info.path, cfg.eval.num_samples, Path(scratch) / str(index))
                    for index, (info, cfg) in enumerate(zip(infos, configs))]  # fmt: skip
        for request in requests:
            request.out.mkdir()
        _generate([r for r, cfg in zip(requests, configs) if cfg.backend == "torch"], "torch", device)
        _generate([r for r, cfg in zip(requests, configs) if cfg.backend != "torch"], "tensorflow", device)
        return [_score(info, cfg, request.out, device) for info, cfg, request in zip(infos, configs, requests)]


def feature_device(device: str) -> str:
    """Where the features are computed: runtime.device's rule (auto = CUDA when there is one)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _score(info: CheckpointInfo, cfg: config.Config, samples: Path, device: str) -> dict[str, Any]:
    from pipeline.quality.evaluator import Evaluator

    ensure_prepared(cfg.data)  # the real images: the embedded digits are prepared on the spot
    evaluator = Evaluator(cfg, local_prepared_dir(cfg.data), feature_device(device))
    scores = evaluator.evaluate(np.load(samples / SAMPLES))
    without_ema = samples / SAMPLES_WITHOUT_EMA
    if without_ema.is_file():
        scores[tb.TAG_EVAL_FID_WITHOUT_EMA] = evaluator.evaluate(np.load(without_ema))[tb.TAG_EVAL_FID]
    generator = "ema" if cfg.model.g_ema_decay else "G"
    card = evaluator.card(cfg.eval.num_samples, EVAL_NOISE_SEED, generator)
    return {
        "checkpoint": info.address,
        "step": info.step,
        "framework": info.manifest.get("framework"),
        "num_samples": cfg.eval.num_samples,
        "num_real": len(evaluator.real),
        "extractor": evaluator.extractor.name,
        "generator": generator,
        "metrics": scores,
        "card": card,
    }


def _generate(requests: list[SampleRequest], framework: str, device: str) -> None:
    """Each request's samples: torch's here (this process scores in torch anyway), TensorFlow's
    in one child process for all of them."""
    if not requests:
        return
    if framework == "torch":
        for request in requests:
            try:
                write_samples(request.checkpoint, request.num, device, request.out)
            except Exception as err:  # any failure to load or run G: the checkpoint's fault here
                raise CheckpointError(f"{request.checkpoint}: its generator could not sample: {err}") from err
        return
    command = [sys.executable, "-m", "pipeline.quality.generate", "--device", device]
    for request in requests:
        command += ["--sample", str(request.checkpoint), str(request.num), str(request.out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise CheckpointError(f"a TensorFlow generator could not sample (exit {done.returncode}):\n{tail}")


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['checkpoint']} (step {result['step']}, {result['framework']}, G: {result['generator']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.6g}")
    card = result["card"]
    table.caption = (
        f"{result['num_samples']} generated vs {result['num_real']} real images ({card['reference']['split']} split), "
        f"features {result['extractor']}, resize {card['resize']}, card {card['key']}"
    )
    Console().print(table)

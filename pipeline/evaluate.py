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
from pipeline.quality.generate import SAMPLES, SAMPLES_WITHOUT_EMA, SampleRequest, repeat_file, write_samples


# What `dcgan evaluate` reports beyond the run's own eval.extra_metrics: everything.
ALL_EXTRA_METRICS = ("precision_recall", "mifid")
NEAREST_SHOWN = 4  # training images beside each sample in a --nearest grid


def evaluate_checkpoint(
    address: str, num_samples: Optional[int] = None, device: str = "auto", inception_weights: Optional[Path] = None
) -> dict[str, Any]:
    """Scored as training scores: the training's latents and eval.extra_metrics."""
    return evaluate_checkpoints([address], num_samples, device, inception_weights, extra=None)[0]


def evaluate_checkpoints(
    addresses: Sequence[str],
    num_samples: Optional[int] = None,
    device: str = "auto",
    inception_weights: Optional[Path] = None,
    repeats: int = 1,
    extra: Optional[Sequence[str]] = ALL_EXTRA_METRICS,
    nearest: int = 0,
    extractor: Optional[str] = None,
) -> list[dict[str, Any]]:
    """The scores of each checkpoint, in order. Every checkpoint is fetched and its config
    checked before any generator samples. `metrics` are those of the latents training
    evaluates with; with `repeats` R > 1, `repeats` holds mean and std of each metric over R
    sample sets from independent latents (that set included). `extra`: precision/recall and
    MiFID (None: the run's eval.extra_metrics). `nearest` K: each result's `nearest` holds a
    grid (uint8 HWC) of K samples, each beside its NEAREST_SHOWN nearest real images in
    feature space. `extractor`: instead of the run's eval.extractor (e.g. the standard
    InceptionV3 for a digits run)."""
    infos = [fetch(address) for address in addresses]
    configs = []
    for address, info in zip(addresses, infos):
        cfg = config.validate(info.config, f"{address}/manifest.json")
        if num_samples is not None:
            cfg.eval.num_samples = num_samples
        if inception_weights is not None:
            cfg.eval.inception_weights = inception_weights
        if extractor is not None:
            if extractor == "digits" and cfg.data.source != "digits":
                raise config.ConfigError(f"--extractor digits measures generated digits, but {address} trained on "
                                         f"data.source={cfg.data.source!r}")  # fmt: skip
            cfg.eval.extractor = extractor
        configs.append(cfg)
    with tempfile.TemporaryDirectory(prefix="dcgan-evaluate-") as scratch:
        requests = [SampleRequest(info.path, cfg.eval.num_samples, Path(scratch) / str(index), repeats)
                    for index, (info, cfg) in enumerate(zip(infos, configs))]  # fmt: skip
        for request in requests:
            request.out.mkdir()
        _generate([r for r, cfg in zip(requests, configs) if cfg.backend == "torch"], "torch", device)
        _generate([r for r, cfg in zip(requests, configs) if cfg.backend != "torch"], "tensorflow", device)
        return [_score(info, cfg, request, device, extra, nearest) for info, cfg, request in zip(infos, configs, requests)]


def feature_device(device: str) -> str:
    """Where the features are computed: runtime.device's rule (auto = CUDA when there is one)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _score(
    info: CheckpointInfo, cfg: config.Config, request: SampleRequest, device: str, extra: Optional[Sequence[str]], nearest: int
) -> dict[str, Any]:
    from pipeline.quality.evaluator import Evaluator

    ensure_prepared(cfg.data)  # the real images: the embedded digits are prepared on the spot
    evaluator = Evaluator(cfg, local_prepared_dir(cfg.data), feature_device(device))
    samples = np.load(request.out / SAMPLES)
    scores = evaluator.evaluate(samples, extra=extra)
    without_ema = request.out / SAMPLES_WITHOUT_EMA
    if without_ema.is_file():
        scores[tb.TAG_EVAL_FID_WITHOUT_EMA] = evaluator.evaluate(np.load(without_ema), bootstrap=0, extra=())[tb.TAG_EVAL_FID]
    generator = "ema" if cfg.model.g_ema_decay else "G"
    card = evaluator.card(cfg.eval.num_samples, EVAL_NOISE_SEED, generator)
    result = {
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
    if request.repeats > 1:
        sets = [scores] + [evaluator.evaluate(np.load(request.out / repeat_file(r)), bootstrap=0, extra=extra)
                           for r in range(1, request.repeats)]  # fmt: skip
        result["repeats"] = {
            name: {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "values": values}
            for name in scores if name in sets[-1]
            for values in [[float(s[name]) for s in sets]]
        }
    if nearest:
        result["nearest"] = nearest_grid(evaluator, samples[:nearest], cfg)
    return result


def nearest_grid(evaluator: Any, samples: np.ndarray, cfg: config.Config) -> np.ndarray:
    """Each sample (a row) beside its NEAREST_SHOWN nearest real images by feature distance:
    the memorisation check by eye."""
    import torch

    from pipeline.data.shards import ShardedImages
    from pipeline.images import make_grid

    images = ShardedImages(local_prepared_dir(cfg.data))
    indices = evaluator.real_indices  # the images behind evaluator.real, row for row
    features, _ = evaluator.extractor.embed(samples)
    distances = torch.cdist(torch.from_numpy(features), torch.from_numpy(evaluator.real))
    closest = distances.topk(NEAREST_SHOWN, largest=False).indices.numpy()
    rows = [np.concatenate([sample[None], images.gather(indices[row])]) for sample, row in zip(samples, closest)]
    return make_grid(np.concatenate(rows), columns=1 + NEAREST_SHOWN)


def _generate(requests: list[SampleRequest], framework: str, device: str) -> None:
    """Each request's samples: torch's here (this process scores in torch anyway), TensorFlow's
    in one child process for all of them."""
    if not requests:
        return
    if framework == "torch":
        for request in requests:
            try:
                write_samples(request.checkpoint, request.num, device, request.out, request.repeats)
            except Exception as err:  # any failure to load or run G: the checkpoint's fault here
                raise CheckpointError(f"{request.checkpoint}: its generator could not sample: {err}") from err
        return
    command = [sys.executable, "-m", "pipeline.quality.generate", "--device", device]
    for request in requests:
        command += ["--sample", str(request.checkpoint), str(request.num), str(request.out), str(request.repeats)]
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
    repeats = result.get("repeats", {})
    if repeats:
        table.add_column(f"mean ± std over {len(next(iter(repeats.values()))['values'])} sample sets", justify="right")
    for name, value in result["metrics"].items():
        spread = repeats.get(name)
        table.add_row(name, f"{value:.6g}", *([f"{spread['mean']:.6g} ± {spread['std']:.2g}"] if spread else []))
    card = result["card"]
    table.caption = (
        f"{result['num_samples']} generated vs {result['num_real']} real images ({card['reference']['split']} split), "
        f"features {result['extractor']}, resize {card['resize']}, card {card['key']}"
    )
    Console().print(table)

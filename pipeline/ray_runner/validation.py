"""Checkpoint evaluation apart from the ranks: Ray Train's checkpoint validation.

Under Train V2 (DDP and TensorFlow; Horovod's Train V1 has none and evaluates in-line) the
chief writes each evaluation step's checkpoint marked pending and reports it to Ray with a
validation request; the ranks train on at once. Ray runs `evaluate_apart` as a task of its
own (`eval.resources`: its CPUs and GPUs, on any node that has them), one at a time in the
order reported, and the fit ends only when every requested evaluation has. The task scores
the checkpoint exactly as `dcgan evaluate` does (a TensorFlow generator samples in a process
of its own), then:

- records the scores and their provenance card beside the manifest (scores.json) and moves
  BEST when they beat it (pipeline.checkpoint);
- writes them to TensorBoard at the checkpoint's step, in <run>/tb/eval;
- returns them to Ray, which merges them into that checkpoint's metrics and ranks it by
  eval/ranked_fid (its FID where it became BEST, else NaN: Ray's best is BEST).

A failed evaluation is logged, leaves the checkpoint unscored (retention may then delete it)
and never fails training; Ray logs it as a failed validation.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline import tensorboard as tb
from pipeline.checkpoint import CheckpointManager, Score, fetch, step_dir_name
from pipeline.config import Config, validate
from pipeline.loop import RANKED_FID

log = logging.getLogger(__name__)


def evaluates_apart(cfg: Config) -> bool:
    """Whether this config's Ray runs score their checkpoints as Ray's checkpoint validation."""
    horovod = cfg.backend == "torch" and cfg.distributed.strategy == "horovod"  # Train V1: no validation
    return bool(cfg.eval.every) and cfg.eval.runs == "apart" and not horovod


def validation_config(cfg: Config):
    """The Trainer's ValidationConfig, or None when the ranks evaluate in-line."""
    if not evaluates_apart(cfg):
        return None
    from ray.train import ValidationConfig, ValidationTaskConfig

    device = "cuda" if cfg.eval.resources.gpus > 0 else "cpu"
    return ValidationConfig(
        fn=evaluate_apart,
        task_config=ValidationTaskConfig(fn_kwargs={"device": device}),
        # "DEFAULT": scheduled on the cluster, never inside the placement group of whatever
        # started the job (a sweep's Tune trial holds one sized for its driver alone).
        ray_remote_kwargs={"num_cpus": cfg.eval.resources.cpus, "num_gpus": cfg.eval.resources.gpus,
                           "scheduling_strategy": "DEFAULT"},
    )


def request(address: str, step: int, run_address: str):
    """What rank 0 hands `ray.train.report(..., validation=...)` for the checkpoint it wrote."""
    from ray.train import ValidationTaskConfig

    return ValidationTaskConfig(fn_kwargs={"address": address, "step": step, "run_address": run_address})


def evaluate_apart(checkpoint, address: str, step: int, run_address: str, device: str = "cpu") -> dict[str, float]:
    """Ray's validation function (`checkpoint` is Ray's pointer to ours, at `address`)."""
    from pipeline.evaluate import evaluate_checkpoint

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    name = step_dir_name(step)
    written = fetch(address)
    cfg = validate(written.config, f"{address}/manifest.json")
    # As the job that wrote it: its retention keeps that job's pending checkpoints.
    checkpoints = CheckpointManager(storage.join(run_address, "checkpoints"), None, written.manifest.get("job"),
                                    best_margin=cfg.eval.best_margin)  # fmt: skip
    try:
        result = evaluate_checkpoint(address, device=device)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        log.error("evaluation of %s failed; it stays unscored and training goes on: %s", storage.redacted(address), reason)
        checkpoints.record_failure(name, reason)
        raise
    scores, card = result["metrics"], result["card"]
    fid = scores[tb.TAG_EVAL_FID]
    became_best = checkpoints.record_scores(name, Score(fid, scores.get(tb.TAG_EVAL_FID_STD, 0.0), card["key"]), scores, card)
    write_events(run_address, step, scores, card)
    log.info("step %d: %s%s", step, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()), " (BEST)" if became_best else "")
    return {**scores, RANKED_FID: fid if became_best else math.nan}


def write_events(run_address: str, step: int, scores: dict[str, float], card: dict[str, Any]) -> None:
    """The scores at `step` in a new event file of <run>/tb/eval (uploaded, for a run in object
    storage)."""
    location = storage.location(run_address)
    with tempfile.TemporaryDirectory(prefix="dcgan-eval-events-") as scratch:
        run_dir = location.path if location.is_local else Path(scratch)
        writer = tb.open_eval_writer(run_dir)
        writer.scalars(step, scores)
        writer.text(tb.TAG_EVAL_CARD, step, json.dumps(card, indent=1))
        writer.close()
        if not location.is_local:
            for event_file in (Path(scratch) / "tb" / tb.EVAL_RUN).iterdir():
                location.upload_file(event_file, f"tb/{tb.EVAL_RUN}/{event_file.name}")


"""`dcgan sweep`: the trials of a search space as Tune trials of whole jobs, ranked on FID.

    <runs>/<run.name>/          the sweep's directory (path or URI), under its own lease
        space.yaml              the space it was started with
        asha-rungs.json         ASHA's rungs, which a resumed sweep judges against
        tune/                   Tune's experiment: what `--resume` restores
        trials/<trial>/         each trial's run directory: checkpoints, BEST, tb/ (TensorBoard
                                pointed at trials/ shows every trial, and their HParams)
        sweep.json, sweep.md    the results (pipeline.sweep.results)

Tune runs `--max-concurrent` trials at a time (default: as many as the cluster holds workers
for); each trial's driver reserves a hundredth of a CPU, its Ray Trainer's workers reserve theirs.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from pipeline import config, storage
from pipeline.config import Config, ConfigError
from pipeline.sweep import results
from pipeline.sweep.space import LEARNING_RATES, Dimension, load_space, perturbed

log = logging.getLogger(__name__)

SCHEDULERS = ("asha", "pbt", "none")
TUNE_DIR, TRIALS_DIR, SPACE_FILE, ASHA_STATE = "tune", "trials", "space.yaml", "asha-rungs.json"
# What a trial's driver reserves: it only waits on its Ray Trainer (Tune refuses an empty
# request). The workers reserve their own.
DRIVER_CPUS = 0.01


def check_sweep_config(cfg: Config, scheduler: str, dimensions: list[Dimension]) -> None:
    if not cfg.eval.every:
        raise ConfigError("a sweep ranks its trials by eval/fid: set eval.every (e.g. --set eval.every=500)")
    if cfg.distributed.strategy == "horovod" and cfg.backend == "torch":
        raise ConfigError("distributed.strategy=horovod runs on Ray Train V1, which Tune's trials do not drive: "
                          "sweep with ddp")  # fmt: skip
    if scheduler == "pbt" and not any(d.field in LEARNING_RATES for d in dimensions):
        raise ConfigError(f"--scheduler pbt perturbs the learning rates: put {' or '.join(LEARNING_RATES)} in the space")


def run_sweep(
    config_path: Path, space_path: Path, sets: list[str], trials: int = 1, scheduler: str = "asha",
    max_concurrent: Optional[int] = None, resume: bool = False,
) -> dict[str, Any]:  # fmt: skip
    from pipeline.data import ensure_prepared
    from pipeline.job import with_absolute_paths
    from pipeline.lease import RunLease
    from pipeline.preflight import check_before_writing

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    cfg = with_absolute_paths(config.load(config_path, [*sets, "runtime.runner=ray"]))
    dimensions = load_space(space_path, cfg)
    check_sweep_config(cfg, scheduler, dimensions)
    check_before_writing(cfg)
    sweep_dir = storage.location(cfg.run_address)
    started = sweep_dir.exists(TUNE_DIR) and bool(sweep_dir.child(TUNE_DIR).list())
    if resume and not started:
        raise ConfigError(f"--resume: there is no sweep to continue in {cfg.run_address}")
    if resume and sweep_dir.exists(SPACE_FILE) and sweep_dir.read_text(SPACE_FILE) != Path(space_path).read_text():
        raise ConfigError(f"--resume: {space_path} is not the space the sweep in {cfg.run_address} started with "
                          f"({storage.join(cfg.run_address, SPACE_FILE)}); a resumed sweep keeps its trials' space")  # fmt: skip
    if not resume and (started or sweep_dir.exists("checkpoints")):
        raise ConfigError(f"{cfg.run_address} holds a sweep or a run already: --resume to continue the sweep, "
                          "or --set run.name=NEW for a new one")  # fmt: skip
    with RunLease(storage.location(cfg.runs_root), cfg.run.name):
        ensure_prepared(cfg.data)  # once, before the trials start
        _store_digits_classifier(cfg)
        if not resume:
            sweep_dir.write_text(SPACE_FILE, Path(space_path).read_text())
        if scheduler == "pbt" and max_concurrent is None:
            # A population trains side by side: PBT compares trials at the same step.
            max_concurrent = trials * math.prod(len(d.values) for d in dimensions if d.kind == "grid")
        concurrent = _connect(cfg, max_concurrent)
        grid = _tuner(cfg, dimensions, trials, scheduler, concurrent, resume).fit()
        summary = _summarize(cfg, grid)
    title = f"sweep {cfg.run.name}: {len(summary['trials'])} trial(s), scheduler {scheduler}"
    results.write(cfg.run_address, summary, title)
    results.print_table(summary, title)
    return summary


def _store_digits_classifier(cfg: Config) -> None:
    """The digits classifier, trained once beside the prepared set before the trials start:
    otherwise the trials' first evaluations wait on one another for it, and ASHA's first rung
    comes late (the other extractor, Inception, needs no training)."""
    if cfg.eval.resolved_extractor(cfg.data.source) == "digits":
        from pipeline.data import local_prepared_dir
        from pipeline.quality.digits import reference_weights

        reference_weights(cfg.data.resolved_prepared_dir(), local_prepared_dir(cfg.data))


def _connect(cfg: Config, max_concurrent: Optional[int]) -> int:
    """Join (or start) Ray; the number of trials to run at once."""
    import ray

    from pipeline.context import available_cpus
    from pipeline.ray_runner.driver import connect, job_cpus

    per_trial = job_cpus(cfg) + DRIVER_CPUS
    wanted = per_trial * (max_concurrent or max(1, math.floor(available_cpus() / per_trial)))
    connect(cfg, wanted_cpus=wanted)
    fits = max(1, math.floor(ray.cluster_resources().get("CPU", 0) / per_trial))
    if cfg.scaling.use_gpu:
        fits = min(fits, max(1, math.floor(ray.cluster_resources().get("GPU", 0) / cfg.scaling.max_workers)))
    if max_concurrent and max_concurrent > fits:
        log.warning("--max-concurrent %d: the cluster holds the workers of %d trial(s) at a time; the others' "
                    "workers wait for room", max_concurrent, fits)  # fmt: skip
    return max_concurrent or fits


def _tuner(cfg: Config, dimensions: list[Dimension], trials: int, scheduler: str, concurrent: int, resume: bool):
    # Each trial writes its own TensorBoard run; of Tune's loggers only the results file
    # (what the result grid reads back) is kept.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune's snapshot of which trials finished (what --resume reads) every 5 s, not every 10+:
    # it is a few kilobytes. A finished trial that a snapshot missed is restarted by a resume,
    # and its job, at its last step already, returns without training.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    import warnings

    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    # Tune's advice for PBT; a trial's actor is not reused on purpose: its job owns the run's
    # lease until its ranks have stopped.
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance by enabling `reuse_actors`")

    from pipeline.sweep.trial import Trial

    trials_root = storage.join(cfg.run_address, TRIALS_DIR)
    trainable = tune.with_resources(tune.with_parameters(Trial, sweep=cfg.to_dict(), trials_root=trials_root), {"CPU": DRIVER_CPUS})
    tune_storage = _tune_storage(cfg)
    if resume:
        path = storage.join(tune_storage["storage_path"], TUNE_DIR)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False, restart_errored=False,
                                  storage_filesystem=tune_storage.get("storage_filesystem"))  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space={d.field: d.to_tune() for d in dimensions},
        tune_config=tune.TuneConfig(
            num_samples=trials, scheduler=_scheduler(cfg, dimensions, scheduler), max_concurrent_trials=concurrent,
            reuse_actors=False, trial_dirname_creator=lambda trial: trial.trial_id,
        ),  # fmt: skip
        run_config=tune.RunConfig(
            name=TUNE_DIR, **tune_storage,
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1),  # pointers, a few bytes each: all kept
            failure_config=tune.FailureConfig(max_failures=0),  # a trial's job restarts its workers itself
            callbacks=[JsonLoggerCallback()], verbose=1,
        ),  # fmt: skip
    )


def _tune_storage(cfg: Config) -> dict[str, Any]:
    location = storage.location(cfg.run_address)
    if location.is_local:
        return {"storage_path": str(location)}
    return {"storage_path": location.root, "storage_filesystem": location.fs}


def _scheduler(cfg: Config, dimensions: list[Dimension], name: str):
    from pipeline.sweep.schedulers import NoiseAwareASHA, NoiseAwarePBT

    if name == "asha":
        # Rungs at the evaluation steps 1, 2, 4, ... x eval.every: a trial is first judged at
        # its first score, and continues while it stays in the better half.
        return NoiseAwareASHA(max_t=cfg.train.steps, grace_period=cfg.eval.every, reduction_factor=2,
                              margin=cfg.eval.best_margin, state=storage.join(cfg.run_address, ASHA_STATE))  # fmt: skip
    if name == "pbt":
        return NoiseAwarePBT(perturbation_interval=cfg.eval.every, hyperparam_mutations=perturbed(dimensions),
                             margin=cfg.eval.best_margin, seed=cfg.train.seed)  # fmt: skip
    return None  # FIFO: every trial runs to its end


def _summarize(cfg: Config, grid) -> dict[str, Any]:
    from pipeline.sweep.schedulers import TIME_ATTR

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = Path(str(result.path)).name  # its directory (trial_dirname_creator); an exploited
        # trial's metrics may be its donor's
        run = storage.join(cfg.run_address, f"{TRIALS_DIR}/{trial_id}")
        error = f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:200]}" if result.error else None
        rows.append(results.trial_row(trial_id, dict(result.config or {}), run, int(metrics.get(TIME_ATTR, 0)),
                                      cfg.train.steps, float(metrics.get("time_total_s", 0.0)), error))  # fmt: skip
    return results.summarize(rows, cfg.eval.best_margin)

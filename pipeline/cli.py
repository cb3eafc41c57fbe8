"""The `dcgan` command: parse, build, run, close. No training logic lives here.

Exit codes: 0 success, 1 the run failed (e.g. non-finite loss), 2 bad input (config, data,
checkpoint), 3 the run is held by another job (its lease), 130 interrupted, 143 stopped by
SIGTERM after writing a checkpoint (running the same command again resumes).
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from pipeline.backends.base import NonFiniteError
from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError
from pipeline.data import DataError
from pipeline.horovod_runner import PlanFailed  # horovod itself is imported only when the runner is used
from pipeline.lease import LeaseHeld
from pipeline.ray_runner import RunFailed  # ray itself is imported only when the runner is used
from pipeline.stopping import LeaseLost, Preempted
from pipeline.storage import StorageError

log = logging.getLogger("dcgan")

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUSY, EXIT_INTERRUPTED, EXIT_PREEMPTED = 1, 2, 3, 130, 143


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="run config YAML (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value, type-checked like the file (repeatable)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcgan", description="Data-parallel DCGAN training.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (resumes automatically from the run directory)")
    _add_config_args(train)
    train.add_argument("--dry-run", action="store_true", help="a few steps in <run>-dryrun, a checkpoint round trip, a report")
    train.add_argument(
        "--runner", choices=["local", "ray", "horovodrun"],
        help="override runtime.runner: local = one in-process rank (debugging, profiling), ray = Ray Train, "
        "horovodrun = the processes horovodrun started (launch/horovod.sh)",
    )  # fmt: skip
    train.add_argument("--dry-run-steps", type=int, default=None, metavar="N", help="steps of the dry run (default 12)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--fresh", action="store_true", help="do not resume; the previous run directory is moved aside")
    start.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint directory (path or URI)")

    prepare = commands.add_parser("prepare", help="decode a data source into uint8 shards + manifest")
    _add_config_args(prepare)
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared")

    convert = commands.add_parser("convert", help="turn a checkpoint into one of the other framework")
    convert.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    convert.add_argument("--to", required=True, choices=["torch", "tensorflow"], dest="framework")
    convert.add_argument("--out", required=True, type=Path, metavar="DIR", help="the new checkpoint directory")

    doctor = commands.add_parser("doctor", help="check what a cluster run needs, on every node, before it runs")
    doctor.add_argument("--config", type=Path, default=None, help="the run's config (default: the defaults)")
    doctor.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    doctor.add_argument("--address", default=None, metavar="ADDRESS",
                        help="the Ray cluster (default: runtime.ray_address, else auto: RAY_ADDRESS or this machine's)")  # fmt: skip

    evaluate = commands.add_parser("evaluate", help="FID, KID and mode coverage of checkpoints' samples")
    evaluate.add_argument("--checkpoint", dest="checkpoints", action="append", required=True, metavar="DIR",
                          help="a checkpoint directory (path or URI); repeatable, scored in one go")  # fmt: skip
    evaluate.add_argument("--json", action="store_true",
                          help="print JSON instead of tables: an object, or a list of them for several checkpoints")  # fmt: skip
    evaluate.add_argument("--num-samples", type=int, default=None, metavar="N", help="default: the run's eval.num_samples")
    evaluate.add_argument("--inception-weights", type=Path, default=None, metavar="PATH",
                          help="FID InceptionV3 weights, for data other than the embedded digits")  # fmt: skip
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                          help="where G samples and the features are computed")  # fmt: skip
    evaluate.add_argument("--extractor", choices=["digits", "inception"], default=None,
                          help="features other than the run's eval.extractor (inception: the standard FID network)")  # fmt: skip
    evaluate.add_argument("--repeats", type=int, default=1, metavar="R",
                          help="also score R sample sets from independent latents: mean ± std of each metric")  # fmt: skip
    evaluate.add_argument("--nearest", type=int, default=0, metavar="K",
                          help="write a grid of K samples, each beside its nearest training images in feature space "
                               "(with --out; one checkpoint)")  # fmt: skip
    evaluate.add_argument("--out", type=Path, default=None, metavar="PNG", help="where --nearest writes its grid")

    sweep = commands.add_parser("sweep", help="hyperparameter sweep on FID with Ray Tune: each trial a whole job")
    _add_config_args(sweep)
    sweep.add_argument("--space", type=Path, required=True, metavar="S.yaml",
                       help="config fields -> distributions, e.g. train.lr: {loguniform: [1.0e-4, 1.0e-3]} "
                            "(choice, uniform, loguniform, grid)")  # fmt: skip
    sweep.add_argument("--trials", type=int, default=1, metavar="N",
                       help="samples of the space (each repeats every grid combination; default 1)")  # fmt: skip
    sweep.add_argument("--scheduler", choices=["asha", "pbt", "none"], default="asha",
                       help="asha: stop trials whose FID trails; pbt: copy better trials' checkpoints into worse ones "
                            "and perturb the learning rates; none: run every trial to its end")  # fmt: skip
    sweep.add_argument("--max-concurrent", type=int, default=None, metavar="K",
                       help="trials at a time (default: as many as the cluster holds the workers of)")  # fmt: skip
    sweep.add_argument("--resume", action="store_true",
                       help="continue the interrupted sweep in <runs>/<run.name> (finished trials are not rerun)")  # fmt: skip

    sample = commands.add_parser("sample", help="generate images from a checkpoint")
    sample.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint directory (path or URI)")
    sample.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    sample.add_argument("--out", type=Path, default=Path("samples.png"), help="grid PNG, or a directory with --separate")
    sample.add_argument("--separate", action="store_true", help="one PNG per image in the --out directory")
    sample.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sample.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA when available")
    sample.add_argument(
        "--interpolate", type=int, metavar="STEPS",
        help="instead of --num samples: a grid of --rows latent interpolations (slerp), STEPS images each",
    )  # fmt: skip
    sample.add_argument("--rows", type=int, default=8, help="rows of the --interpolate grid (default 8)")

    export = commands.add_parser("export", help="write a checkpoint's generator for serving (ONNX + safetensors, or SavedModel)")
    export.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint directory (path or URI)")
    export.add_argument("--out", required=True, type=Path, metavar="DIR", help="a new (or empty) directory")
    export.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="where to load it (default cpu)")
    return parser


def _train(args: argparse.Namespace) -> int:
    from pipeline import config, storage
    from pipeline.dryrun import DEFAULT_STEPS, print_report
    from pipeline.job import Job, StartOptions, plan, run_dir_name
    from pipeline.lease import RunLease
    from pipeline.preflight import check_before_writing

    overrides = args.overrides + ([f"runtime.runner={args.runner}"] if args.runner else [])
    cfg = config.load(args.config, overrides)
    dry_run_steps = None
    if args.dry_run:
        if args.fresh or args.resume:
            raise ConfigError("--dry-run always starts fresh in its own <run>-dryrun directory; drop --fresh / --resume")
        dry_run_steps = args.dry_run_steps or DEFAULT_STEPS
        if dry_run_steps < 1:
            raise ConfigError(f"--dry-run-steps must be >= 1, got {dry_run_steps}")
    options = StartOptions(fresh=args.fresh, resume=args.resume)

    @contextmanager
    def planned() -> Iterator[Job]:
        check_before_writing(cfg)
        # One writer per run: the lease is held before anything in the run directory changes.
        with RunLease(storage.location(cfg.runs_root), run_dir_name(cfg, dry_run_steps is not None)) as lease:
            yield plan(cfg, options, dry_run_steps, lease.token)

    if cfg.runtime.runner == "horovodrun":
        from pipeline import horovod_runner

        outcome = horovod_runner.run(planned)  # every process plans through rank 0
        if outcome is None:
            return 0  # not rank 0: the chief reports
        job, result = outcome
    else:
        with planned() as job:
            result = _runner(cfg)(job)
    if dry_run_steps is not None:
        print_report(result)
    else:
        log.info("finished at step %s; run directory %s", result.get("step"), job.run_address)
    return 0


def _runner(cfg):
    if cfg.runtime.runner == "ray":
        from pipeline import ray_runner

        return ray_runner.run
    return _run_in_process


def _run_in_process(job) -> dict:
    """The local runner: one rank in this process, for dry runs, debugging and profiling."""
    import signal
    import threading

    cfg = job.cfg
    if cfg.scaling.max_workers > 1:
        log.info("runner local: one rank computes the whole global batch of %d", cfg.train.global_batch_size)
    from pipeline.stopping import on_signal

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        return job.result(job.run(stop_requested=on_signal(stop)) or {})
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare(args: argparse.Namespace) -> int:
    from pipeline import config
    from pipeline.data import prepare

    cfg = config.load(args.config, args.overrides)
    manifest = prepare(cfg.data, force=args.force)
    print(
        f"prepared {manifest['count']} images {tuple(manifest['shape'])} into {cfg.data.resolved_prepared_dir()} "
        f"in {len(manifest['shards'])} shard(s); skipped {manifest['skipped_count']}"
    )
    for item in manifest["skipped"]:
        print(f"  skipped {item['path']}: {item['reason']}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pipeline.convert import convert

    out = convert(args.checkpoint, args.framework, args.out)
    print(f"wrote a {args.framework} checkpoint to {out} (G, D, G's average where kept, fixed noise, step and "
          "data position; Adam's moments start afresh)")  # fmt: skip
    return 0


def _sample(args: argparse.Namespace) -> int:
    from pipeline.backends import loaded_checkpoint
    from pipeline.images import make_grid, save_png

    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    if args.interpolate is not None:
        _check_interpolation(args)
    with loaded_checkpoint(args.checkpoint, args.device) as (backend, cfg, _):
        if args.interpolate is not None:
            images = backend.generate(_interpolation_latents(args.rows, args.interpolate, cfg.model.nz, args.seed))
        else:
            images = backend.sample(num=args.num, seed=args.seed)
    if args.interpolate is not None:
        save_png(make_grid(images, columns=args.interpolate), args.out)
        print(f"wrote {args.rows} interpolations of {args.interpolate} images each to {args.out}")
    elif args.separate:
        for index, image in enumerate(images):
            save_png(image, args.out / f"sample-{index:05d}.png")
        print(f"wrote {len(images)} images to {args.out}/")
    else:
        save_png(make_grid(images), args.out)
        print(f"wrote a grid of {len(images)} images to {args.out}")
    return 0


def _check_interpolation(args: argparse.Namespace) -> None:
    if args.interpolate < 2:
        raise ConfigError(f"--interpolate must be >= 2 (both ends are drawn), got {args.interpolate}")
    if args.rows < 1:
        raise ConfigError(f"--rows must be >= 1, got {args.rows}")
    if args.separate:
        raise ConfigError("--interpolate writes one grid; drop --separate")


def _interpolation_latents(rows: int, steps: int, nz: int, seed: int):
    """Row r runs from latent 2r to latent 2r + 1 of latent_noise(2 * rows, nz, seed)."""
    from pipeline.backends.base import latent_noise
    from pipeline.latents import slerp

    ends = latent_noise(2 * rows, nz, seed)
    return slerp(ends[0::2], ends[1::2], steps).reshape(rows * steps, nz)


def _export(args: argparse.Namespace) -> int:
    from pipeline.export import EXPORT_FILE, export_generator

    summary = export_generator(args.checkpoint, args.out, args.device)
    print(f"exported the {summary['framework']} generator of step {summary['step']} to {args.out}:")
    for name, what in {**summary["files"], EXPORT_FILE: "what goes in and comes out"}.items():
        print(f"  {name}: {what}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from pipeline.evaluate import evaluate_checkpoints, print_table

    if args.num_samples is not None and args.num_samples < 10:
        raise ConfigError(f"--num-samples must be >= 10, got {args.num_samples}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    if args.nearest < 0 or (args.nearest and (args.out is None or len(args.checkpoints) != 1)):
        raise ConfigError(f"--nearest {args.nearest} needs K >= 1, --out PNG and one --checkpoint")
    results = evaluate_checkpoints(args.checkpoints, args.num_samples, args.device, args.inception_weights,
                                   repeats=args.repeats, nearest=args.nearest, extractor=args.extractor)  # fmt: skip
    for result in results:
        grid = result.pop("nearest", None)
        if grid is not None:
            from pipeline.images import save_png

            save_png(grid, args.out)
            print(f"wrote {args.out}: {args.nearest} samples, each beside its nearest training images", file=sys.stderr)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        for result in results:
            print_table(result)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep.run import run_sweep

    summary = run_sweep(args.config, args.space, args.overrides, args.trials, args.scheduler, args.max_concurrent, args.resume)
    return 0 if summary["best_checkpoint"] else EXIT_FAILED


def _doctor(args: argparse.Namespace) -> int:
    from pipeline import config
    from pipeline.ray_runner.doctor import run_checks

    cfg = config.load(args.config, args.overrides)
    checks = run_checks(cfg, args.address)
    for check in checks:
        print(check.line())
    failed = [check for check in checks if not check.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed")
    return EXIT_FAILED if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    handlers = {"train": _train, "prepare": _prepare, "sample": _sample, "convert": _convert, "export": _export, "evaluate": _evaluate,
                "doctor": _doctor, "sweep": _sweep}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (LeaseHeld, LeaseLost) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BUSY
    except Preempted as err:
        print(f"stopped: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (NonFiniteError, RunFailed, PlanFailed, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

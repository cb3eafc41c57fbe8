"""The `dcgan` command: parse, build, run, close. No training logic lives here.

Exit codes: 0 success, 1 the run failed (e.g. non-finite loss), 2 bad input (config, data,
checkpoint), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from pipeline.backends.base import NonFiniteError
from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError
from pipeline.data import DataError
from pipeline.ray_runner import RunFailed  # ray itself is imported only when the runner is used

log = logging.getLogger("dcgan")

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


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
        "--runner", choices=["local", "ray"],
        help="override runtime.runner: local = one in-process rank (debugging, profiling), ray = Ray Train",
    )  # fmt: skip
    train.add_argument("--dry-run-steps", type=int, default=None, metavar="N", help="steps of the dry run (default 12)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--fresh", action="store_true", help="do not resume; the previous run directory is moved aside")
    start.add_argument("--resume", type=Path, metavar="CHECKPOINT_DIR", help="resume from this checkpoint")

    prepare = commands.add_parser("prepare", help="decode a data source into uint8 shards + manifest")
    _add_config_args(prepare)
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared")

    convert = commands.add_parser("convert", help="turn a checkpoint into one of the other framework")
    convert.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    convert.add_argument("--to", required=True, choices=["torch", "tensorflow"], dest="framework")
    convert.add_argument("--out", required=True, type=Path, metavar="DIR", help="the new checkpoint directory")

    sample = commands.add_parser("sample", help="generate images from a checkpoint")
    sample.add_argument("--checkpoint", type=Path, required=True, metavar="DIR")
    sample.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    sample.add_argument("--out", type=Path, default=Path("samples.png"), help="grid PNG, or a directory with --separate")
    sample.add_argument("--separate", action="store_true", help="one PNG per image in the --out directory")
    sample.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sample.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA when available")
    return parser


def _train(args: argparse.Namespace) -> int:
    from pipeline import config
    from pipeline.dryrun import DEFAULT_STEPS, print_report
    from pipeline.session import StartOptions

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
    if cfg.runtime.runner == "ray":
        from pipeline import ray_runner

        result = ray_runner.run(cfg, options, dry_run_steps)
    else:
        result = _train_in_process(cfg, options, dry_run_steps)
    if dry_run_steps is not None:
        print_report(result)
    else:
        log.info("finished at step %s; run directory %s", result.get("step"), cfg.run_dir)
    return 0


def _train_in_process(cfg, options, dry_run_steps: Optional[int]) -> dict:
    """The local runner: one rank in this process, for dry runs, debugging and profiling."""
    from pipeline.dryrun import dry_run, reset_scratch_dir
    from pipeline.session import TrainingSession

    if cfg.scaling.num_workers > 1:
        log.info("runner local: one rank computes the whole global batch of %d", cfg.train.global_batch_size)
    if dry_run_steps is not None:
        reset_scratch_dir(cfg)
        return dry_run(cfg, steps=dry_run_steps)
    with TrainingSession(cfg, options=options) as session:
        summary = session.run()
    return {**summary.last_metrics, "step": summary.end_step}


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
    print(f"wrote a {args.framework} checkpoint to {out} (G, D, fixed noise, step and data position; "
          "Adam's moments start afresh)")  # fmt: skip
    return 0


def _sample(args: argparse.Namespace) -> int:
    from pipeline import config
    from pipeline.backends import create_backend
    from pipeline.checkpoint import verify
    from pipeline.context import LOCAL
    from pipeline.images import make_grid, save_png

    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    info = verify(args.checkpoint)
    cfg = config.validate(info.config, f"{args.checkpoint}/manifest.json")
    cfg.runtime.device = args.device
    backend = create_backend(cfg, LOCAL)
    try:
        backend.load(info.path)
        images = backend.sample(num=args.num, seed=args.seed)
    finally:
        backend.close()
    if args.separate:
        for index, image in enumerate(images):
            save_png(image, args.out / f"sample-{index:05d}.png")
        print(f"wrote {len(images)} images to {args.out}/")
    else:
        save_png(make_grid(images), args.out)
        print(f"wrote a grid of {len(images)} images to {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    handlers = {"train": _train, "prepare": _prepare, "sample": _sample, "convert": _convert}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (NonFiniteError, RunFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""`dcgan train --dry-run`: prove the whole path works in seconds, then report what a full run costs.

It trains a few steps into a scratch directory next to the real run (<run>-dryrun, replaced
each time), so it never touches the real run's checkpoints, saves a checkpoint, loads it into
a fresh backend and checks every tensor is identical, writes TensorBoard events and a sample
grid, and measures the steady-state step time.
"""

from __future__ import annotations

import resource
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.backends import create_backend
from pipeline.checkpoint import CheckpointError, verify
from pipeline.config import Config
from pipeline.context import LOCAL
from pipeline.loop import LoopSummary
from pipeline.progress import format_seconds
from pipeline.session import TrainingSession

DEFAULT_STEPS = 12


@dataclass
class DryRunReport:
    cfg: Config
    run_dir: Path
    summary: LoopSummary
    backend_info: dict[str, Any]
    num_images: int
    checkpoint: Path
    tensors_checked: int

    @property
    def step_ms(self) -> float:
        return self.summary.steady_step_ms()

    @property
    def images_per_sec(self) -> float:
        return 1000.0 * self.cfg.train.global_batch_size / self.step_ms

    @property
    def full_run_eta_s(self) -> float:
        return self.cfg.train.steps * self.step_ms / 1000.0


def scratch_dir(cfg: Config) -> Path:
    return cfg.run.dir / f"{cfg.run.name}-dryrun"


def dry_run(cfg: Config, steps: int = DEFAULT_STEPS) -> DryRunReport:
    steps = min(steps, cfg.train.steps)
    # Short cadences so the few steps exercise logging, sampling and a checkpoint.
    cfg = cfg.model_copy(deep=True)
    cfg.logging.every = max(1, steps // 3)
    cfg.logging.samples_every = steps
    cfg.checkpoint.every = steps
    run_dir = scratch_dir(cfg)
    shutil.rmtree(run_dir, ignore_errors=True)
    with TrainingSession(cfg, LOCAL, run_dir=run_dir) as session:
        summary = session.run(total_steps=steps)
        checkpoint = summary.checkpoints[-1]
        checked = _check_reload(cfg, session.backend.fingerprint(), checkpoint)
        info = session.backend.describe()
        num_images = len(session.images)
    return DryRunReport(cfg, run_dir, summary, info, num_images, checkpoint, checked)


def _check_reload(cfg: Config, expected: dict[str, str], checkpoint: Path) -> int:
    """Load the checkpoint into a fresh backend; every tensor must match the live one."""
    verify(checkpoint)
    fresh = create_backend(cfg, LOCAL)
    try:
        fresh.load(checkpoint)
        reloaded = fresh.fingerprint()
    finally:
        fresh.close()
    differing = sorted(name for name in expected.keys() | reloaded.keys() if expected.get(name) != reloaded.get(name))
    if differing:
        raise CheckpointError(f"{checkpoint} does not reload identically; first differing tensors: {differing[:5]}")
    return len(expected)


def _peak_host_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def print_report(report: DryRunReport, console: Console | None = None) -> None:
    console = console or Console(file=sys.stdout)
    cfg, info = report.cfg, report.backend_info
    params = info["parameters"]
    checkpoint_bytes = sum(f.stat().st_size for f in report.checkpoint.iterdir())
    memory = f"host {_mib(_peak_host_memory_bytes())} (max RSS)"
    if "peak_device_memory_bytes" in info:
        memory += f", device {_mib(info['peak_device_memory_bytes'])}"
    table = Table(title="dry run: OK", show_header=False, title_justify="left")
    rows = [
        ("backend", f"{info['framework']} on {info.get('device_name', info['device'])}"),
        ("data", f"{cfg.data.source}: {report.num_images:,} images {cfg.data.image_size}x{cfg.data.image_size}x{cfg.data.channels}"),
        ("parameters", f"G {params['generator']:,}  D {params['discriminator']:,}"),
        ("steps", f"{report.summary.end_step} x global batch {cfg.train.global_batch_size}"),
        ("step time", f"{report.step_ms:.1f} ms (steady state)"),
        ("throughput", f"{report.images_per_sec:,.0f} images/s"),
        ("peak memory", memory),
        ("checkpoint", f"{report.checkpoint} ({_mib(checkpoint_bytes)}), reloaded: {report.tensors_checked} tensors identical"),
        ("tensorboard", str(report.run_dir / "tb")),
        ("samples", str(report.run_dir / "samples" / f"step-{report.summary.end_step:08d}.png")),
        ("full run", f"{cfg.train.steps:,} steps, ETA {format_seconds(report.full_run_eta_s)} at this speed"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)

"""`dcgan train --dry-run`: prove the whole path works in seconds, then report what a full run costs.

It trains a few steps into a scratch directory next to the real run (<run>-dryrun, replaced
each time), so it never touches the real run's checkpoints, saves a checkpoint, loads it into
a fresh backend and checks every tensor is identical, writes TensorBoard events and a sample
grid, and measures the steady-state step time. The chief writes the report as JSON into the
scratch directory, so a runner whose ranks live in other processes can print it too.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from pipeline import storage
from pipeline.backends import create_backend
from pipeline.checkpoint import CheckpointError, verify
from pipeline.config import Config
from pipeline.context import LOCAL, RankContext
from pipeline.loop import CheckpointHook
from pipeline.progress import format_seconds
from pipeline.session import TrainingSession

DEFAULT_STEPS = 12
REPORT_FILE = "dryrun-report.json"


def dry_run(
    cfg: Config,
    ctx: RankContext,
    steps: int,
    on_checkpoint: CheckpointHook,
    scratch_address: str,
) -> Optional[dict[str, Any]]:
    """Run the dry run on this rank; the chief returns the report (and writes it to disk)."""
    full_steps = cfg.train.steps
    steps = min(steps, full_steps)
    # Short cadences so the few steps exercise logging, sampling and a checkpoint.
    cfg = cfg.model_copy(deep=True)
    cfg.logging.every = max(1, steps // 3)
    cfg.logging.samples_every = steps
    cfg.checkpoint.every = steps
    session = TrainingSession(cfg, ctx, run_address=scratch_address, on_checkpoint=on_checkpoint)
    run_dir = session.run_dir
    with session:
        summary = session.run(total_steps=steps)
        if not ctx.is_chief:
            return None
        checkpoint = summary.checkpoints[-1]
        checked = _check_reload(cfg, session.backend.fingerprint(), checkpoint)
        info = session.backend.describe()
        num_images = len(session.images)
    step_ms = summary.steady_step_ms()
    report = {
        "backend": info,
        "world_size": ctx.world_size,
        "data": f"{cfg.data.source}: {num_images:,} images {cfg.data.image_size}x{cfg.data.image_size}x{cfg.data.channels}",
        "steps": summary.end_step,
        "global_batch_size": cfg.train.global_batch_size,
        "step_ms": step_ms,
        "images_per_sec": 1000.0 * cfg.train.global_batch_size / step_ms,
        "peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "checkpoint": str(checkpoint),
        "checkpoint_bytes": sum(f.stat().st_size for f in checkpoint.iterdir()),
        "tensors_checked": checked,
        "run_dir": scratch_address,
        "full_run_steps": full_steps,
        "full_run_eta_s": full_steps * step_ms / 1000.0,
    }
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    session.run_files.sync()
    return report


def read_report(scratch_address: str) -> dict[str, Any]:
    return json.loads(storage.location(scratch_address).read_text(REPORT_FILE))


def _check_reload(cfg: Config, expected: dict[str, str], checkpoint: Path) -> int:
    """Load the checkpoint into a fresh single-rank backend; every tensor must match the live one."""
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


def _over(info: dict) -> str:
    """How the ranks cooperate, where there are several (a backend may not say)."""
    return f" ({info['data_parallel']})" if info.get("data_parallel") else ""


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def _speed_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The step's speed settings as the backend resolved them (layout and feed: torch only)."""
    compiled = "XLA jit_compile" if info["framework"].startswith("tensorflow") else "torch.compile"
    rows = [("compiled", compiled if info.get("compiled") else "no (eager)")]
    rows += [(name, info[key]) for name, key in (("layout", "layout"), ("data feed", "data_feed")) if key in info]
    return rows


def print_report(report: dict[str, Any], console: Optional[Console] = None) -> None:
    # Piped into a log, lines need not fit 80 columns: keep each row (and path) on one line.
    console = console or Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)
    info = report["backend"]
    params = info["parameters"]
    memory = f"host {_mib(report['peak_host_memory_bytes'])} (max RSS)"
    if "peak_device_memory_bytes" in info:
        memory += f", device {_mib(info['peak_device_memory_bytes'])}"
    ranks = report["world_size"]
    table = Table(title="dry run: OK", show_header=False, title_justify="left")
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths wrap whole instead of being cut short
    rows = [
        ("backend", f"{info['framework']} on {info.get('device_name', info['device'])}, {ranks} rank(s){_over(info)}"),
        ("data", report["data"]),
        ("parameters", f"G {params['generator']:,}  D {params['discriminator']:,}"),
        ("precision", info.get("precision", "fp32")),
        *_speed_rows(info),
        ("steps", f"{report['steps']} x global batch {report['global_batch_size']}"),
        ("step time", f"{report['step_ms']:.1f} ms (steady state)"),
        ("throughput", f"{report['images_per_sec']:,.0f} images/s"),
        ("peak memory", memory + (" of rank 0" if ranks > 1 else "")),
        ("checkpoint", f"{report['checkpoint']} ({_mib(report['checkpoint_bytes'])}), "
                       f"reloaded: {report['tensors_checked']} tensors identical"),  # fmt: skip
        ("tensorboard", storage.join(report["run_dir"], "tb")),
        ("samples", storage.join(report["run_dir"], f"samples/step-{report['steps']:08d}.png")),
        ("full run", f"{report['full_run_steps']:,} steps, ETA {format_seconds(report['full_run_eta_s'])} at this speed"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)

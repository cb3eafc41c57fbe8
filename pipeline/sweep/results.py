"""What a sweep leaves for its user: the table of its trials and the checkpoint it found.

Each trial's best score is its own run's BEST (pipeline.checkpoint), so it is the score the
run would give `dcgan evaluate`, with its std and step. The sweep's result is the best trial's
BEST checkpoint; trials whose best is within the noise of it are marked, as a reader should not
prefer the winner over them on that digit. Written into the sweep's directory as sweep.json
(`trials`, `best_checkpoint`) and sweep.md, and printed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from pipeline import storage
from pipeline.checkpoint import CheckpointManager, step_of
from pipeline.sweep.space import overrides

SWEEP_JSON, SWEEP_MD = "sweep.json", "sweep.md"


@dataclass
class TrialRow:
    trial: str
    overrides: list[str]
    run: str  # the trial's run directory
    status: str  # finished | stopped (by the scheduler: its last score came before the last step) | error
    best_fid: Optional[float]
    best_fid_std: Optional[float]
    best_step: Optional[int]
    best_checkpoint: Optional[str]
    last_step: int  # the run's newest checkpoint (a stopped trial's job stops at a step after the decision)
    wall_seconds: float
    error: Optional[str] = None
    within_noise_of_best: bool = False


def trial_row(trial_id: str, values: dict[str, Any], run: str, scored_step: int, total_steps: int, wall: float,
              error: Optional[str]) -> TrialRow:  # fmt: skip
    """`scored_step`: the step of Tune's last result of the trial."""
    manager = CheckpointManager(storage.join(run, "checkpoints"), None)
    best, latest = manager.best_name(), manager.latest_name()
    record = (manager.scores(best) if best else None) or {}
    fid = record.get("score")
    status = "error" if error else ("finished" if scored_step >= total_steps else "stopped")
    last_step = step_of(latest) if latest else 0
    return TrialRow(
        trial=trial_id, overrides=overrides(values), run=run, status=status,
        best_fid=float(fid) if fid is not None else None,
        best_fid_std=float(record.get("score_std") or 0.0) if fid is not None else None,
        best_step=step_of(best) if best and fid is not None else None,
        best_checkpoint=storage.join(run, f"checkpoints/{best}") if best and fid is not None else None,
        last_step=last_step, wall_seconds=round(wall, 1), error=error,
    )  # fmt: skip


def summarize(rows: list[TrialRow], margin: float) -> dict[str, Any]:
    scored = [row for row in rows if row.best_fid is not None and math.isfinite(row.best_fid)]
    best = min(scored, key=lambda row: row.best_fid) if scored else None
    for row in scored:
        row.within_noise_of_best = row is not best and row.best_fid - best.best_fid <= margin * math.hypot(
            row.best_fid_std or 0.0, best.best_fid_std or 0.0
        )
    return {
        "trials": [asdict(row) for row in sorted(rows, key=lambda r: (r.best_fid is None, r.best_fid or 0.0))],
        "best_trial": best.trial if best else None,
        "best_checkpoint": best.best_checkpoint if best else None,
    }


def markdown(summary: dict[str, Any], title: str) -> str:
    lines = [
        f"# {title}", "",
        f"Best checkpoint: `{summary['best_checkpoint']}`" if summary["best_checkpoint"] else "No trial was scored.", "",
        "| trial | overrides | best FID | step | status | last step | wall (s) |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]  # fmt: skip
    for row in summary["trials"]:
        fid = "-" if row["best_fid"] is None else f"{row['best_fid']:.2f} ± {row['best_fid_std']:.2f}"
        if row["within_noise_of_best"]:
            fid += " (within noise)"
        status = row["status"] + (f": {row['error']}" if row["error"] else "")
        lines.append(f"| {row['trial']} | {' '.join(row['overrides'])} | {fid} | {row['best_step'] or '-'} | "
                     f"{status} | {row['last_step']} | {row['wall_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write(sweep_address: str, summary: dict[str, Any], title: str) -> None:
    location = storage.location(sweep_address)
    location.write_text(SWEEP_JSON, json.dumps(summary, indent=2))
    location.write_text(SWEEP_MD, markdown(summary, title))


def print_table(summary: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("trial", "overrides", "best FID", "step", "status", "wall (s)"):
        table.add_column(column, justify="right" if column in ("best FID", "step", "wall (s)") else "left")
    for row in summary["trials"]:
        fid = "-" if row["best_fid"] is None else f"{row['best_fid']:.2f} ± {row['best_fid_std']:.2f}"
        table.add_row(row["trial"], "\n".join(row["overrides"]), fid + (" ~" if row["within_noise_of_best"] else ""),
                      str(row["best_step"] or "-"), row["status"], f"{row['wall_seconds']:.0f}")  # fmt: skip
    console = Console()
    console.print(table)
    if summary["best_checkpoint"]:
        console.print(f"best checkpoint: {summary['best_checkpoint']}  (~ = within the noise of the best)")

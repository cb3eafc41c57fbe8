"""A sweep on the digits against the config it starts from: does `dcgan sweep` find better
settings than a digits config's own (configs/digits-torch.yaml, or --config
configs/digits-tf.yaml), within about 30 CPU-minutes?

Two commands, as a user runs them, one after the other on this machine:
- the baseline: `dcgan train --config CONFIG` (its own settings);
- the sweep: `dcgan sweep` over configs/spaces/digits.yaml (G's and D's rates apart, beta1, the
  EMA's decay), ASHA on eval/fid, `--trials` samples, on a local Ray.
Each result is the run's BEST: digits-FID ± its bootstrap std, at its step. The sweep's best is
better only by more than the noise of the difference (eval.best_margin standard deviations).

    .venv/bin/python bench/sweep.py [--config configs/digits-torch.yaml] [--space configs/spaces/digits.yaml]
                                    [--trials 8] [--scheduler asha] [--out runs/bench/sweep.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits-torch.yaml"
SPACE = ROOT / "configs" / "spaces" / "digits.yaml"


def dcgan(*args: str) -> float:
    """Runs `dcgan ARGS` from the repository; returns its wall time."""
    started = time.monotonic()
    subprocess.run([str(Path(sys.executable).parent / "dcgan"), *args], cwd=ROOT, check=True)
    return time.monotonic() - started


def best_of(run: Path) -> dict[str, Any]:
    from pipeline.checkpoint import CheckpointManager, step_of

    manager = CheckpointManager(run / "checkpoints", None)
    name = manager.best_name()
    record = manager.scores(name) or {}
    return {"best_fid": record.get("score"), "best_fid_std": record.get("score_std"),
            "best_step": step_of(name), "checkpoint": str(run / "checkpoints" / name)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--space", type=Path, default=SPACE)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--scheduler", default="asha", choices=["asha", "pbt", "none"])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "sweep.json")
    args = parser.parse_args()
    runs = args.runs.resolve()
    common = ["--set", f"run.dir={runs}"]

    baseline_wall = dcgan("train", "--config", str(args.config), *common, "--set", "run.name=baseline", "--fresh")
    baseline = best_of(runs / "baseline")
    sweep_wall = dcgan("sweep", "--config", str(args.config), "--space", str(args.space), "--trials", str(args.trials),
                       "--scheduler", args.scheduler, *common, "--set", "run.name=sweep")  # fmt: skip
    sweep = json.loads((runs / "sweep" / "sweep.json").read_text())
    best = next(row for row in sweep["trials"] if row["trial"] == sweep["best_trial"])
    noise = math.hypot(best["best_fid_std"], baseline["best_fid_std"])
    result = {
        "config": str(args.config),
        "cores": os.cpu_count(),
        "baseline": {**baseline, "wall_s": round(baseline_wall, 1)},
        "sweep": {"trials": sweep["trials"], "best_trial": sweep["best_trial"], "best_checkpoint": sweep["best_checkpoint"],
                  "wall_s": round(sweep_wall, 1), "cpu_minutes": round(sweep_wall * (os.cpu_count() or 1) / 60, 1)},
        "improvement": baseline["best_fid"] - best["best_fid"],
        "noise_of_the_difference": noise,
        "better_beyond_noise": baseline["best_fid"] - best["best_fid"] > noise,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"baseline ({result['config']}): FID {baseline['best_fid']:.2f} ± {baseline['best_fid_std']:.2f} "
          f"at step {baseline['best_step']}, {baseline_wall:.0f} s")  # fmt: skip
    print(f"sweep ({args.trials} trials, {args.scheduler}): FID {best['best_fid']:.2f} ± {best['best_fid_std']:.2f} at step "
          f"{best['best_step']} with {' '.join(best['overrides'])}, {sweep_wall:.0f} s "
          f"({result['sweep']['cpu_minutes']} CPU-minutes); better beyond the noise: {result['better_beyond_noise']}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

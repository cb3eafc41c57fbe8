"""Ray Train overhead and data-parallel scaling, measured on this machine in one run.

1. steady-state step time: Ray Train with 1 worker against the local (in-process) runner,
   both with one torch thread: what the Ray path costs per step.
2. images/s: 2 Ray workers x 1 thread against 1 Ray worker x 1 thread, same global batch:
   what data parallelism buys on this machine.

Each measurement is a dry run on the embedded digits (32 px, the DCGAN of configs/dryrun.yaml),
reporting the median step time of its log windows after the first.

    .venv/bin/python bench/ray_scaling.py [--steps 40] [--out runs/bench/ray_scaling.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline import config, ray_runner
from pipeline.job import plan

ROOT = Path(__file__).resolve().parents[1]


def _config(runs: Path, name: str, runner: str, workers: int) -> config.Config:
    return config.load(ROOT / "configs" / "dryrun.yaml", [
        f"run.name={name}", f"run.dir={runs}", f"runtime.runner={runner}", "runtime.device=cpu",
        f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ray_scaling.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runs = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        torch.set_num_threads(1)
        local_cfg = _config(runs, "local", "local", 1)
        local_job = plan(local_cfg, dry_run_steps=args.steps)
        local = local_job.result(local_job.run())
        ray_1 = ray_runner.run(plan(_config(runs, "ray1", "ray", 1), dry_run_steps=args.steps))
        ray_2 = ray_runner.run(plan(_config(runs, "ray2", "ray", 2), dry_run_steps=args.steps))
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    result = {
        "steps": args.steps,
        "global_batch_size": local_cfg.train.global_batch_size,
        "local_1thread_step_ms": round(local["step_ms"], 2),
        "ray_1worker_1thread_step_ms": round(ray_1["step_ms"], 2),
        "ray_over_local_step_time_ratio": round(ray_1["step_ms"] / local["step_ms"], 3),
        "ray_1worker_images_per_sec": round(ray_1["images_per_sec"], 1),
        "ray_2workers_images_per_sec": round(ray_2["images_per_sec"], 1),
        "two_over_one_worker_images_per_sec_ratio": round(ray_2["images_per_sec"] / ray_1["images_per_sec"], 3),
    }
    print(f"{'run':<34}{'step ms':>10}{'images/s':>12}")
    for label, report in (("local runner, 1 thread", local), ("Ray, 1 worker x 1 thread", ray_1),
                          ("Ray, 2 workers x 1 thread", ray_2)):  # fmt: skip
        print(f"{label:<34}{report['step_ms']:>10.1f}{report['images_per_sec']:>12,.0f}")
    print(f"Ray/local step time {result['ray_over_local_step_time_ratio']}x; "
          f"2/1 workers images/s {result['two_over_one_worker_images_per_sec_ratio']}x")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""A Horovod job on a local Ray through Ray Train's HorovodTrainer, in a process of its own:
the Train V1 API that HorovodTrainer needs is chosen when ray.train is first imported, and the
test process has imported V2 already.

    python -m tests.horovod_ray_job CONFIG TRACE_DIR KILL_RANK KILL_AT_STEP

runs the product's Ray worker wrapped by tests.helpers.traced_worker (one rank SIGKILLs
itself once at the start of KILL_AT_STEP; -1 for none) and prints the result as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

V1 = {"RAY_TRAIN_V2_ENABLED": "0"}


def main(config_path: str, trace_dir: str, kill_rank: str, kill_at_step: str) -> None:
    os.environ.update(V1)
    from pipeline import config, ray_runner
    from pipeline.job import plan
    from tests.helpers import local_ray, traced_worker

    cfg = config.load(Path(config_path), [])
    with local_ray(__name__, env_vars=V1):
        worker = traced_worker(Path(trace_dir), kill_rank=int(kill_rank), kill_at_step=int(kill_at_step))
        metrics = ray_runner.run(plan(cfg), train_fn=worker)
    print(json.dumps({"step": metrics["step"]}))


if __name__ == "__main__":
    main(*sys.argv[1:])

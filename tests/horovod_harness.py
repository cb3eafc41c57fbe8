"""Run a function on N real processes that horovodrun starts on 127.0.0.1 (Gloo controller).

    run_horovod(2, "tests.backends.test_torch_horovod:_train", tmp_path, ...)

calls _train(rank, world_size, *args) in each process after hvd.init(), as
tests/ddp_harness.run_ranks does over a torch.distributed process group. Arguments travel as
JSON (paths as strings).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOROVODRUN = Path(sys.executable).with_name("horovodrun")


def run_horovod(world_size: int, function: str, *args: Any, timeout: float = 300) -> None:
    """Raises AssertionError with the processes' output if any of them fails."""
    encoded = json.dumps([str(a) if isinstance(a, Path) else a for a in args])
    command = [str(HOROVODRUN), "-np", str(world_size), "-H", f"localhost:{world_size}", "--gloo",
               sys.executable, "-m", "tests.horovod_harness", function, encoded]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"horovodrun exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def _main(function: str, encoded: str) -> None:
    import horovod.torch as hvd

    hvd.init()
    module, name = function.split(":")
    getattr(importlib.import_module(module), name)(hvd.rank(), hvd.size(), *json.loads(encoded))


if __name__ == "__main__":
    _main(*sys.argv[1:])

"""`dcgan convert`: a checkpoint of one framework becomes a checkpoint of the other.

torch and TensorFlow never share a process (docs/ARCHITECTURE.md, traps), so the conversion runs in two:
the source framework exports G, D, G's average (model.g_ema_decay) and the fixed noise as
framework-neutral arrays (.npz; a target that keeps an average the source did not starts it from G), then
the target framework imports them and writes a complete checkpoint directory with the same
step and data position. Optimizer state is not converted: Adam starts its moments afresh.

    python -m pipeline.convert export CHECKPOINT ARRAYS.npz
    python -m pipeline.convert import ARRAYS.npz CHECKPOINT FRAMEWORK OUT
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline import config
from pipeline.checkpoint import CheckpointError, verify, write_checkpoint
from pipeline.context import LOCAL
from pipeline.loop import TRAINER_STATE_FILE

FRAMEWORKS = ("torch", "tensorflow")


def _config_for(checkpoint: Path, framework: str) -> config.Config:
    """The checkpoint's config for `framework`, as this process runs it: one local rank on the CPU.
    What only the source framework has gives way to the target's default (Horovod reduces torch
    ranks alone; TensorFlow's go through tf.distribute)."""
    raw = verify(checkpoint).config
    raw = {**raw, "backend": framework, "runtime": {**raw.get("runtime", {}), "device": "cpu", "runner": "local"}}
    if framework != "torch":
        raw["distributed"] = {**raw.get("distributed", {}), "strategy": "ddp"}
    return config.validate(raw, f"{checkpoint}/manifest.json")


def export_arrays(checkpoint: Path, target: Path) -> None:
    from pipeline.backends import create_backend

    info = verify(checkpoint)
    backend = create_backend(_config_for(checkpoint, info.manifest["framework"]), LOCAL)
    backend.load(checkpoint)
    np.savez(target, **backend.export_weights())


def import_arrays(arrays: Path, source: Path, framework: str, out: Path) -> None:
    from pipeline.backends import create_backend

    info = verify(source)
    cfg = _config_for(source, framework)
    backend = create_backend(cfg, LOCAL)
    backend.import_weights(dict(np.load(arrays)))

    def write_files(directory: Path) -> None:
        backend.save(directory)
        shutil.copy(source / TRAINER_STATE_FILE, directory / TRAINER_STATE_FILE)

    metadata = {"framework": framework, "world_size": 1, "config": cfg.to_dict(), "converted_from": str(source)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(out, info.step, write_files, metadata)


def convert(checkpoint: Path, framework: str, out: Path) -> Path:
    """Run in a process that has imported neither framework; each side gets a process of its own."""
    info = verify(checkpoint)
    source = info.manifest.get("framework")
    if source == framework:
        raise CheckpointError(f"{checkpoint} is already a {framework} checkpoint")
    if out.exists():
        raise CheckpointError(f"--out {out} exists; choose a new directory")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="dcgan-convert-") as scratch:
        arrays = Path(scratch) / "weights.npz"
        for args in (["export", checkpoint, arrays], ["import", arrays, checkpoint, framework, out]):
            done = subprocess.run([sys.executable, "-m", "pipeline.convert", *map(str, args)], env=env,
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"dcgan convert: the {args[0]} step failed:\n{done.stderr.strip()[-2000:]}")
    return out


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "export":
        export_arrays(Path(rest[0]), Path(rest[1]))
    elif command == "import":
        import_arrays(Path(rest[0]), Path(rest[1]), rest[2], Path(rest[3]))
    else:
        raise SystemExit(f"unknown command {command!r}")

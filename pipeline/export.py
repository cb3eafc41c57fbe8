"""`dcgan export`: a checkpoint's generator as files that serve without this package.

torch checkpoints give generator.safetensors (the state dict) and generator.onnx, TensorFlow
checkpoints a SavedModel; export.json beside them says what goes in and what comes out. The
generator is the one sampling uses (Backend.sampling_net). Only the checkpoint's own
framework is imported.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline import config
from pipeline.backends import loaded_checkpoint
from pipeline.config import ConfigError

EXPORT_FILE = "export.json"
TO_UINT8 = "round((clip(images, -1, 1) + 1) * 127.5), as dcgan sample does"


def export_generator(checkpoint: str, out: Path, device: str = "cpu") -> dict[str, Any]:
    """Export the generator of `checkpoint` (a path or URI) into the new directory `out`;
    returns what export.json holds."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new directory")
    with loaded_checkpoint(checkpoint, device) as (backend, cfg, step):
        return _write(backend, cfg, step, str(checkpoint), out)


def _writer(framework: str):
    """The framework's export module, imported only now (one framework per process)."""
    if framework == "torch":
        from pipeline.backends.torch_backend import export
    else:
        from pipeline.backends.tf_backend import export
    return export


def _write(backend, cfg: config.Config, step: int, checkpoint: str, out: Path) -> dict[str, Any]:
    """Write into a sibling directory renamed to `out` at the end, so a failed export leaves
    nothing that a second try would refuse as not empty."""
    writer = _writer(cfg.backend)
    nz, size, channels = cfg.model.nz, cfg.data.image_size, cfg.data.channels
    model = {"nz": nz, "ngf": cfg.model.ngf, "image_size": size, "channels": channels}
    dims = {"N": None, "C": channels, "H": size, "W": size}
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with backend.standing_statistics():  # model.g_ema_standing_statistics: what sampling uses, exported
            files = writer.write_generator(
                backend.sampling_net, nz, staging, {key: str(value) for key, value in {**model, "step": step}.items()}
            )
        summary = {
            "framework": cfg.backend,
            "step": step,
            "checkpoint": checkpoint,
            **model,
            "input": {"name": "z", "shape": [None, nz], "dtype": "float32",
                      "distribution": "standard normal (pipeline.backends.base.latent_noise)"},
            "output": {"name": "images", "layout": writer.OUTPUT_LAYOUT, "shape": [dims[d] for d in writer.OUTPUT_LAYOUT],
                       "dtype": "float32", "range": [-1.0, 1.0], "to_uint8": TO_UINT8},
            "files": files,
            "standing_statistics": cfg.model.g_ema_standing_statistics if cfg.model.g_ema_decay else 0,
        }  # fmt: skip
        (staging / EXPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(staging, out)  # replaces an empty `out`; refuses one filled meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary

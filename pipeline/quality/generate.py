"""`python -m pipeline.quality.generate`: a checkpoint's generator writes the evaluation samples.

Run by `dcgan evaluate` as a process of the checkpoint's own framework, so the evaluating
process (torch) never imports TensorFlow. Writes uint8 NHWC arrays: images.npy from the
generator that samples (the EMA one when kept), images_without_ema.npy from G when there is one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.backends import loaded_checkpoint
from pipeline.backends.base import latent_noise
from pipeline.loop import EVAL_NOISE_SEED

SAMPLES, SAMPLES_WITHOUT_EMA = "images.npy", "images_without_ema.npy"


def write_samples(checkpoint: Path, num: int, device: str, out: Path) -> None:
    with loaded_checkpoint(str(checkpoint), device) as (backend, cfg, _):
        z = latent_noise(num, cfg.model.nz, EVAL_NOISE_SEED)  # the latents training evaluates with
        np.save(out / SAMPLES, backend.generate(z))
        if cfg.model.g_ema_decay:
            np.save(out / SAMPLES_WITHOUT_EMA, backend.generate(z, averaged=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a verified local checkpoint directory")
    parser.add_argument("--num", type=int, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    write_samples(args.checkpoint, args.num, args.device, args.out)


if __name__ == "__main__":
    main()

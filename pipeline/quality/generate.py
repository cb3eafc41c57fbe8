"""`python -m pipeline.quality.generate`: checkpoints' generators write the evaluation samples.

Run by `dcgan evaluate` as a process of TensorFlow, for every TensorFlow checkpoint asked for, so
the evaluating process (torch) never imports TensorFlow; torch checkpoints sample in that
process through `write_samples`. Writes uint8 NHWC arrays: images.npy from the generator that
samples (the EMA one when kept; images-<r>.npy for further sets from other latents),
images_without_ema.npy from G when there is one and eval.score_raw_generator asks for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.backends import loaded_checkpoint
from pipeline.backends.base import latent_noise
from pipeline.loop import EVAL_NOISE_SEED

SAMPLES, SAMPLES_WITHOUT_EMA = "images.npy", "images_without_ema.npy"


class SampleRequest(NamedTuple):
    checkpoint: Path  # a verified local checkpoint directory
    num: int
    out: Path  # an existing directory
    repeats: int = 1


def repeat_file(repeat: int) -> str:
    """The samples of the repeat-th set (0: the training's latents, SAMPLES)."""
    return SAMPLES if repeat == 0 else f"images-{repeat}.npy"


def latent_seed(repeat: int) -> int:
    """Set 0: the latents training evaluates with; the others, fresh draws."""
    return EVAL_NOISE_SEED - repeat


def write_samples(checkpoint: Path, num: int, device: str, out: Path, repeats: int = 1) -> None:
    with loaded_checkpoint(str(checkpoint), device) as (backend, cfg, _):
        for repeat in range(repeats):
            z = latent_noise(num, cfg.model.nz, latent_seed(repeat))
            np.save(out / repeat_file(repeat), backend.generate(z))
            if repeat == 0 and cfg.model.g_ema_decay and cfg.eval.score_raw_generator:
                np.save(out / SAMPLES_WITHOUT_EMA, backend.generate(z, averaged=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sample", nargs=4, action="append", required=True, metavar=("CHECKPOINT", "NUM", "OUT", "SETS"),
                        help="a verified local checkpoint directory, how many samples, where, how many sets (repeatable)")  # fmt: skip
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    for checkpoint, num, out, repeats in args.sample:
        try:
            write_samples(Path(checkpoint), int(num), args.device, Path(out), int(repeats))
        except Exception as err:  # named for the evaluating process, which shows the last lines
            sys.exit(f"{checkpoint}: its generator could not sample: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()

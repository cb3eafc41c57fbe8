"""What evaluation costs and how noisy its numbers are, on this machine (not CI).

1. Cost per 1,000 generated 32-px images: features (the digits classifier; the standard FID
   InceptionV3 of the `fid` extra), then FID with its bootstrap std and KID, on the CPU (and on
   CUDA when there is one).
2. Noise at the default sample count (eval.num_samples 1,000) of a digits run: eval/fid_std
   (bootstrap over the generated features) against the std over independent sample sets.
3. Standing BatchNorm statistics for G's average: FID with and without, mean ± std over sets.
4. Training throughput of a 2-worker Ray run evaluating every 50 steps, apart (Ray's checkpoint
   validation) against in-line, with the same config and seed.

    .venv/bin/python bench/evaluation.py [--steps 600] [--repeats 5] [--out runs/bench/evaluation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# TensorBoard's reader imports TensorFlow when it is installed; this process runs torch.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


def dcgan(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, check=True, env={**os.environ},
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - started


def cost_per_1k(cfg, devices: list[str]) -> dict[str, Any]:
    from pipeline.data import local_prepared_dir
    from pipeline.quality import metrics
    from pipeline.quality.features import make_extractor

    images = np.random.default_rng(0).integers(0, 256, (1000, 32, 32, 1), dtype=np.uint8)
    out: dict[str, Any] = {}
    for extractor in ("digits", "inception"):
        cfg.eval.extractor = extractor
        for device in devices:
            features = make_extractor(cfg, local_prepared_dir(cfg.data), device)
            features.embed(images[:64])  # warm-up: weights in place, kernels chosen
            started = time.perf_counter()
            fake, _ = features.embed(images)
            embed_s = time.perf_counter() - started
            real, _ = features.embed(images[::-1].copy())
            started = time.perf_counter()
            metrics.frechet_distance(real, fake)
            fid_s = time.perf_counter() - started
            started = time.perf_counter()
            metrics.frechet_distance_std(real, fake, cfg.eval.bootstrap)
            bootstrap_s = time.perf_counter() - started
            started = time.perf_counter()
            metrics.kernel_distance(real, fake, cfg.eval.kid_subset_size)
            kid_s = time.perf_counter() - started
            out[f"{extractor}/{device}"] = {"features_s": round(embed_s, 2), "fid_s": round(fid_s, 2),
                                            "fid_std_s": round(bootstrap_s, 2), "kid_s": round(kid_s, 2),
                                            "dimensions": fake.shape[1]}  # fmt: skip
            print(f"{extractor} on {device}, per 1,000 images: {out[f'{extractor}/{device}']}")
    cfg.eval.extractor = "auto"
    return out


def noise_and_standing(checkpoint: str, repeats: int) -> dict[str, Any]:
    """FID of `repeats` sample sets (set 0: the training's latents), with and without standing
    statistics, and the bootstrap std of set 0."""
    from pipeline import tensorboard as tb
    from pipeline.backends import loaded_checkpoint
    from pipeline.backends.base import latent_noise
    from pipeline.data import local_prepared_dir
    from pipeline.quality.evaluator import Evaluator
    from pipeline.quality.generate import latent_seed

    out: dict[str, Any] = {}
    with loaded_checkpoint(checkpoint, "cpu") as (backend, cfg, step):
        evaluator = Evaluator(cfg, local_prepared_dir(cfg.data))
        for standing in (0, 1000, 10_000):
            cfg.model.g_ema_standing_statistics = standing
            sets = [evaluator.evaluate(backend.generate(latent_noise(cfg.eval.num_samples, cfg.model.nz, latent_seed(r))))
                    for r in range(repeats)]  # fmt: skip
            fids = [s[tb.TAG_EVAL_FID] for s in sets]
            out[f"standing_{standing}"] = {
                "fid_mean": statistics.mean(fids), "fid_std_over_sets": statistics.stdev(fids),
                "fid_std_bootstrap_mean": statistics.mean(s[tb.TAG_EVAL_FID_STD] for s in sets),
                "coverage_mean": statistics.mean(s.get(tb.TAG_EVAL_COVERAGE, float("nan")) for s in sets), "fids": fids,
            }  # fmt: skip
            print(f"step {step}, standing statistics from {standing} latents: {out[f'standing_{standing}']}")
    return out


def ray_throughput(runs: Path, steps: int) -> dict[str, Any]:
    from pipeline import config
    from tests.helpers import read_scalars

    out: dict[str, Any] = {}
    for mode in ("in-line", "apart"):
        name = f"eval-{mode}"
        wall = dcgan("train", "--config", "configs/digits-torch.yaml", "--fresh", "--runner", "ray",
                     "--set", f"run.name={name}", "--set", f"run.dir={runs}", "--set", f"train.steps={steps}",
                     "--set", "eval.every=50", "--set", f"eval.runs={mode}", "--set", "logging.every=10",
                     "--set", "scaling.num_workers=2", "--set", "scaling.cpus_per_worker=1")  # fmt: skip
        cfg = config.load(ROOT / "configs" / "digits-torch.yaml", [f"run.name={name}", f"run.dir={runs}"])
        scalars = read_scalars(cfg.run_dir / "tb")
        rate = scalars["perf/images_per_sec"]
        evaluated = sorted(read_scalars(cfg.run_dir / "tb" / "eval").get("eval/fid", {}))
        out[mode] = {"wall_s": round(wall, 1), "images_per_sec_median": round(statistics.median(rate.values()), 1),
                     "images_per_sec_at_eval_windows": round(statistics.median(v for s, v in rate.items() if s % 50 == 0), 1),
                     "evaluated_steps": evaluated}  # fmt: skip
        print(f"Ray, 2 workers, eval every 50 steps {mode}: {out[mode]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/evaluation.json"))
    args = parser.parse_args()
    import torch

    from pipeline import config
    from pipeline.data import ensure_prepared

    runs = (ROOT / "runs" / "bench-evaluation").resolve()
    cfg = config.load(ROOT / "configs" / "digits-torch.yaml", [f"run.dir={runs}", f"train.steps={args.steps}"])
    ensure_prepared(cfg.data)
    result: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"}
    result["cost_per_1k_images"] = cost_per_1k(cfg, ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    trained = dcgan("train", "--config", "configs/digits-torch.yaml", "--fresh", "--set", f"run.dir={runs}",
                    "--set", f"train.steps={args.steps}", "--set", "eval.every=0")  # fmt: skip
    checkpoint = str(cfg.run_dir / "checkpoints" / f"step-{args.steps:08d}")
    result["digits_run"] = {"steps": args.steps, "train_s": round(trained, 1), "checkpoint": checkpoint}
    result["noise_and_standing_statistics"] = noise_and_standing(checkpoint, args.repeats)
    result["ray_in_line_vs_apart"] = ray_throughput(runs, args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

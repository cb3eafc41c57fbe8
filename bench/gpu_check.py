"""Correctness and speed of the torch backend on one GPU, as a JSON report (bench/gpu_check.sh runs it).

Every check runs the product's own code: the `dcgan train` CLI in fresh processes (determinism
is process-wide), and TorchBackend in two gloo ranks for the data-parallel check.

  dryrun       the dry run at 64 px RGB, global batch 128: the defaults (train.precision auto,
               channels_last, data.device_cache auto) and float32
  exactness    per runtime.deterministic on / off, at the defaults: the largest weight difference
               between two identical 40-step runs, and between a run resumed at step 20 and an
               uninterrupted one
  ddp          2 ranks sharing the GPU over gloo (DDP with CUDA tensors, sync BatchNorm on CUDA):
               replicas identical, and the difference from 1 rank on the same global batch
  fp16         40 float16 steps (train.precision=fp16): weights finite, the final loss scale

The throughput table is bench/throughput.py --preset gpu, which bench/gpu_check.sh runs next.

    python bench/gpu_check.py --out DIR [--device cuda|cpu] [--steps 40]

`--device cpu` runs the same checks on a machine without a GPU (to try the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import config  # noqa: E402
from pipeline.context import RankContext  # noqa: E402
from pipeline.data import EpochSharder, ShardedImages, ensure_prepared  # noqa: E402

WEIGHT_FILES = ("generator.pt", "discriminator.pt")


def _workload(work: Path, device: str) -> dict[str, Any]:
    """The settings of every check (dotted names): 64 px RGB synthetic images, global batch 128."""
    return {
        "data.source": "synthetic", "data.synthetic_count": 1024, "data.image_size": 64, "data.channels": 3,
        "data.prepared_dir": str(work / "prepared"), "train.global_batch_size": 128, "run.dir": str(work / "runs"),
        "runtime.runner": "local", "runtime.device": device, "logging.samples_every": 1000,
    }  # fmt: skip


def _common(work: Path, device: str) -> list[str]:
    return [arg for key, value in _workload(work, device).items() for arg in ("--set", f"{key}={value}")]


def _dcgan(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"dcgan {' '.join(args[:1])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def check_dryrun(work: Path, device: str, steps: int, precision: str) -> dict[str, Any]:
    name = f"dry-{precision}"
    _dcgan("train", "--config", "configs/dryrun.yaml", "--dry-run", "--dry-run-steps", str(steps),
           *_common(work, device), "--set", f"run.name={name}", "--set", f"train.precision={precision}")  # fmt: skip
    report = json.loads((work / "runs" / f"{name}-dryrun" / "dryrun-report.json").read_text())
    backend = report["backend"]
    return {
        "device": backend.get("device_name", backend["device"]),
        "framework": backend["framework"],
        "precision": backend.get("precision"),
        "data_feed": backend.get("data_feed"),
        "step_ms": round(report["step_ms"], 2),
        "images_per_sec": round(report["images_per_sec"]),
        "peak_device_memory_mib": round(backend.get("peak_device_memory_bytes", 0) / 2**20, 1),
        "tensors_reloaded_identical": report["tensors_checked"],
    }


def _final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    checkpoint = run_dir / "checkpoints" / f"step-{step:08d}"
    weights = {}
    for filename in WEIGHT_FILES:
        for key, tensor in torch.load(checkpoint / filename, map_location="cpu", weights_only=True).items():
            if tensor.is_floating_point():
                weights[f"{filename}:{key}"] = tensor
    return weights


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def check_exactness(work: Path, device: str, steps: int, deterministic: bool) -> dict[str, Any]:
    flag = str(deterministic).lower()

    def train(name: str, until: int) -> None:
        _dcgan("train", "--config", "configs/dryrun.yaml", *_common(work, device), "--set", f"run.name={name}",
               "--set", f"train.steps={until}", "--set", f"checkpoint.every={steps // 2}",
               "--set", f"logging.every={steps // 2}", "--set", f"runtime.deterministic={flag}")  # fmt: skip

    tag = "det" if deterministic else "nondet"
    started = time.perf_counter()
    for name in (f"{tag}-a", f"{tag}-b"):
        train(name, steps)
    train(f"{tag}-resumed", steps // 2)
    train(f"{tag}-resumed", steps)  # the same run again: resumes at steps // 2
    runs = work / "runs"
    uninterrupted = _final_weights(runs / f"{tag}-a", steps)
    return {
        "steps": steps,
        "max_weight_difference_rerun": _max_difference(uninterrupted, _final_weights(runs / f"{tag}-b", steps)),
        "max_weight_difference_resume": _max_difference(uninterrupted, _final_weights(runs / f"{tag}-resumed", steps)),
        "wall_s_4_processes": round(time.perf_counter() - started, 1),
    }


def _ddp_rank(rank: int, world_size: int, port: int, cfg_dict: dict, steps: int, out: str) -> None:
    import torch.distributed as dist

    from pipeline.backends.torch_backend import TorchBackend

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cfg = config.validate(cfg_dict)
        backend = TorchBackend(cfg, RankContext(rank, rank, world_size))
        images = ShardedImages(Path(cfg.data.prepared_dir))
        sharder = EpochSharder(len(images), cfg.train.global_batch_size, cfg.train.seed, rank, world_size)
        batches = backend.batches(images, sharder)
        for step in range(1, steps + 1):
            backend.train_step(next(batches), step)
        backend.synchronize_replicas()  # raises ReplicaMismatchError if any tensor differs between ranks
        if rank == 0:
            torch.save({k: v.cpu() for k, v in backend.netG.state_dict().items()}, Path(out) / "ddp-generator.pt")
            Path(out, "ddp.json").write_text(json.dumps(
                {"device": str(backend.device), "batchnorm": type(backend.netD.main[3]).__name__}))  # fmt: skip
        backend.close()
    finally:
        dist.destroy_process_group()


def check_ddp(work: Path, device: str, steps: int) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    from pipeline.backends.torch_backend import TorchBackend

    raw: dict[str, Any] = {}
    for key, value in {**_workload(work, device), "model.sync_batchnorm": True}.items():
        config.apply_override(raw, key.split("."), value)
    cfg = config.validate(raw)
    ensure_prepared(cfg.data)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.perf_counter()
    mp.spawn(_ddp_rank, args=(2, port, cfg.to_dict(), steps, str(work)), nprocs=2, join=True)
    wall = time.perf_counter() - started
    # The same global batches on one rank, in this process.
    single = TorchBackend(cfg, RankContext())
    images = ShardedImages(Path(cfg.data.prepared_dir))
    batches = single.batches(images, EpochSharder(len(images), cfg.train.global_batch_size, cfg.train.seed))
    for step in range(1, steps + 1):
        single.train_step(next(batches), step)
    two = torch.load(work / "ddp-generator.pt", weights_only=True)
    one = {k: v.cpu() for k, v in single.netG.state_dict().items()}
    seen = json.loads((work / "ddp.json").read_text())
    return {
        "ranks": 2, "backend": "gloo", "steps": steps, "rank_device": seen["device"],
        "discriminator_batchnorm": seen["batchnorm"], "replicas_identical": True,
        "max_generator_difference_vs_1_rank": _max_difference(
            {k: v for k, v in two.items() if v.is_floating_point()}, {k: v for k, v in one.items() if v.is_floating_point()}
        ),
        "wall_s": round(wall, 1),
    }  # fmt: skip


def check_fp16(work: Path, device: str, steps: int) -> dict[str, Any]:
    _dcgan("train", "--config", "configs/dryrun.yaml", *_common(work, device), "--set", "run.name=fp16",
           "--set", f"train.steps={steps}", "--set", f"checkpoint.every={steps}", "--set", "train.precision=fp16",
           "--set", f"logging.every={steps // 4}")  # fmt: skip
    checkpoint = work / "runs" / "fp16" / "checkpoints" / f"step-{steps:08d}"
    scaler = torch.load(checkpoint / "optimizers.pt", map_location="cpu", weights_only=True)["scaler"]
    finite = all(bool(torch.isfinite(v).all()) for v in _final_weights(work / "runs" / "fp16", steps).values())
    return {"steps": steps, "weights_finite": finite, "final_loss_scale": float(scaler["scale"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu to try the script", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "checks": {},
    }
    checks = {
        "dryrun_auto": lambda work: check_dryrun(work, args.device, args.steps, "auto"),
        "dryrun_fp32": lambda work: check_dryrun(work, args.device, args.steps, "fp32"),
        "exactness_deterministic": lambda work: check_exactness(work, args.device, args.steps, True),
        "exactness_not_deterministic": lambda work: check_exactness(work, args.device, args.steps, False),
        "ddp_2_ranks_gloo": lambda work: check_ddp(work, args.device, max(2, args.steps // 4)),
        "fp16_training": lambda work: check_fp16(work, args.device, args.steps),
    }
    if args.device == "cpu":  # float16 kernels on a CPU take minutes per step: nothing to learn there
        checks["fp16_training"] = lambda work: {"skipped": "float16 autocast is measured on CUDA only"}
    with tempfile.TemporaryDirectory(prefix="dcgan-gpu-check-") as scratch:
        for name, check in checks.items():
            started = time.perf_counter()
            try:
                result = check(Path(scratch))
            except Exception as err:  # one failing check must not hide the others' numbers
                result = {"error": f"{type(err).__name__}: {err}"[-2000:]}
            result["check_s"] = round(time.perf_counter() - started, 1)
            report["checks"][name] = result
            print(f"{name}: {json.dumps(result)}", flush=True)
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any("error" in r for r in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput: this pipeline against the canonical PyTorch DCGAN example, on one machine, in one run.

Every row trains the DCGAN (nz 100, ngf = ndf = 64) on the same folder of CelebA-sized JPEGs
(178x218, made here), RGB, for a few steps, in a fresh process, and reports images/s:

  baseline  what the canonical example (pytorch/examples dcgan/main.py) does per step: an
            ImageFolder + DataLoader that decodes and resizes every JPEG every epoch, a D with
            a Sigmoid and BCELoss, D's weight gradients computed in G's phase too, and its host
            syncs (.item() of D(x), D(G(z)) and both losses for its log line)
  bare      the G and D updates alone, on random tensors already on the device: no data, no
            logging; the ceiling of an eager step at that precision and layout
  ours      `dcgan train --dry-run` with the setting shown (--set ...): the product's own
            step, data feed and runner; local, Ray with 1 or 2 workers, or horovodrun

Rounds interleave every row, and each row reports its median: the machine's speed drifts
from minute to minute, so only ratios measured side by side mean anything. Each row also
reports its achieved model FLOP/s, against the best rate of a large matmul measured here
(once per round).

    .venv/bin/python bench/throughput.py                      # the CPU targets (about 15 minutes on 2 cores)
    .venv/bin/python bench/throughput.py --preset gpu        # every setting at 64 px (bench/gpu_check.sh)
    .venv/bin/python bench/throughput.py --preset full       # both backends, 32 and 64 px, batch 64/128/512
    .venv/bin/python bench/throughput.py --preset strategies # DDP against Horovod, 2 ranks (about 5 minutes)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NZ, WIDTH = 100, 64  # the canonical example's defaults (nz, ngf = ndf)


@dataclass(frozen=True)
class Case:
    kind: str  # baseline | bare | ours
    size: int
    batch: int
    backend: str = "torch"
    runner: str = "local"  # local | ray | horovodrun (ours)
    workers: int = 1
    threads: int = 0  # torch threads per worker; 0 = every core (local) or cores / workers (Ray)
    settings: tuple[tuple[str, Any], ...] = ()  # ours: --set overrides; bare: precision, channels_last
    loader_workers: int = 2  # baseline: the example's --workers

    @property
    def label(self) -> str:
        if self.kind == "baseline":
            return f"canonical example, {self.loader_workers} loader workers"
        shown = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.settings) or "defaults"
        if self.kind == "bare":
            return f"bare step ({shown})"
        threads = f"{self.threads} thr" if self.threads else "all cores"
        where = {"local": f"local, {threads}", "ray": f"Ray {self.workers} worker(s) x {threads}",
                 "horovodrun": f"horovodrun {self.workers} process(es) x {threads}"}[self.runner]  # fmt: skip
        return f"{self.backend} {where} ({shown})"


@dataclass
class Row:
    case: Case
    samples: list[float] = field(default_factory=list)  # images/s of each round
    error: Optional[str] = None

    @property
    def images_per_sec(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")


# --- the cases ----------------------------------------------------------------------------


def cpu_cases(cores: int) -> list[Case]:
    """The CPU targets (64 px, batch 64) and the 32 px rows, at the defaults that auto resolves."""
    cases = []
    for size in (64, 32):
        cases += [Case("baseline", size, 64), Case("ours", size, 64), Case("ours", size, 64, "tensorflow")]
    cases += [
        Case("bare", 64, 64),
        Case("ours", 64, 64, settings=(("train.channels_last", False),)),  # the previous default layout
        Case("ours", 64, 64, settings=(("train.compile", True),)),
        Case("ours", 64, 64, "tensorflow", settings=(("train.compile", True),)),
        Case("ours", 64, 64, runner="ray", workers=1, threads=cores),
        Case("ours", 64, 64, threads=1),
        Case("ours", 64, 64, runner="ray", workers=1, threads=1),
        Case("ours", 64, 64, runner="ray", workers=2, threads=1),
    ]
    return cases


def gpu_cases() -> list[Case]:
    """Every torch setting at 64 px on one GPU (no Ray, no TensorFlow on our GPU machine)."""
    cases = [Case("baseline", 64, 64), Case("baseline", 64, 128, loader_workers=8)]
    cases += [Case("bare", 64, b, settings=(("precision", "bf16"), ("channels_last", True))) for b in (128, 512)]
    cases += [Case("ours", 64, b) for b in (64, 128, 512)]  # auto: bf16 + channels_last + the device cache
    for batch in (128, 512):
        cases += [
            Case("ours", 64, batch, settings=(("train.precision", "fp32"),)),
            Case("ours", 64, batch, settings=(("train.compile", True),)),
        ]
    cases += [
        Case("ours", 64, 512, settings=(("train.precision", "fp16"),)),
        Case("ours", 64, 512, settings=(("train.channels_last", False),)),
        Case("ours", 64, 512, settings=(("data.device_cache", False),)),
        Case("ours", 64, 512, settings=(("train.precision", "fp32"), ("train.channels_last", False))),
    ]
    return cases


def strategy_cases() -> list[Case]:
    """DDP against Horovod, 2 ranks x 1 thread at 64 px, batch 64: on Ray (TorchTrainer against
    HorovodTrainer) and under horovodrun."""
    horovod = (("distributed.strategy", "horovod"),)
    return [
        Case("ours", 64, 64, runner="ray", workers=2, threads=1),
        Case("ours", 64, 64, runner="ray", workers=2, threads=1, settings=horovod),
        Case("ours", 64, 64, runner="horovodrun", workers=2, threads=1, settings=horovod),
    ]


def full_cases(cores: int) -> list[Case]:
    cases = []
    for size, batch in itertools.product((32, 64), (64, 128, 512)):
        cases.append(Case("baseline", size, batch))
        for backend in ("torch", "tensorflow"):
            for precision, compiled in itertools.product(("fp32", "bf16"), (False, True)):
                settings = (("train.precision", precision), ("train.compile", compiled))
                cases.append(Case("ours", size, batch, backend, settings=settings))
            for workers in (1, 2):
                cases.append(Case("ours", size, batch, backend, runner="ray", workers=workers, threads=cores // workers))
    return cases


# --- FLOPs ---------------------------------------------------------------------------------


def training_flops_per_image(size: int, channels: int = 3) -> dict[str, float]:
    """Multiply-adds of one forward pass of G and of D, counted from each convolution's shapes,
    and the FLOPs (2 per multiply-add) of one training step per image.

    A step runs G forward once and D forward three times (real, fake for D's update, fake for
    G's). Backward costs twice the forward where weight and input gradients are both needed:
    D's update back-propagates through D twice (real, fake), G's update through D for input
    gradients only (D's weights are frozen there), then through G. So 3 G + 8 D multiply-adds
    per image; the canonical example also computes D's weight gradients in G's phase (9 D)."""
    import torch

    from pipeline.backends.torch_backend.models import build_models

    netG, netD = build_models(NZ, WIDTH, WIDTH, channels, size, seed=0)
    macs = {"G": 0, "D": 0}

    def counter(name):
        def hook(module, inputs, output):
            if isinstance(module, torch.nn.ConvTranspose2d):  # each input pixel scatters a kernel
                macs[name] += inputs[0][0].numel() * module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            else:  # each output pixel gathers a kernel
                macs[name] += output[0].numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]

        return hook

    for name, net in (("G", netG), ("D", netD)):
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                module.register_forward_hook(counter(name))
    with torch.no_grad():
        netD(netG(torch.zeros(1, NZ, 1, 1)))
    return {"g_forward_macs": macs["G"], "d_forward_macs": macs["D"], "step_flops": 2 * (3 * macs["G"] + 8 * macs["D"])}


def matmul_rate(device: str, dtype_name: str) -> float:
    """FLOP/s of a large square matmul: what this device's math units deliver."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    repeats = 20 if device == "cuda" else 5
    for _ in range(2):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# --- one measurement per process ------------------------------------------------------------


def measure_baseline(case: Case, images_root: Path, device: str, steps: int) -> float:
    """The canonical example's loop (pytorch/examples dcgan/main.py), its models being ours plus
    D's Sigmoid; warm-up steps first, then `steps` timed ones, epochs restarting as they come."""
    import torch
    import torchvision.datasets as dset
    import torchvision.transforms as transforms
    from torch import nn

    from pipeline.backends.torch_backend.models import build_models

    torch.backends.cudnn.benchmark = True  # as the example sets it
    netG, netD_logits = build_models(NZ, WIDTH, WIDTH, 3, case.size, seed=0)
    netG, netD = netG.to(device), nn.Sequential(netD_logits, nn.Sigmoid()).to(device)
    criterion = nn.BCELoss()
    optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    dataset = dset.ImageFolder(
        root=str(images_root),
        transform=transforms.Compose([
            transforms.Resize(case.size), transforms.CenterCrop(case.size), transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]),
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_size=case.batch, shuffle=True, num_workers=case.loader_workers)
    log_lines = []

    def step(data) -> None:
        netD.zero_grad()
        real_cpu = data[0].to(device)
        batch_size = real_cpu.size(0)
        label = torch.full((batch_size,), 1.0, dtype=real_cpu.dtype, device=device)
        output = netD(real_cpu)
        errD_real = criterion(output, label)
        errD_real.backward()
        D_x = output.mean().item()
        fake = netG(torch.randn(batch_size, NZ, 1, 1, device=device))
        label.fill_(0.0)
        output = netD(fake.detach())
        errD_fake = criterion(output, label)
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        errD = errD_real + errD_fake
        optD.step()
        netG.zero_grad()
        label.fill_(1.0)
        output = netD(fake)
        errG = criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        optG.step()
        log_lines.append(f"Loss_D: {errD.item():.4f} Loss_G: {errG.item():.4f} D(x): {D_x:.4f} D(G(z)): {D_G_z1:.4f} / {D_G_z2:.4f}")

    batches = (data for _ in itertools.count() for data in loader)  # epoch after epoch, as its loop runs
    warmup, timed = _split(steps)
    for _ in range(warmup):
        step(next(batches))
    _sync(device)
    started = time.perf_counter()
    for _ in range(timed):
        step(next(batches))
    _sync(device)
    return timed * case.batch / (time.perf_counter() - started)


def _split(steps: int) -> tuple[int, int]:
    """(warm-up, timed) steps: the first third warms up, as the dry run's first log window does."""
    warmup = max(1, steps // 3)
    return warmup, max(1, steps - warmup)


def measure_bare(case: Case, device: str, steps: int) -> float:
    """Our models' G and D updates on random tensors already on the device, eager."""
    import torch
    from torch import nn

    from pipeline.backends.torch_backend.models import build_models

    settings = dict(case.settings)
    torch.backends.cudnn.benchmark = True
    layout = torch.channels_last if settings.get("channels_last", True) else torch.contiguous_format
    netG, netD = build_models(NZ, WIDTH, WIDTH, 3, case.size, seed=0)
    netG.to(device, memory_format=layout)
    netD.to(device, memory_format=layout)
    precision = settings.get("precision", "fp32")
    autocast = torch.autocast(device, dtype={"bf16": torch.bfloat16}.get(precision), enabled=precision != "fp32")
    fused = device == "cuda"
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=fused)
    optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=fused)
    bce = nn.BCEWithLogitsLoss()
    real = torch.rand(case.batch, 3, case.size, case.size, device=device).mul(2).sub(1).contiguous(memory_format=layout)
    ones, zeros = torch.ones(case.batch, device=device), torch.zeros(case.batch, device=device)

    def step() -> None:
        with autocast:
            fake = netG(torch.randn(case.batch, NZ, 1, 1, device=device))
            loss_d = bce(netD(real), ones) + bce(netD(fake.detach()), zeros)
        optD.zero_grad(set_to_none=True)
        loss_d.backward()
        optD.step()
        netD.requires_grad_(False)
        with autocast:
            loss_g = bce(netD(fake), ones)
        optG.zero_grad(set_to_none=True)
        loss_g.backward()
        optG.step()
        netD.requires_grad_(True)

    warmup, timed = _split(steps)
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(timed):
        step()
    _sync(device)
    return timed * case.batch / (time.perf_counter() - started)


def _child(spec: dict[str, Any]) -> None:
    import torch

    case = Case(**{**spec["case"], "settings": tuple(tuple(s) for s in spec["case"]["settings"])})
    if case.threads:
        torch.set_num_threads(case.threads)
    if case.kind == "baseline":
        rate = measure_baseline(case, Path(spec["images"]), spec["device"], spec["steps"])
    else:
        rate = measure_bare(case, spec["device"], spec["steps"])
    print(json.dumps({"images_per_sec": rate}))


# --- the parent: data, rounds, table ----------------------------------------------------------


def make_jpeg_folder(root: Path, count: int) -> Path:
    """CelebA-sized JPEGs of synthetic pictures, in the one class folder ImageFolder wants."""
    from pipeline.data.sources import synthetic_image

    folder = root / "images" / "all"
    folder.mkdir(parents=True)
    for index in range(count):
        synthetic_image(index, 64).resize((178, 218)).save(folder / f"{index:06d}.jpg", quality=90)
    return root / "images"


def _dcgan(*args: str, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _config(work: Path, images: Path, case: Case, device: str) -> list[str]:
    settings = {
        "data.source": "folder", "data.root": str(images), "data.image_size": case.size, "data.channels": 3,
        "data.prepared_dir": str(work / f"prepared-{case.size}"), "model.nz": NZ, "model.ngf": WIDTH, "model.ndf": WIDTH,
        "train.global_batch_size": case.batch, "run.dir": str(work / "runs"), "run.name": "bench",
        "backend": case.backend, "runtime.runner": case.runner, "runtime.device": device,
        "scaling.num_workers": case.workers, "logging.samples_every": 10**6,
    }  # fmt: skip
    if case.runner == "ray":
        settings["scaling.cpus_per_worker"] = case.threads or 1
        settings["scaling.use_gpu"] = device == "cuda"
    settings.update(dict(case.settings))
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value) if isinstance(value, bool) else value}")]


def measure(case: Case, work: Path, images: Path, device: str, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if case.threads and case.runner == "local":
        env.update(OMP_NUM_THREADS=str(case.threads), TF_NUM_INTRAOP_THREADS=str(case.threads))
    if case.kind == "ours":
        train = ["--dry-run", "--dry-run-steps", str(steps), *_config(work, images, case, device)]
        if case.runner == "horovodrun":
            env["OMP_NUM_THREADS"] = str(case.threads or 1)
            launcher = ["bash", str(ROOT / "launch/horovod.sh"), "configs/dryrun.yaml", "-np", str(case.workers), "--"]
            done = subprocess.run([*launcher, *train], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        else:
            done = _dcgan("train", "--config", "configs/dryrun.yaml", *train, timeout=900, env=env)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        report = json.loads((work / "runs" / "bench-dryrun" / "dryrun-report.json").read_text())
        return float(report["images_per_sec"])
    spec = {"case": asdict(case), "images": str(images), "device": device, "steps": steps}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["images_per_sec"])


def _ratio(rows: list[Row], case: Case, reference: Case) -> Optional[float]:
    by_case = {row.case: row for row in rows}
    if case not in by_case or reference not in by_case or not by_case[reference].samples:
        return None
    return by_case[case].images_per_sec / by_case[reference].images_per_sec


def targets(rows: list[Row], preset: str) -> list[dict[str, Any]]:
    """The issue's targets that this run's rows can decide."""
    if preset == "gpu":
        checks = [
            ("torch batch 128 / canonical example batch 128 (8 workers)", Case("ours", 64, 128),
             Case("baseline", 64, 128, loader_workers=8), 8.0),
            ("torch batch 512 / eager bf16 + channels_last bare step", Case("ours", 64, 512),
             Case("bare", 64, 512, settings=(("precision", "bf16"), ("channels_last", True))), 1.2),
        ]  # fmt: skip
    elif preset == "strategies":  # our own bar: the strategy should not cost throughput
        horovod = (("distributed.strategy", "horovod"),)
        ddp_on_ray = Case("ours", 64, 64, runner="ray", workers=2, threads=1)
        checks = [
            ("Horovod / DDP, both on Ray (2 x 1 thread)", Case("ours", 64, 64, runner="ray", workers=2, threads=1,
             settings=horovod), ddp_on_ray, 0.95),
            ("Horovod under horovodrun / DDP on Ray", Case("ours", 64, 64, runner="horovodrun", workers=2, threads=1,
             settings=horovod), ddp_on_ray, 0.95),
        ]  # fmt: skip
    else:
        checks = [
            ("torch / canonical example (64 px, batch 64)", Case("ours", 64, 64), Case("baseline", 64, 64), 2.0),
            ("tensorflow / canonical example", Case("ours", 64, 64, "tensorflow"), Case("baseline", 64, 64), 1.5),
            ("Ray 1 worker / local runner, all cores", Case("ours", 64, 64, runner="ray", workers=1, threads=os.cpu_count()),
             Case("ours", 64, 64), 0.95),
            ("Ray 1 worker / local runner, 1 thread each", Case("ours", 64, 64, runner="ray", workers=1, threads=1),
             Case("ours", 64, 64, threads=1), 0.95),
            ("Ray 2 workers x 1 thread / 1 worker x 1 thread", Case("ours", 64, 64, runner="ray", workers=2, threads=1),
             Case("ours", 64, 64, runner="ray", workers=1, threads=1), 1.7),
        ]  # fmt: skip
    found = []
    for name, case, reference, wanted in checks:
        ratio = _ratio(rows, case, reference)
        if ratio is not None:
            found.append({"target": name, "ratio": round(ratio, 3), "wanted": wanted, "met": ratio >= wanted})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["cpu", "gpu", "full", "strategies"], default=None,
                        help="default: gpu on CUDA, else cpu; strategies: DDP against Horovod (CPU)")  # fmt: skip
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--steps", type=int, default=None, help="training steps per row, the first third warm-up (default 9 on CPU, 30 on a GPU)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2 on CPU, 1 on a GPU)")
    parser.add_argument("--images", type=int, default=2048, help="JPEGs in the folder every row reads")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="only these image sizes")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting rows after this many seconds")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/throughput.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(json.loads(args.child))

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("gpu" if device == "cuda" else "cpu")
    steps = args.steps or (30 if device == "cuda" else 9)
    rounds = args.rounds or (1 if device == "cuda" else 2)
    cores = os.cpu_count() or 1
    presets = {"cpu": lambda: cpu_cases(cores), "gpu": gpu_cases, "full": lambda: full_cases(cores), "strategies": strategy_cases}
    cases = presets[preset]()
    if args.sizes:
        cases = [c for c in cases if c.size in args.sizes]
    if not _has("ray"):
        cases = [c for c in cases if c.runner != "ray"]
    if not _has("horovod"):
        cases = [c for c in cases if dict(c.settings).get("distributed.strategy") != "horovod"]
    if not _has("tensorflow"):
        cases = [c for c in cases if c.backend != "tensorflow"]
    from pipeline.precision import cpu_has_native_bf16

    native_bf16 = torch.cuda.is_bf16_supported(False) if device == "cuda" else cpu_has_native_bf16()
    precisions = ["fp32"] + (["bf16"] if native_bf16 else [])
    machine = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_cores": cores, "torch": torch.__version__, "preset": preset, "steps": steps, "rounds": rounds,
        "matmul_flops_per_sec": {p: matmul_rate(device, p) for p in precisions},
        "training_flops_per_image": {size: training_flops_per_image(size) for size in sorted({c.size for c in cases})},
    }  # fmt: skip
    rows = [Row(case) for case in cases]
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    started = time.perf_counter()
    try:
        images = make_jpeg_folder(work, args.images)
        for round_index in range(rounds):
            for name, rate in machine["matmul_flops_per_sec"].items():  # the best seen: the machine's capacity
                machine["matmul_flops_per_sec"][name] = max(rate, matmul_rate(device, name))
            if device == "cpu":  # what one core gives: the ceiling of any scaling from 1 to all cores
                torch.set_num_threads(1)
                machine["matmul_fp32_one_thread"] = max(machine.get("matmul_fp32_one_thread", 0), matmul_rate(device, "fp32"))
                torch.set_num_threads(cores)
            for row in rows:
                if row.error or (args.budget_s and time.perf_counter() - started > args.budget_s):
                    continue
                try:
                    row.samples.append(measure(row.case, work, images, device, steps))
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    row.error = str(err)[-300:]
                report(rows, machine, targets(rows, preset), args.out, table=False)  # what a timeout would lose
                print(f"round {round_index + 1}/{rounds}  {row.case.size:>3} px  batch {row.case.batch:>3}  "
                      f"{row.case.label:<58} {row.samples[-1] if row.samples else float('nan'):>9.1f} images/s"
                      + (f"  FAILED: {row.error}" if row.error else ""), flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, machine, targets(rows, preset), args.out)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def report(rows: list[Row], machine: dict[str, Any], found: list[dict[str, Any]], out: Path, table: bool = True) -> None:
    """Write the JSON; print the table too when `table`."""
    peak = max(machine["matmul_flops_per_sec"].values())
    results, lines = [], []
    lines.append(f"\n{machine['device']}: matmul " + ", ".join(f"{p} {r / 1e12:.2f} TFLOP/s" for p, r in machine["matmul_flops_per_sec"].items()))
    lines.append(f"{'px':>3} {'batch':>5}  {'run':<58}{'images/s':>10}{'x base':>8}{'TFLOP/s':>9}{'of mm':>7}")
    for row in rows:
        bases = [r.case for r in rows if r.case.kind == "baseline" and (r.case.size, r.case.batch) == (row.case.size, row.case.batch)]
        ratio = _ratio(rows, row.case, bases[0]) if bases else None  # against the canonical example at that size and batch
        flops = machine["training_flops_per_image"][row.case.size]["step_flops"] * row.images_per_sec
        results.append({**asdict(row.case), "label": row.case.label, "images_per_sec": round(row.images_per_sec, 1),
                        "samples": [round(s, 1) for s in row.samples], "over_baseline": ratio and round(ratio, 3),
                        "model_flops_per_sec": flops, "of_matmul_rate": flops / peak, "error": row.error})  # fmt: skip
        lines.append(f"{row.case.size:>3} {row.case.batch:>5}  {row.case.label:<58}{row.images_per_sec:>10.1f}"
                     f"{(f'{ratio:.2f}x' if ratio else '-'):>8}{flops / 1e12:>9.3f}{flops / peak:>7.0%}")  # fmt: skip
    if "matmul_fp32_one_thread" in machine:
        scaling = machine["matmul_flops_per_sec"]["fp32"] / machine["matmul_fp32_one_thread"]
        lines.append(f"matmul on {machine['cpu_cores']} cores / on 1 core: {scaling:.2f}x (the ceiling of any scaling here)")
    for target in found:
        lines.append(f"target {target['target']}: {target['ratio']}x (wanted >= {target['wanted']}x): "
                     + ("met" if target["met"] else "NOT met"))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": results, "targets": found}, indent=2) + "\n")
    if table:
        print("\n".join(lines) + f"\nwrote {out}")


if __name__ == "__main__":
    main()

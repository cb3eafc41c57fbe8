"""Input pipeline: prepared uint8 shards (ours) against decoding every image every step.

The baseline is the canonical PyTorch DCGAN example's input path: torchvision ImageFolder with
Resize / CenterCrop / ToTensor / Normalize, batched by a DataLoader. Both run in this process,
on the same JPEG folder (CelebA-sized 178x218 pictures made here), at 64 px RGB, so the ratio
compares the two designs on one machine in one run.

    .venv/bin/python bench/feed.py [--images 1024] [--batches 40] [--workers 0] [--out runs/bench/feed.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torchvision.datasets as dset
import torchvision.transforms as transforms

from pipeline import config
from pipeline.backends.torch_backend.feed import to_device
from pipeline.data import EpochSharder, ShardedImages, prepare
from pipeline.data.sources import synthetic_image

SIZE, BATCH = 64, 64


def make_jpeg_folder(root: Path, count: int) -> None:
    folder = root / "images" / "all"  # ImageFolder wants one sub-folder per class
    folder.mkdir(parents=True)
    for index in range(count):
        synthetic_image(index, 64).resize((178, 218)).save(folder / f"{index:06d}.jpg", quality=90)


def baseline_images_per_sec(root: Path, batches: int, workers: int) -> float:
    dataset = dset.ImageFolder(
        root=str(root / "images"),
        transform=transforms.Compose([
            transforms.Resize(SIZE), transforms.CenterCrop(SIZE), transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]),
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True)
    return _time_batches((images for epoch in iter(int, 1) for images, _ in loader), batches)


def shards_images_per_sec(root: Path, batches: int) -> tuple[float, float]:
    cfg = config.validate({"data": {"source": "folder", "root": str(root / "images"), "image_size": SIZE,
                                    "channels": 3, "prepared_dir": str(root / "prepared")}})  # fmt: skip
    started = time.perf_counter()
    prepare(cfg.data)
    prepare_seconds = time.perf_counter() - started
    images = ShardedImages(root / "prepared")
    sharder = EpochSharder(len(images), BATCH, seed=0)
    device = torch.device("cpu")
    return _time_batches((to_device(images.gather(i), device) for i in sharder), batches), prepare_seconds


def _time_batches(batches, count: int) -> float:
    next(batches)  # warm-up: first file opens, worker start-up
    started = time.perf_counter()
    for _ in range(count):
        batch = next(batches)
        assert batch.shape == (BATCH, 3, SIZE, SIZE)
    return count * BATCH / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the baseline")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/feed.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpeg_folder(root, args.images)
        baseline = baseline_images_per_sec(root, args.batches, args.workers)
        ours, prepare_seconds = shards_images_per_sec(root, args.batches)
    result = {
        "images": args.images, "batch": BATCH, "size": SIZE, "threads": torch.get_num_threads(),
        "baseline_workers": args.workers, "decode_every_step_images_per_sec": round(baseline, 1),
        "prepared_shards_images_per_sec": round(ours, 1), "ratio": round(ours / baseline, 2),
        "prepare_seconds_once": round(prepare_seconds, 2),
    }  # fmt: skip
    print(f"{'input path':<40}{'images/s':>12}")
    print(f"{'decode every step (ImageFolder)':<40}{baseline:>12,.0f}")
    print(f"{'prepared uint8 shards (memory map)':<40}{ours:>12,.0f}")
    print(f"ratio {result['ratio']}x; one-time prepare of {args.images} JPEGs: {prepare_seconds:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

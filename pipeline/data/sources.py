"""Image sources: each yields (name, uint8 HWC array) or (name, reason it was skipped).

`folder` decodes files (in worker processes when there are many); `digits` and `synthetic`
are built in and offline; `mnist`, `cifar10` and `lsun` use torchvision's readers on files
that are already present (they download only when `data.download` is set).
"""

from __future__ import annotations

import multiprocessing
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import DataSection
from pipeline.context import available_cpus
from pipeline.data.images import IMAGE_SUFFIXES, decode_file, describe_error, to_uint8

Item = tuple[str, Union[np.ndarray, str]]  # (name, image) or (name, skip reason)

# Below this many files, starting decode processes costs more than it saves.
_MIN_FILES_FOR_POOL = 64


class DataError(RuntimeError):
    """The data cannot be used as configured (nothing readable, missing files, stale shards)."""


def describe(cfg: DataSection) -> dict:
    """What the shards are made from; a prepared directory is reused only when this matches."""
    info: dict = {"source": cfg.source, "image_size": cfg.image_size, "channels": cfg.channels}
    if cfg.root is not None and cfg.source not in ("digits", "synthetic"):
        info["root"] = str(Path(cfg.root).resolve())
    if cfg.max_images is not None:
        info["max_images"] = cfg.max_images
    if cfg.source == "synthetic":
        info["synthetic_count"] = cfg.synthetic_count
    if cfg.source == "lsun":
        info["lsun_classes"] = list(cfg.lsun_classes)
    return info


def iterate(cfg: DataSection) -> Iterator[Item]:
    readers = {
        "folder": _folder,
        "digits": _digits,
        "synthetic": _synthetic,
        "mnist": _torchvision,
        "cifar10": _torchvision,
        "lsun": _torchvision,
    }
    yield from readers[cfg.source](cfg)


# --- folder -----------------------------------------------------------------------------------


def list_image_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a directory")
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files)


def _decode_or_reason(path: Path, image_size: int, channels: int) -> Union[np.ndarray, str]:
    try:
        return decode_file(path, image_size, channels)
    except Exception as err:  # any decoder failure is a skipped file, reported by path
        return describe_error(err)


def _folder(cfg: DataSection) -> Iterator[Item]:
    root = Path(cfg.root)
    files = list_image_files(root)
    if not files:
        raise DataError(f"data.root {str(root)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    decode = partial(_decode_or_reason, image_size=cfg.image_size, channels=cfg.channels)
    workers = cfg.prepare_workers or available_cpus()
    names = (str(path.relative_to(root)) for path in files)
    if workers == 1 or len(files) < _MIN_FILES_FOR_POOL:
        yield from zip(names, map(decode, files))
        return
    # spawn, not fork: the parent may already hold framework threads that fork would break.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from zip(names, pool.imap(decode, files, chunksize=32))


# --- built-in ---------------------------------------------------------------------------------


def _digits(cfg: DataSection) -> Iterator[Item]:
    from sklearn.datasets import load_digits  # 1,797 real 8x8 handwritten digits, shipped with sklearn

    images = load_digits().images  # float 0..16
    for index, digit in enumerate(images):
        pixels = np.round(digit * (255.0 / 16.0)).astype(np.uint8)
        yield f"digits[{index}]", to_uint8(Image.fromarray(pixels, mode="L"), cfg.image_size, cfg.channels)


def synthetic_image(index: int, image_size: int) -> Image.Image:
    """A deterministic picture of 1-3 coloured shapes; drawn at 4x and downsampled by to_uint8."""
    rng = np.random.default_rng([index, 7])
    canvas = image_size * 4
    img = Image.new("RGB", (canvas, canvas), tuple(int(c) for c in rng.integers(0, 96, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = rng.integers(0, canvas * 3 // 4, 2)
        w, h = rng.integers(canvas // 6, canvas // 2, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        colour = tuple(int(c) for c in rng.integers(96, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
    return img


def _synthetic(cfg: DataSection) -> Iterator[Item]:
    for index in range(cfg.synthetic_count):
        yield f"synthetic[{index}]", to_uint8(synthetic_image(index, cfg.image_size), cfg.image_size, cfg.channels)


# --- torchvision readers ----------------------------------------------------------------------


def _open_torchvision(cfg: DataSection):
    try:
        import torchvision.datasets as datasets
    except ImportError:
        raise DataError(
            f"data.source={cfg.source} is read with torchvision; install it with: pip install '.[torch]'"
        ) from None
    root = str(cfg.root)
    try:
        if cfg.source == "mnist":
            return datasets.MNIST(root, train=True, download=cfg.download)
        if cfg.source == "cifar10":
            return datasets.CIFAR10(root, train=True, download=cfg.download)
        _check_lsun_databases(cfg)
        return datasets.LSUN(root, classes=list(cfg.lsun_classes))
    except ImportError as err:  # LSUN needs the lmdb package
        raise DataError(f"data.source=lsun needs {err.name or 'lmdb'}: pip install lmdb") from None
    except ValueError as err:  # torchvision's check of the LSUN category names
        if cfg.source != "lsun":
            raise
        raise DataError(f"data.lsun_classes={list(cfg.lsun_classes)}: {err}") from None
    except (RuntimeError, OSError) as err:
        hint = " (set data.download=true to fetch it)" if cfg.source != "lsun" else ""
        raise DataError(f"data.source={cfg.source} under data.root {root!r}: {err}{hint}") from None


def _check_lsun_databases(cfg: DataSection) -> None:
    """LSUN is never downloaded; a missing database would otherwise surface as lmdb.Error."""
    databases = [Path(cfg.root) / f"{name}_lmdb" for name in cfg.lsun_classes]
    missing = [str(path) for path in databases if not path.is_dir()]
    if missing:
        raise DataError(
            f"data.source=lsun under data.root {str(cfg.root)!r}: no LMDB database at {', '.join(missing)} "
            "(each data.lsun_classes entry, e.g. bedroom_train, is read from <root>/<entry>_lmdb)"
        )


def _torchvision(cfg: DataSection) -> Iterator[Item]:
    dataset = _open_torchvision(cfg)
    for index in range(len(dataset)):
        name = f"{cfg.source}[{index}]"
        try:
            image, _label = dataset[index]
            yield name, to_uint8(image, cfg.image_size, cfg.channels)
        except Exception as err:  # a corrupt record is skipped and reported, like a bad file
            yield name, describe_error(err)


def take_images(items: Iterable[Item], limit: Optional[int]) -> Iterator[Item]:
    """Stop after `limit` usable images; skipped items do not count."""
    kept = 0
    for name, value in items:
        if limit is not None and kept >= limit:
            return
        if isinstance(value, np.ndarray):
            kept += 1
        yield name, value

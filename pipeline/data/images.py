"""Decode one image fully and turn it into a fixed-size uint8 HWC array.

Runs at prepare time only; training never decodes. `Image.verify()` alone misses truncated
JPEGs, so every file is decoded with `load()`, and `LOAD_TRUNCATED_IMAGES` stays off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Transparent pixels are composited onto white: the colour under alpha=0 is arbitrary
# (often black), and a white page is what a viewer shows.
_BACKGROUND = 255


def _flatten_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (_BACKGROUND,) * 3 + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer / float modes, scaled rather than clipped to 0..255."""
    array = np.asarray(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        scaled = np.clip(array.astype(np.float64), 0, 65535) / 257.0
    else:  # "F": assume the 0..255 range of an 8-bit image stored as float
        scaled = np.clip(array.astype(np.float64), 0, 255)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def normalize_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode (1, L, P, LA, RGBA, CMYK, I;16, ...) -> "L" (channels=1) or "RGB" (3)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = _flatten_alpha(img)
    return img.convert("L" if channels == 1 else "RGB")


def to_uint8(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """EXIF orientation, mode conversion, antialiased resize of the shorter side, center crop."""
    img = ImageOps.exif_transpose(img)
    img = normalize_mode(img, channels)
    img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def decode_file(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Decode `path` completely; raises on unreadable, truncated or non-image files."""
    with Image.open(path) as img:
        img.load()  # full decode: raises on truncated data that verify() lets through
        return to_uint8(img, image_size, channels)


def describe_error(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, Image.UnidentifiedImageError):
        return "not a readable image (unidentified format)"
    return f"{type(err).__name__}: {text}"

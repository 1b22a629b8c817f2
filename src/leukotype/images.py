"""The one image-decoding path used by validation, extraction and training (EXIF orientation
applied, any mode converted to RGB deliberately)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

#: The EXIF tag that says how a camera held the image (1 = as stored; 2-8 flips/rotations).
EXIF_ORIENTATION = 0x0112

#: Modes that decode to RGB without a decision worth recording.
NATIVE_MODES = frozenset({"RGB"})


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB deliberately.

    - 16/32-bit grayscale (I;16, I) is rescaled by its own range, not clipped at 255.
    - Alpha (RGBA, LA, PA) is composited on white, the background of a stained smear.
    - Palette, grayscale, CMYK, YCbCr go through PIL's RGB conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def exif_orientation(img: Image.Image) -> int:
    """The image's EXIF orientation (1 when absent or invalid: shown as stored)."""
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block means "no orientation"
        return 1
    return value if 1 <= value <= 8 else 1


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned the way the camera's EXIF orientation says it is viewed."""
    return ImageOps.exif_transpose(img) if exif_orientation(img) != 1 else img


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully, apply its EXIF orientation, and return an RGB image (raises on
    unreadable/truncated files)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(upright(img))

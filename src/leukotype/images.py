"""The one image-decoding path used by validation, extraction and training."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

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


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully and return an RGB image (raises on unreadable/truncated files)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)

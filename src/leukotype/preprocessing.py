"""Image preprocessing variants that close a lab shift: cell-centred scale, stain normalisation,
colour augmentation.

A variant is a small declarative record (:class:`Preprocessing`, from the config's
``preprocessing`` list) and one function applies it (:func:`apply_preprocessing`), so feature
extraction, fine-tuning, external sets and (later) prediction bundles all do exactly the same:

1. **cell-centred crop** (``crop``): :func:`locate_cell` finds the white cell by classical
   segmentation (scikit-image: hematoxylin channel of a colour deconvolution for the nucleus,
   optical density for the cytoplasm around it, Otsu thresholds, connected components) and a
   square around it with ``margin`` (a fraction of the cell's size on each side) is cut out, so
   that a cell fills the same share of the network's input whatever the lab's framing. Boxes
   are computed once per image by their own job (``crops.tsv``: box, status, reason); an image
   where no cell is found is used whole and listed with the reason.
2. **stain normalisation** (``stain``): ``reinhard`` (LAB mean and sd matched to a reference,
   scikit-image colour conversions) or ``macenko`` (torchstain's stain-vector estimate). The
   reference comes from the training part only (:func:`fit_stain_reference`).
3. **colour augmentation** of the training part (``augmentation.colour`` in the config, a
   transform ``colourK`` per extra view): HED jitter, brightness, contrast, blur and scale
   jitter with parameters drawn from the image's identity and the view, so a sample's view is
   the same in every job (:func:`colour_jitter`).

numpy, PIL and scikit-image only (torchstain's numpy backend): no torch import.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from leukotype.errors import LeukotypeError

#: Name of the variant that changes nothing (paths and results as without preprocessing).
NONE = "none"
STAIN_METHODS = ("none", "reinhard", "macenko")
#: Prefix of the colour-augmentation transforms (``colour1``, ``colour2``, ...).
COLOUR_PREFIX = "colour"


@dataclass(frozen=True)
class Preprocessing:
    """One ``preprocessing`` entry: ``{name, crop: {margin}, stain}``."""

    name: str = NONE
    crop: bool = False
    margin: float = 0.15
    stain: str = "none"

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any] | None) -> Preprocessing:
        entry = dict(entry or {})
        crop = entry.get("crop")
        if entry.get("stain", "none") not in STAIN_METHODS:
            raise LeukotypeError(f"unknown stain method {entry.get('stain')!r}; choose one of {list(STAIN_METHODS)}")
        return cls(
            name=str(entry.get("name", NONE)),
            crop=bool(crop),
            margin=float((crop or {}).get("margin", 0.15)) if isinstance(crop, Mapping) else 0.15,
            stain=str(entry.get("stain", "none")),
        )

    @property
    def is_identity(self) -> bool:
        return not self.crop and self.stain == "none"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "crop": {"margin": self.margin} if self.crop else None, "stain": self.stain}


# --------------------------------------------------------------------------------------------
# cell-centred crop


@dataclass(frozen=True)
class CellBox:
    """A square crop box (may extend past the image; padded with background) and the cell's
    bounding box and centre it was derived from, in pixels of the full image."""

    left: int
    top: int
    side: int
    cell_left: int
    cell_top: int
    cell_right: int
    cell_bottom: int

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.cell_left + self.cell_right) / 2, (self.cell_top + self.cell_bottom) / 2)

    @property
    def cell_size(self) -> int:
        return max(self.cell_right - self.cell_left, self.cell_bottom - self.cell_top)


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(rgb.astype(np.float32) + 1.0, 1.0, 256.0) / 256.0)


def locate_cell(rgb: np.ndarray, margin: float = 0.15, min_fraction: float = 0.002) -> tuple[CellBox | None, str]:
    """Find the white cell in an RGB image (H, W, 3, uint8): ``(box, "")`` or ``(None, reason)``.

    Nucleus: the hematoxylin channel of :func:`skimage.color.rgb2hed`, smoothed, above its Otsu
    threshold; the component chosen is the largest one weighted by its closeness to the image
    centre (neighbouring cells at the border lose). Cell: pixels whose total optical density is
    above the Otsu threshold between background and stained matter, connected to the nucleus
    and within 1.5 nucleus radii of it (so touching red cells are not swallowed).
    The crop box is the square around the cell's bounding box enlarged by ``margin`` of the
    cell's size on every side.
    """
    from scipy import ndimage
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise LeukotypeError(f"locate_cell needs an RGB array (H, W, 3), got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    scale = max(height, width) / 256.0  # work on about 256 pixels: same result, 1/4 the cost
    small = rgb
    if scale > 1.25:
        small = np.asarray(Image.fromarray(rgb).resize((round(width / scale), round(height / scale)), Image.BILINEAR))
    else:
        scale = 1.0
    h, w = small.shape[:2]
    hema = gaussian(rgb2hed(small)[..., 0], sigma=1.0)
    if float(hema.max() - hema.min()) < 1e-3:
        return None, "no_cell: the image has no stain contrast"
    nucleus_mask = hema > threshold_otsu(hema)
    labels, n = ndimage.label(nucleus_mask)
    if n == 0:
        return None, "no_cell: no hematoxylin-stained region"
    areas = ndimage.sum(nucleus_mask, labels, index=np.arange(1, n + 1))
    centres = ndimage.center_of_mass(nucleus_mask, labels, index=np.arange(1, n + 1))
    diagonal = math.hypot(h, w)
    scores = [a * (1.0 - math.hypot(cy - h / 2, cx - w / 2) / diagonal) ** 2 for a, (cy, cx) in zip(areas, centres)]
    best = int(np.argmax(scores)) + 1
    if areas[best - 1] < min_fraction * h * w:
        return None, f"no_cell: largest stained region {int(areas[best - 1])} px < {min_fraction:.1%} of the image"
    nucleus = labels == best
    radius = math.sqrt(areas[best - 1] / math.pi)
    od = gaussian(_optical_density(small).sum(axis=2), sigma=1.0)
    # background vs stained matter among the pixels that are not nucleus (the nucleus is so
    # dark that a threshold over all pixels would separate it, not the cytoplasm)
    stained = od > threshold_otsu(od[~nucleus_mask])
    near = ndimage.distance_transform_edt(~nucleus) <= 1.5 * radius
    # an opening cuts the thin necks where red cells touch the white cell
    from skimage.morphology import disk

    opened = ndimage.binary_opening(stained & near, structure=disk(max(1, round(0.3 * radius))))
    cell_labels, _ = ndimage.label(opened | nucleus)
    cell = cell_labels == cell_labels[nucleus].max()
    cell = ndimage.binary_fill_holes(cell)
    rows, cols = np.flatnonzero(cell.any(axis=1)), np.flatnonzero(cell.any(axis=0))
    top, bottom = rows[0] * scale, (rows[-1] + 1) * scale
    left, right = cols[0] * scale, (cols[-1] + 1) * scale
    size = max(right - left, bottom - top)
    side = size * (1.0 + 2.0 * margin)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    box = CellBox(
        left=int(round(cx - side / 2)),
        top=int(round(cy - side / 2)),
        side=max(1, int(round(side))),
        cell_left=int(round(left)),
        cell_top=int(round(top)),
        cell_right=int(round(right)),
        cell_bottom=int(round(bottom)),
    )
    return box, ""


def background_colour(rgb: np.ndarray) -> tuple[int, int, int]:
    """Median colour of the image border (the slide's background, for padding a crop)."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def crop_box(image: Image.Image, left: int, top: int, side: int) -> Image.Image:
    """The square ``(left, top, side)`` of ``image``; parts outside it are background-filled."""
    rgb = np.asarray(image)
    canvas = Image.new("RGB", (side, side), background_colour(rgb))
    canvas.paste(image, (-left, -top))
    return canvas


# --------------------------------------------------------------------------------------------
# stain normalisation


def lab_statistics(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of each CIELAB channel (scikit-image's conversion)."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


def reinhard(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Reinhard et al. 2001: each LAB channel shifted and scaled to the reference mean and sd."""
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(rgb)
    src_mean = lab.reshape(-1, 3).mean(axis=0)
    src_std = lab.reshape(-1, 3).std(axis=0)
    out = (lab - src_mean) / np.maximum(src_std, 1e-6) * np.asarray(std) + np.asarray(mean)
    out[..., 0] = out[..., 0].clip(0, 100)
    return (lab2rgb(out).clip(0, 1) * 255).round().astype(np.uint8)


def _macenko(reference: Mapping[str, Any] | None = None) -> Any:
    from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer

    normalizer = NumpyMacenkoNormalizer()
    if reference is not None:
        normalizer.HERef = np.asarray(reference["HERef"], dtype=float)
        normalizer.maxCRef = np.asarray(reference["maxCRef"], dtype=float)
    return normalizer


def macenko(rgb: np.ndarray, reference: Mapping[str, Any]) -> np.ndarray:
    """Macenko et al. 2009 (torchstain): stain vectors and concentrations mapped to the reference."""
    normalized, _, _ = _macenko(reference).normalize(rgb, stains=False)
    return normalized


def fit_stain_reference(images: Sequence[np.ndarray], method: str) -> dict[str, Any]:
    """The reference of ``method`` from (training-part) images: Reinhard's mean LAB mean and sd
    over the images; Macenko's stain vectors and maximum concentrations of their mosaic."""
    if not images:
        raise LeukotypeError("no images to fit a stain reference on")
    if method == "reinhard":
        stats = [lab_statistics(img) for img in images]
        return {
            "method": method,
            "mean": np.mean([m for m, _ in stats], axis=0).tolist(),
            "std": np.mean([s for _, s in stats], axis=0).tolist(),
            "n_images": len(images),
        }
    if method == "macenko":
        pixels = np.concatenate([img.reshape(-1, 3) for img in images])[None]
        normalizer = _macenko()
        normalizer.fit(pixels)
        return {"method": method, "HERef": normalizer.HERef.tolist(), "maxCRef": normalizer.maxCRef.tolist(), "n_images": len(images)}
    raise LeukotypeError(f"unknown stain method {method!r}; choose one of {list(STAIN_METHODS[1:])}")


def normalise_stain(rgb: np.ndarray, reference: Mapping[str, Any]) -> np.ndarray:
    """``rgb`` mapped to the reference stain (the reference names its method)."""
    if reference["method"] == "reinhard":
        return reinhard(rgb, reference["mean"], reference["std"])
    try:
        return macenko(rgb, reference)
    except (np.linalg.LinAlgError, ValueError, IndexError):
        # too few stained pixels to estimate stain vectors: Reinhard-free fallback is the image
        return rgb


# --------------------------------------------------------------------------------------------
# the one function that applies a variant


def apply_preprocessing(
    image: Image.Image,
    prep: Preprocessing,
    box: Sequence[int] | None = None,
    reference: Mapping[str, Any] | None = None,
) -> Image.Image:
    """``image`` (RGB) with the variant applied: crop to ``box`` (left, top, side) when the
    variant crops and a box was found, then stain normalisation to ``reference``."""
    if prep.crop and box is not None:
        image = crop_box(image, *box)
    if prep.stain != "none":
        if reference is None:
            raise LeukotypeError(f"preprocessing {prep.name!r}: stain normalisation needs its reference")
        image = Image.fromarray(normalise_stain(np.asarray(image), reference))
    return image


def locate_in_image(image: Image.Image, margin: float) -> dict[str, Any]:
    """One ``crops.tsv`` row for ``image``: box, cell box, status (found / not_found), reason."""
    box, reason = locate_cell(np.asarray(image.convert("RGB")), margin)
    if box is None:
        return {"status": "not_found", "reason": reason, "left": "", "top": "", "side": "", "cell_size": ""}
    return {"status": "found", "reason": "", "left": box.left, "top": box.top, "side": box.side, "cell_size": box.cell_size}


# --------------------------------------------------------------------------------------------
# colour augmentation


@dataclass(frozen=True)
class ColourJitter:
    """Ranges of the colour augmentation (``augmentation.colour``); each is a +- amplitude."""

    views: int = 0
    hed: float = 0.03
    brightness: float = 0.1
    contrast: float = 0.1
    blur: float = 0.5
    scale: float = 0.1
    seed: int = 0

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any] | None) -> ColourJitter:
        entry = dict(entry or {})
        return cls(**{k: entry[k] for k in cls.__dataclass_fields__ if k in entry})

    def transforms(self) -> list[str]:
        return [f"{COLOUR_PREFIX}{k}" for k in range(1, self.views + 1)]


def is_colour_transform(name: str) -> bool:
    return name.startswith(COLOUR_PREFIX) and name[len(COLOUR_PREFIX):].isdigit()


def jitter_parameters(jitter: ColourJitter, image_key: str, view: int) -> dict[str, Any]:
    """The parameters of one sample's view, drawn from (seed, image, view) alone."""
    digest = hashlib.sha256(f"{jitter.seed}:{image_key}:{view}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return {
        "hed": rng.uniform(-jitter.hed, jitter.hed, 3).tolist(),
        "brightness": float(rng.uniform(-jitter.brightness, jitter.brightness)),
        "contrast": float(rng.uniform(-jitter.contrast, jitter.contrast)),
        "blur": float(rng.uniform(0.0, jitter.blur)),
        "scale": float(rng.uniform(-jitter.scale, jitter.scale)),
    }


def colour_jitter(image: Image.Image, params: Mapping[str, Any]) -> Image.Image:
    """Apply one view's jitter: HED stain shift, brightness, contrast, Gaussian blur, and a
    scale change (zoom in or out about the centre, same output size, background-padded)."""
    from skimage.color import hed2rgb, rgb2hed

    rgb = np.asarray(image.convert("RGB"))
    hed = rgb2hed(rgb) + np.asarray(params["hed"], dtype=float)
    arr = hed2rgb(hed).clip(0, 1)
    arr = (arr - arr.mean()) * (1.0 + params["contrast"]) + arr.mean() + params["brightness"]
    out = Image.fromarray((arr.clip(0, 1) * 255).round().astype(np.uint8))
    if params["blur"] > 0.05:
        out = out.filter(ImageFilter.GaussianBlur(params["blur"]))
    factor = 1.0 + params["scale"]
    if abs(factor - 1.0) > 1e-3:
        width, height = out.size
        side_w, side_h = round(width / factor), round(height / factor)
        out = crop_box(out, (width - side_w) // 2, (height - side_h) // 2, max(side_w, side_h)).resize((width, height), Image.BILINEAR)
    return out

"""Image preprocessing variants that close a lab shift: cell-centred scale, stain normalisation,
colour augmentation, and whatever step is registered next.

A *variant* (:class:`Variant`, one entry of the config's ``preprocessing`` list) is a name and
a sequence of *steps*; every step kind lives in one registry (:data:`STEPS`, filled by
:func:`register_step`), and one class applies a variant to an image (:class:`ImagePreparer`),
so feature extraction, fine-tuning, external sets and model bundles (``leukotype predict`` /
``explain``) all do exactly the same. A new step (greyscale, background flattening) is a
subclass of :class:`Step` with ``@register_step``; the workflow needs no change, because it
only asks a step what it needs (see :class:`Step`):

1. ``crop`` (per-image): :func:`locate_cell` finds the white cell by classical segmentation
   (scikit-image: hematoxylin channel of a colour deconvolution for the nucleus, optical
   density for the cytoplasm around it, Otsu thresholds, connected components) and a square
   around it with ``margin`` (a fraction of the cell's size on each side) is cut out, so that a
   cell fills the same share of the network's input whatever the lab's framing. Boxes are
   computed once per image and margin by their own job (``images.tsv``: box, status, reason);
   an image where no cell is found is used whole and listed with the reason.
2. ``stain`` (fitted): ``reinhard`` (LAB mean and sd matched to a reference, scikit-image
   colour conversions) or ``macenko`` (torchstain's stain-vector estimate). The reference comes
   from training images that are never test images (:func:`reference_image_ids`); under
   k-fold, once per fold from that fold's training images (:func:`fits_per_fold`).
3. ``colour`` (training views): HED jitter, brightness, contrast, blur and scale jitter with
   parameters drawn from the image's md5 and the view, so a sample's view is the same in every
   job (:func:`colour_jitter`); the views ``colourK`` are training samples like rotations.

numpy, PIL and scikit-image only (torchstain's numpy backend): no torch import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageFilter

from leukotype import paths
from leukotype.augment import COLOUR_PREFIX, colour_transforms, colour_view
from leukotype.errors import LeukotypeError
from leukotype.paths import ANALYSIS_TABLE
from leukotype.paths import PREP_STATE as STATE_FILE

#: Name of the variant that changes nothing (paths and results as without preprocessing).
NONE = "none"
STAIN_METHODS = ("reinhard", "macenko")


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


def _working_copy(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """``(small, scale)``: ``rgb`` resized to about 256 pixels on its long side (same segmentation,
    a quarter of the cost), ``scale`` = full-image pixels per working pixel; small images as they are."""
    height, width = rgb.shape[:2]
    scale = max(height, width) / 256.0
    if scale <= 1.25:
        return rgb, 1.0
    return np.asarray(Image.fromarray(rgb).resize((round(width / scale), round(height / scale)), Image.BILINEAR)), scale


def _hematoxylin_regions(small: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(labels, areas)`` of the regions whose smoothed hematoxylin (:func:`skimage.color.rgb2hed`)
    lies above its Otsu threshold, the nucleus candidates of :func:`_segment_cell`; ``None`` when
    the image has no stain contrast."""
    from scipy import ndimage
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu

    hema = gaussian(rgb2hed(small)[..., 0], sigma=1.0)
    if float(hema.max() - hema.min()) < 1e-3:
        return None
    mask = hema > threshold_otsu(hema)
    labels, n = ndimage.label(mask)
    return labels, ndimage.sum(mask, labels, index=np.arange(1, n + 1))


def _segment_cell(
    rgb: np.ndarray, min_fraction: float = 0.002, join_lobes: bool = True
) -> tuple[np.ndarray | None, float, str]:
    """The white cell's mask on a working copy of about 256 pixels: ``(mask, scale, "")`` or
    ``(None, scale, reason)``; ``scale`` = full-image pixels per working pixel.

    Nucleus: the hematoxylin channel of :func:`skimage.color.rgb2hed`, smoothed, above its Otsu
    threshold; the component chosen is the largest one weighted by its closeness to the image
    centre (neighbouring cells at the border lose), joined by its other lobes
    (:func:`_join_lobes`). Cell: pixels whose total optical density is above the Otsu threshold
    between background and stained matter, connected to the nucleus and within 1.5 nucleus
    radii of it (so touching red cells are not swallowed).
    """
    from scipy import ndimage
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import disk

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise LeukotypeError(f"locate_cell needs an RGB array (H, W, 3), got shape {rgb.shape}")
    small, scale = _working_copy(rgb)
    h, w = small.shape[:2]
    regions = _hematoxylin_regions(small)
    if regions is None:
        return None, scale, "no_cell: the image has no stain contrast"
    labels, areas = regions
    if len(areas) == 0:
        return None, scale, "no_cell: no hematoxylin-stained region"
    nucleus_mask = labels > 0
    centres = ndimage.center_of_mass(nucleus_mask, labels, index=np.arange(1, len(areas) + 1))
    diagonal = math.hypot(h, w)
    scores = [a * (1.0 - math.hypot(cy - h / 2, cx - w / 2) / diagonal) ** 2 for a, (cy, cx) in zip(areas, centres)]
    best = int(np.argmax(scores)) + 1
    if areas[best - 1] < min_fraction * h * w:
        return None, scale, f"no_cell: largest stained region {int(areas[best - 1])} px < {min_fraction:.1%} of the image"
    od = gaussian(_optical_density(small).sum(axis=2), sigma=1.0)
    # background vs stained matter among the pixels that are not nucleus (the nucleus is so
    # dark that a threshold over all pixels would separate it, not the cytoplasm)
    stained = od > threshold_otsu(od[~nucleus_mask])
    nucleus = labels == best
    if join_lobes:  # False: the segmentation before SEGMENTATION_VERSION 2 (bench/cell_lobes.py)
        nucleus = _join_lobes(labels, areas, best, ndimage.label(stained | nucleus_mask)[0])
    radius = math.sqrt(float(nucleus.sum()) / math.pi)
    near = ndimage.distance_transform_edt(~nucleus) <= 1.5 * radius
    # an opening cuts the thin necks where red cells touch the white cell
    opened = ndimage.binary_opening(stained & near, structure=disk(max(1, round(0.3 * radius))))
    cell_labels, _ = ndimage.label(opened | nucleus)
    # every part that holds some of the nucleus (the opening may part the lobes' cytoplasm)
    cell = np.isin(cell_labels, np.unique(cell_labels[nucleus]))
    return ndimage.binary_fill_holes(cell), scale, ""


#: The version of the cell segmentation (:func:`_segment_cell`). The per-image tables' rules
#: take it as a param, so a change of what the segmentation finds reruns those tables and what
#: reads them, as a changed setting does. 2: a nucleus's lobes are joined (:func:`_join_lobes`).
SEGMENTATION_VERSION = 2

#: A stained region joins the chosen nucleus as one of its lobes when it has at least this share
#: of the chosen region's area and lies within this many of its radii (a segmented neutrophil's
#: lobes are separated by thin chromatin bridges that a threshold misses; a neighbouring cell's
#: nucleus lies farther away).
LOBE_MIN_AREA_SHARE = 0.1
LOBE_MAX_GAP_RADII = 1.0


def _join_lobes(labels: np.ndarray, areas: np.ndarray, best: int, stained_parts: np.ndarray) -> np.ndarray:
    """The chosen nucleus region ``best`` of ``labels`` with its other lobes, as one mask.

    A lobe is a region of at least ``LOBE_MIN_AREA_SHARE`` of the chosen one's area, in the same
    connected part of stained matter (``stained_parts``, labelled: one cell's cytoplasm joins
    its lobes; background parts a platelet or a neighbour from it), whose nearest pixel lies
    within ``LOBE_MAX_GAP_RADII`` of its radii of the nucleus gathered so far (repeated, so a
    chain of lobes is gathered). Without this, a nucleus that the threshold
    splits into lobes was one lobe, and the cell grown around it lost the others: in a quarter
    of JTSC's neutrophils and of PBC's eosinophils the cell lost a lobe
    (bench/results/cell_lobes.csv).
    """
    from scipy import ndimage

    nucleus = labels == best
    reach = LOBE_MAX_GAP_RADII * math.sqrt(areas[best - 1] / math.pi)
    part = np.bincount(stained_parts[nucleus]).argmax()
    same_part = set(np.unique(labels[stained_parts == part]).tolist()) - {0}
    candidates = [i + 1 for i, area in enumerate(areas)
                  if i + 1 != best and i + 1 in same_part and area >= LOBE_MIN_AREA_SHARE * areas[best - 1]]
    while candidates:
        near = ndimage.distance_transform_edt(~nucleus) <= reach
        joined = [label for label in candidates if (near & (labels == label)).any()]
        if not joined:
            break
        nucleus |= np.isin(labels, joined)
        candidates = [label for label in candidates if label not in joined]
    return nucleus


def locate_cell(rgb: np.ndarray, margin: float = 0.15, min_fraction: float = 0.002) -> tuple[CellBox | None, str]:
    """Find the white cell in an RGB image (H, W, 3, uint8): ``(box, "")`` or ``(None, reason)``.

    The cell is segmented by :func:`_segment_cell`; the crop box is the square around the
    cell's bounding box enlarged by ``margin`` of the cell's size on every side.
    """
    cell, scale, reason = _segment_cell(rgb, min_fraction)
    if cell is None:
        return None, reason
    return box_from_mask(cell, margin, scale), ""


def box_from_mask(mask: np.ndarray, margin: float, scale: float = 1.0) -> CellBox:
    """The square crop box around a cell ``mask``'s bounding box, enlarged by ``margin`` of the
    cell's size on every side (``scale``: image pixels per mask pixel)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise LeukotypeError("box_from_mask: the mask is empty")
    top, bottom = rows[0] * scale, (rows[-1] + 1) * scale
    left, right = cols[0] * scale, (cols[-1] + 1) * scale
    size = max(right - left, bottom - top)
    side = size * (1.0 + 2.0 * margin)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    return CellBox(
        left=int(round(cx - side / 2)),
        top=int(round(cy - side / 2)),
        side=max(1, int(round(side))),
        cell_left=int(round(left)),
        cell_top=int(round(top)),
        cell_right=int(round(right)),
        cell_bottom=int(round(bottom)),
    )


def cell_mask(rgb: np.ndarray, min_fraction: float = 0.002) -> tuple[np.ndarray | None, str]:
    """The white cell's pixels in ``rgb`` (boolean, full size): ``(mask, "")`` or ``(None, reason)``.

    Same segmentation as :func:`locate_cell`, so the foreground the colour steps use is the
    cell the crop centres on.
    """
    cell, _, reason = _segment_cell(rgb, min_fraction)
    if cell is None:
        return None, reason
    height, width = rgb.shape[:2]
    if cell.shape != (height, width):
        cell = np.asarray(Image.fromarray(cell.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 127
    return cell, ""


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
# colour steps that remove what differs between labs rather than map it


def crop_mask(mask: np.ndarray, left: int, top: int, side: int) -> np.ndarray:
    """The square ``(left, top, side)`` of a boolean mask (outside the image: False), matching
    :func:`crop_box` on the image."""
    out = np.zeros((side, side), dtype=bool)
    height, width = mask.shape
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(height, top + side), min(width, left + side)
    if y1 > y0 and x1 > x0:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = mask[y0:y1, x0:x1]
    return out


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Grey image (ITU-R BT.709 luminance, scikit-image's ``rgb2gray``) in all three channels:
    the network's input keeps its shape, hue and saturation are gone, so a lab's stain hue
    cannot decide the class."""
    from skimage.color import rgb2gray

    grey = (rgb2gray(rgb) * 255).round().clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def white_balance(rgb: np.ndarray, background: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """Per-channel gains that map the image's ``background`` colour to ``target`` (von Kries).

    A yellow or blue cast of another lab's lamp and camera is a gain per channel; this removes
    it without touching the stain's own contrast. ``background``: the image's background colour,
    measured once on the whole original image outside its cell (:func:`background_median`), so
    a crop applied before this step does not change the gains; ``target``: the training part's
    median background colour.
    """
    gains = np.asarray(target, dtype=np.float32) / np.maximum(np.asarray(background, dtype=np.float32), 1.0)
    return (rgb.astype(np.float32) * gains).round().clip(0, 255).astype(np.uint8)


def background_median(rgb: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Median colour of the pixels outside ``mask`` (the image border without one)."""
    background = rgb[~mask] if mask is not None and (~mask).any() else np.concatenate(
        [rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]
    )
    return np.median(background.reshape(-1, 3), axis=0)


def flatten_background(
    rgb: np.ndarray, mask: np.ndarray, colour: Sequence[float], grow: int = 2
) -> np.ndarray:
    """Every pixel outside the cell ``mask`` (grown by ``grow`` pixels, so the membrane stays)
    set to ``colour``: red cells, debris and the slide's tint no longer reach the network."""
    from scipy import ndimage

    keep = ndimage.binary_dilation(mask, iterations=grow) if grow > 0 else mask
    out = rgb.copy()
    out[~keep] = np.asarray(colour, dtype=np.float32).round().clip(0, 255).astype(np.uint8)
    return out


def stretch_contrast(rgb: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """One affine map for all channels that sends the ``low`` and ``high`` percentiles of the
    image's luminance to 0 and 255: a dim or washed-out camera gets the training part's range
    while hue ratios are kept."""
    grey = rgb.astype(np.float32).mean(axis=2)
    lo, hi = np.percentile(grey, [low, high])
    if hi - lo < 1.0:
        return rgb
    out = (rgb.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return out.round().clip(0, 255).astype(np.uint8)


def limit_detail(rgb: np.ndarray, side: int) -> np.ndarray:
    """The image averaged down to ``side`` x ``side`` pixels and brought back to its own size:
    it keeps at most the detail a ``side``-pixel crop holds. Applied to every lab's cells, a
    sharp camera's chromatin and granule texture, which a blurrier lab's optics never show,
    can no longer decide the class."""
    height, width = rgb.shape[:2]
    if side >= min(height, width):
        return rgb
    small = Image.fromarray(rgb).resize((side, side), Image.BOX)
    return np.asarray(small.resize((width, height), Image.BICUBIC))


def detail_level(rgb: np.ndarray, size: int = 128) -> float:
    """Mean absolute Laplacian of the standardised grey image at ``size`` x ``size``: how much
    fine detail (chromatin, granules) an image carries, whatever its size. It compares labs'
    optics without labels (``bench/external_detail.py``)."""
    from scipy import ndimage

    grey = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR).convert("L"), dtype=np.float64)
    spread = grey.std()
    if spread == 0:
        return 0.0
    return float(np.abs(ndimage.laplace((grey - grey.mean()) / spread)).mean())


def hsv_jitter(rgb: np.ndarray, hue: float, saturation: float) -> np.ndarray:
    """Hue rotated by ``hue`` (a fraction of the colour circle) and saturation scaled by
    ``1 + saturation``: a training view in which the stain's hue is not a reliable cue."""
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(rgb)
    hsv[..., 0] = (hsv[..., 0] + hue) % 1.0
    hsv[..., 1] = (hsv[..., 1] * (1.0 + saturation)).clip(0.0, 1.0)
    return (hsv2rgb(hsv) * 255).round().clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# stain normalisation


def lab_statistics(rgb: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of each CIELAB channel (scikit-image's conversion), over the pixels of
    ``mask`` where one is given (e.g. the cell: :func:`cell_mask`)."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb)
    lab = lab[mask] if mask is not None and mask.any() else lab.reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


def reinhard(
    rgb: np.ndarray, mean: Sequence[float], std: Sequence[float], mask: np.ndarray | None = None
) -> np.ndarray:
    """Reinhard et al. 2001: each LAB channel shifted and scaled to the reference mean and sd.

    With ``mask`` the image's own statistics are taken over those pixels only (the cell), so a
    lab's large, differently coloured background does not decide how the cell is recoloured;
    the reference should then be the cells' statistics too (``fit_stain_reference(masks=...)``).
    """
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(rgb)
    src_mean, src_std = lab_statistics(rgb, mask)
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


def fit_stain_reference(
    images: Sequence[np.ndarray], method: str, masks: Sequence[np.ndarray | None] | None = None
) -> dict[str, Any]:
    """The reference of ``method`` from (training-part) images: Reinhard's mean LAB mean and sd
    over the images (over each image's ``masks`` pixels where given: ``"foreground": true``);
    Macenko's stain vectors and maximum concentrations of their mosaic."""
    if not images:
        raise LeukotypeError("no images to fit a stain reference on")
    if method == "reinhard":
        masks = list(masks) if masks is not None else [None] * len(images)
        stats = [lab_statistics(img, mask) for img, mask in zip(images, masks)]
        return {
            "method": method,
            "mean": np.mean([m for m, _ in stats], axis=0).tolist(),
            "std": np.mean([s for _, s in stats], axis=0).tolist(),
            "foreground": any(mask is not None for mask in masks),
            "n_images": len(images),
        }
    if method == "macenko":
        pixels = np.concatenate([img.reshape(-1, 3) for img in images])[None]
        normalizer = _macenko()
        normalizer.fit(pixels)
        return {"method": method, "HERef": normalizer.HERef.tolist(), "maxCRef": normalizer.maxCRef.tolist(), "n_images": len(images)}
    raise LeukotypeError(f"unknown stain method {method!r}; choose one of {list(STAIN_METHODS)}")


def normalise_stain(rgb: np.ndarray, reference: Mapping[str, Any], mask: np.ndarray | None = None) -> np.ndarray:
    """``rgb`` mapped to the reference stain (the reference names its method); Reinhard takes
    the image's statistics over ``mask`` where given."""
    if reference["method"] == "reinhard":
        return reinhard(rgb, reference["mean"], reference["std"], mask)
    try:
        return macenko(rgb, reference)
    except (np.linalg.LinAlgError, ValueError, IndexError):
        # too few stained pixels to estimate stain vectors: Reinhard-free fallback is the image
        return rgb


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
    #: hue rotation (fraction of the colour circle) and saturation scale; 0 = off. Strong hue
    #: jitter (0.5: any hue) makes the SVM unable to rely on the stain's colour.
    hue: float = 0.0
    saturation: float = 0.0
    seed: int = 0

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any] | None) -> ColourJitter:
        entry = dict(entry or {})
        return cls(**{k: entry[k] for k in cls.__dataclass_fields__ if k in entry})

    def transforms(self) -> list[str]:
        return colour_transforms(self.views)


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
        # drawn after the others, so views without hue jitter keep their earlier parameters
        "hue": float(rng.uniform(-jitter.hue, jitter.hue)),
        "saturation": float(rng.uniform(-jitter.saturation, jitter.saturation)),
    }


def colour_jitter(image: Image.Image, params: Mapping[str, Any]) -> Image.Image:
    """Apply one view's jitter: HED stain shift, brightness, contrast, Gaussian blur, and a
    scale change (zoom in or out about the centre, same output size, background-padded)."""
    from skimage.color import hed2rgb, rgb2hed

    rgb = np.asarray(image.convert("RGB"))
    if params.get("hue", 0.0) or params.get("saturation", 0.0):
        rgb = hsv_jitter(rgb, params.get("hue", 0.0), params.get("saturation", 0.0))
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


# --------------------------------------------------------------------------------------------
# the step registry: a variant is a named sequence of registered steps


@dataclass(frozen=True)
class StepContext:
    """What a step may use besides the image: its per-image analysis row (``per_image`` steps,
    e.g. the crop box), its state fitted on the training part (``fitted`` steps, e.g. the stain
    reference), the sample's view (0: the image itself; K: the training view ``colourK``) and
    the image's key (its md5: a view's random draw depends on the image, not its path)."""

    analysis: Mapping[str, Any] | None = None
    state: Mapping[str, Any] | None = None
    view: int = 0
    key: str = ""


class Step:
    """One preprocessing step. Subclasses are frozen dataclasses whose fields are the step's
    parameters (its config entry ``{step: <kind>, <field>: value, ...}``), registered with
    :func:`register_step`. The workflow computes what a step declares it needs:

    - ``per_image``: :meth:`analyse` runs once per image (on the decoded image, before any
      step) in a job of its own; its rows are a table (``status``, ``reason`` and the step's
      columns) shared by every variant with the same :meth:`analysis_key`, and are recorded.
      Where no row exists (prediction of a new image), the step analyses the image itself.
    - ``fitted``: :meth:`fit` gets training-part images (never a test image), as the steps
      before it leave them, with their per-image rows (for a step that is both), and returns a
      JSON state that :meth:`apply` receives.
    - ``views`` > 0: the step draws that many training views ``colour1..colourK`` (recorded in
      the sample table like rotations); :meth:`apply` sees the view in its context.

    A step that needs none of these (greyscale, background flattening) only implements
    :meth:`apply`.
    """

    kind: ClassVar[str] = ""
    per_image: ClassVar[bool] = False
    fitted: ClassVar[bool] = False
    #: columns of the per-image table besides image_id, path, abspath, status, reason
    analysis_columns: ClassVar[tuple[str, ...]] = ()
    #: training views the step draws (a field of the steps that draw them)
    views = 0

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Step:
        params = {k: v for k, v in dict(entry).items() if k != "step"}
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise LeukotypeError(
                f"preprocessing step {cls.kind!r}: unknown setting(s) {unknown}; valid: {sorted(fields)}"
            )
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.kind, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    def analysis_key(self) -> str:
        """Names the per-image table: steps with the same key share it (computed once)."""
        raise NotImplementedError

    def analyse(self, image: Image.Image) -> dict[str, Any]:
        raise NotImplementedError

    def fit(self, images: Sequence[Image.Image], rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        raise NotImplementedError

    def apply(self, image: Image.Image, context: StepContext) -> Image.Image:
        raise NotImplementedError


#: Every step kind by name: the one registry the config, the workflow and bundles read.
STEPS: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make a step kind available to configs and bundles."""
    if not cls.kind or cls.kind in STEPS:
        raise LeukotypeError(f"step kind {cls.kind!r} is empty or registered twice")
    STEPS[cls.kind] = cls
    return cls


def step_from_dict(entry: Mapping[str, Any]) -> Step:
    kind = dict(entry).get("step")
    if kind not in STEPS:
        raise LeukotypeError(f"unknown preprocessing step {kind!r}; known steps: {sorted(STEPS)}")
    return STEPS[kind].from_dict(entry)


@register_step
@dataclass(frozen=True)
class CropStep(Step):
    """Cell-centred crop: the square around the located cell, ``margin`` of the cell's size
    on every side (:func:`locate_cell`); an image without a found cell is used whole."""

    kind: ClassVar[str] = "crop"
    per_image: ClassVar[bool] = True
    analysis_columns: ClassVar[tuple[str, ...]] = ("left", "top", "side", "cell_size")
    margin: float = 0.15

    def __post_init__(self) -> None:
        if not 0 <= float(self.margin) <= 2:
            raise LeukotypeError(f"crop margin must be between 0 and 2, got {self.margin}")

    def analysis_key(self) -> str:
        return f"crop_m{float(self.margin):g}"

    def analyse(self, image: Image.Image) -> dict[str, Any]:
        return locate_in_image(image, float(self.margin))

    def apply(self, image: Image.Image, context: StepContext) -> Image.Image:
        row = context.analysis
        if row is None or row.get("status") != "found":
            return image
        return crop_box(image, int(row["left"]), int(row["top"]), int(row["side"]))


@register_step
@dataclass(frozen=True)
class StainStep(Step):
    """Stain normalisation to a reference fitted on the training part: ``reinhard`` or
    ``macenko`` (:func:`fit_stain_reference`, :func:`normalise_stain`)."""

    kind: ClassVar[str] = "stain"
    fitted: ClassVar[bool] = True
    method: str = "reinhard"

    def __post_init__(self) -> None:
        if self.method not in STAIN_METHODS:
            raise LeukotypeError(f"unknown stain method {self.method!r}; choose one of {list(STAIN_METHODS)}")

    def fit(self, images: Sequence[Image.Image], rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        return fit_stain_reference([np.asarray(image.convert("RGB")) for image in images], self.method)

    def apply(self, image: Image.Image, context: StepContext) -> Image.Image:
        if context.state is None:
            raise LeukotypeError(f"stain normalisation ({self.method}) needs its fitted reference")
        return Image.fromarray(normalise_stain(np.asarray(image.convert("RGB")), context.state))


@register_step
@dataclass(frozen=True)
class ColourStep(Step):
    """Stain and colour augmentation of the training part: ``views`` extra samples per
    training image (``colour1..colourK``), each with a HED shift, brightness, contrast, blur
    and scale change drawn from (``seed``, the image's md5, the view) (:func:`colour_jitter`).
    Test, external and prediction images (view 0) pass unchanged."""

    kind: ClassVar[str] = "colour"
    views: int = 4
    # amplitudes default to ColourJitter's, the one place they are stated
    hed: float = ColourJitter.hed
    brightness: float = ColourJitter.brightness
    contrast: float = ColourJitter.contrast
    blur: float = ColourJitter.blur
    scale: float = ColourJitter.scale
    seed: int = ColourJitter.seed

    def __post_init__(self) -> None:
        colour_transforms(self.views)  # range check
        if not 0 <= float(self.scale) <= 0.5 or min(self.hed, self.brightness, self.contrast, self.blur) < 0:
            raise LeukotypeError(f"colour step: amplitudes must be >= 0 and scale <= 0.5, got {self}")

    def jitter(self) -> ColourJitter:
        return ColourJitter(
            views=self.views, hed=self.hed, brightness=self.brightness, contrast=self.contrast,
            blur=self.blur, scale=self.scale, seed=self.seed,
        )

    def apply(self, image: Image.Image, context: StepContext) -> Image.Image:
        if context.view == 0:
            return image
        if context.view > self.views:
            raise LeukotypeError(f"colour view {context.view} asked of a step with {self.views} views")
        return colour_jitter(image, jitter_parameters(self.jitter(), context.key, context.view))


@register_step
@dataclass(frozen=True)
class WhiteBalanceStep(Step):
    """Von Kries white balance: per-channel gains that map the image's background (the median
    colour outside its cell, measured once on the decoded image: :func:`background_median`,
    :func:`cell_mask`) to the training images' median background (:func:`white_balance`). A
    lab's lamp and camera cast is a gain per channel; the stain's own contrast stays."""

    kind: ClassVar[str] = "white_balance"
    per_image: ClassVar[bool] = True
    fitted: ClassVar[bool] = True
    analysis_columns: ClassVar[tuple[str, ...]] = ("bg_r", "bg_g", "bg_b")

    def analysis_key(self) -> str:
        return "white_balance"

    def analyse(self, image: Image.Image) -> dict[str, Any]:
        rgb = np.asarray(image.convert("RGB"))
        mask, reason = cell_mask(rgb)
        bg = background_median(rgb, mask)
        status = "found" if mask is not None else "not_found"  # not found: the image border
        return {"status": status, "reason": reason, **{f"bg_{c}": round(float(v), 3) for c, v in zip("rgb", bg)}}

    @staticmethod
    def background(row: Mapping[str, Any]) -> list[float]:
        return [float(row[f"bg_{c}"]) for c in "rgb"]

    def fit(self, images: Sequence[Image.Image], rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        if not rows:
            raise LeukotypeError("white balance: no training images to take the target background from")
        target = np.median([self.background(row) for row in rows], axis=0)
        return {"target": [float(v) for v in target], "n_images": len(rows)}

    def apply(self, image: Image.Image, context: StepContext) -> Image.Image:
        if context.state is None or context.analysis is None:
            raise LeukotypeError("white balance needs the image's background and the fitted target")
        rgb = np.asarray(image.convert("RGB"))
        return Image.fromarray(white_balance(rgb, self.background(context.analysis), context.state["target"]))


@register_step
@dataclass(frozen=True)
class GreyStep(Step):
    """Luminance in all three channels (:func:`luminance`): no hue, so a lab's stain hue cannot
    decide the class (after white balance, or the lamp's cast darkens the luminance)."""

    kind: ClassVar[str] = "grey"

    def apply(self, image: Image.Image, context: StepContext) -> Image.Image:
        return Image.fromarray(luminance(np.asarray(image.convert("RGB"))))


@register_step
@dataclass(frozen=True)
class StretchStep(Step):
    """One affine map for all channels sending the ``low`` and ``high`` percentiles to black
    and white (:func:`stretch_contrast`): a lab's exposure and optics' contrast."""

    kind: ClassVar[str] = "stretch"
    low: float = 1.0
    high: float = 99.0

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high <= 100:
            raise LeukotypeError(f"stretch: need 0 <= low < high <= 100, got {self.low}, {self.high}")

    def apply(self, image: Image.Image, context: StepContext) -> Image.Image:
        return Image.fromarray(stretch_contrast(np.asarray(image.convert("RGB")), self.low, self.high))


@register_step
@dataclass(frozen=True)
class ResampleStep(Step):
    """Every image's detail limited to a ``side``-pixel square (:func:`limit_detail`), after
    the crop: each lab's cell at the resolution of the coarsest optics."""

    kind: ClassVar[str] = "resample"
    #: where PBC's detail meets JTSC's (bench/results/external_detail.csv)
    side: int = 24

    def __post_init__(self) -> None:
        if not (isinstance(self.side, int) and self.side >= 8):
            raise LeukotypeError(f"resample: side must be an integer >= 8, got {self.side!r}")

    def apply(self, image: Image.Image, context: StepContext) -> Image.Image:
        return Image.fromarray(limit_detail(np.asarray(image.convert("RGB")), self.side))


@dataclass(frozen=True)
class Variant:
    """One ``preprocessing`` entry: ``{name, steps: [{step: <kind>, ...}, ...], reference_images,
    reference_source}``.

    A fitted step (stain reference, white balance) is fitted on at most ``reference_images``
    images: the study's training images that are never test images, or, with
    ``reference_source`` (a folder or manifest of images outside the study, e.g. a reference
    slide), those images, so that the fit depends on no split and k-fold may use it."""

    name: str = NONE
    steps: tuple[Step, ...] = ()
    reference_images: int = 200
    reference_source: str | None = None

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any] | None) -> Variant:
        entry = dict(entry or {})
        unknown = sorted(set(entry) - {"name", "steps", "reference_images", "reference_source"})
        if unknown:
            raise LeukotypeError(f"preprocessing variant: unknown key(s) {unknown}")
        source = entry.get("reference_source")
        return cls(
            name=str(entry.get("name", NONE)),
            steps=tuple(step_from_dict(s) for s in entry.get("steps") or ()),
            reference_images=int(entry.get("reference_images", 200)),
            reference_source=str(source) if source else None,
        )

    def to_dict(self) -> dict[str, Any]:
        record = {"name": self.name, "steps": [s.to_dict() for s in self.steps], "reference_images": self.reference_images}
        if self.reference_source:  # only when set: a study without it keeps its jobs' params
            record["reference_source"] = self.reference_source
        return record

    @property
    def is_identity(self) -> bool:
        return not self.steps

    @property
    def views(self) -> int:
        """Training views the variant adds (``colour1..colourK``)."""
        return sum(step.views for step in self.steps)

    def view_transforms(self) -> list[str]:
        return colour_transforms(self.views)

    def per_image_steps(self) -> list[Step]:
        return [s for s in self.steps if s.per_image]

    def analysis_keys(self) -> list[str]:
        return list(dict.fromkeys(s.analysis_key() for s in self.per_image_steps()))

    @property
    def fitted(self) -> bool:
        return any(s.fitted for s in self.steps)

    def problems(self) -> list[str]:
        where = f"preprocessing variant {self.name!r}"
        problems = []
        if self.name == NONE and self.steps:
            problems.append(f"{where}: the name 'none' is reserved for no preprocessing; rename the variant")
        if self.name != NONE and not self.steps:
            problems.append(f"{where}: no steps; it would repeat 'none'")
        if sum(1 for s in self.steps if s.views) > 1:
            problems.append(f"{where}: at most one step may draw training views")
        if self.reference_source and not self.fitted:
            problems.append(f"{where}: reference_source is given, but no step is fitted (stain, white_balance)")
        if self.reference_source and not Path(self.reference_source).expanduser().exists():
            problems.append(
                f"{where}: reference_source {self.reference_source!r} does not exist (relative to "
                f"{Path.cwd()}); give a folder or manifest of reference images outside the study"
            )
        return problems


def variants(cfg: Mapping[str, Any]) -> dict[str, Variant]:
    """The config's preprocessing variants by name (``none`` alone when none is configured)."""
    entries = cfg.get("preprocessing") or [{"name": NONE}]
    return {v.name: v for v in (Variant.from_dict(e) for e in entries)}


def variant_of(cfg: Mapping[str, Any], name: str) -> Variant:
    if name == NONE:
        return variants(cfg).get(NONE, Variant())
    found = variants(cfg)
    if name not in found:
        raise LeukotypeError(f"unknown preprocessing variant {name!r}; configured: {sorted(found)}")
    return found[name]


def fits_per_fold(variant: Variant, split_cfg: Mapping[str, Any] | None) -> bool:
    """Whether ``variant``'s fitted steps are fitted once per fold, on that fold's training
    part: k-fold (every image is a test image in one fold, so no image could serve every
    fold) and no ``reference_source`` (images outside the study, which serve every fold)."""
    return variant.fitted and not variant.reference_source and (split_cfg or {}).get("method") == "kfold"


def per_fold_variants(cfg: Mapping[str, Any]) -> set[str]:
    """Names of the config's variants fitted per fold (:func:`fits_per_fold`)."""
    return {name for name, v in variants(cfg).items() if fits_per_fold(v, cfg.get("split"))}


def fitted_variant_name(variant: str, fold: str, per_fold: Collection[str]) -> str:
    """The name under which ``variant``'s fitted state and its frozen features for runs of
    ``fold`` live: ``<variant>.<fold>`` when it is fitted per fold (``per_fold``: the names
    :func:`per_fold_variants` gives), else the variant's own (one state serves every fold)."""
    return paths.fold_fitted(variant, fold) if variant in per_fold else variant


def fold_fitted_variants(cfg: Mapping[str, Any], folds: Sequence[str]) -> dict[str, Variant]:
    """One copy of each per-fold variant per fold, named ``<variant>.<fold>``: the variants
    whose states are fitted and whose frozen features are extracted (runs keep the variant's
    own name)."""
    per_fold = per_fold_variants(cfg)
    return {
        paths.fold_fitted(name, fold): dataclasses.replace(variant, name=paths.fold_fitted(name, fold))
        for name, variant in variants(cfg).items()
        if name in per_fold
        for fold in folds
    }


def check_preprocessing_config(cfg: Mapping[str, Any]) -> list[str]:
    """Problems of the ``preprocessing`` list: unknown steps or settings, duplicate names, a
    ``none`` with steps."""
    entries = cfg.get("preprocessing") or []
    names = [str(e.get("name")) for e in entries]
    problems = [f"preprocessing: variant name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for i, entry in enumerate(entries):
        try:
            variant = Variant.from_dict(entry)
        except LeukotypeError as err:
            problems.append(f"preprocessing[{i}]: {err}")
            continue
        problems += variant.problems()
    return problems


# --------------------------------------------------------------------------------------------
# applying a variant inside a data loader


class ImagePreparer:
    """``(image, abspath, transform) -> image``: a variant's steps in order, each with its
    context (per-image row by abspath, fitted state, the sample's colour view, the image's
    md5). Picklable, so data-loader workers can use it."""

    def __init__(
        self,
        variant: Variant,
        analyses: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
        states: Sequence[Mapping[str, Any] | None] | None = None,
        keys: Mapping[str, str] | None = None,
    ) -> None:
        self.variant = variant
        self.analyses = {k: dict(v) for k, v in (analyses or {}).items()}
        self.states = list(states) if states is not None else [None] * len(variant.steps)
        if len(self.states) != len(variant.steps):
            raise LeukotypeError(f"variant {variant.name!r}: {len(self.states)} states for {len(variant.steps)} steps")
        self.keys = dict(keys or {})

    def analysis(self, step: Step, image: Image.Image, abspath: str) -> Mapping[str, Any]:
        table = self.analyses.get(step.analysis_key(), {})
        row = table.get(str(abspath))
        return row if row is not None else step.analyse(image)

    def __call__(self, image: Image.Image, abspath: str, transform: str = "identity") -> Image.Image:
        original, view = image, colour_view(transform)
        if view > self.variant.views:
            raise LeukotypeError(
                f"sample {abspath} asks for {transform!r}, but variant {self.variant.name!r} draws "
                f"{self.variant.views} colour views"
            )
        key = self.keys.get(str(abspath), str(abspath))
        for step, state in zip(self.variant.steps, self.states):
            analysis = self.analysis(step, original, abspath) if step.per_image else None
            image = step.apply(image, StepContext(analysis=analysis, state=state, view=view, key=key))
        return image

    def record(self) -> dict[str, Any]:
        """What a model bundle stores to prepare new images the same way (per-image rows are
        recomputed from each new image)."""
        return {"variant": self.variant.to_dict(), "states": [dict(s) if s else None for s in self.states]}


def preparer_from_record(record: Mapping[str, Any] | None) -> ImagePreparer | None:
    """The preparer of a bundle's ``image_steps`` record (None: the images as they are). A step
    kind this version lacks is refused with its name."""
    if not record:
        return None
    variant = Variant.from_dict(record["variant"])
    return None if variant.is_identity else ImagePreparer(variant, states=record.get("states"))


def read_analysis_table(path: str | Path) -> dict[str, dict[str, Any]]:
    """abspath -> row of a per-image table (``images.tsv``)."""
    import pandas as pd

    table = pd.read_csv(path, sep="\t", keep_default_na=False, dtype=str)
    return {row["abspath"]: row for row in table.to_dict("records")}


def preparer_for(
    variant_record: Mapping[str, Any] | None,
    files: Sequence[str | Path] = (),
    keys: Mapping[str, str] | None = None,
) -> ImagePreparer | None:
    """The preparer of a workflow job: its variant (a rule param), its preprocessing inputs
    (the per-image tables ``<key>/images.tsv`` and the variant's ``state.json``) and the
    images' md5 (``keys``: abspath -> md5). None for ``none``."""
    variant = Variant.from_dict(variant_record)
    if variant.is_identity:
        return None
    analyses, states = {}, None
    for path in map(Path, files):
        if path.name == ANALYSIS_TABLE:
            analyses[path.parent.name] = read_analysis_table(path)
        elif path.name == STATE_FILE:
            states = json.loads(path.read_text(encoding="utf-8"))["states"]
    missing = [k for k in variant.analysis_keys() if k not in analyses]
    if missing:
        raise LeukotypeError(f"variant {variant.name!r}: per-image table(s) {missing} not given to the job")
    if variant.fitted and states is None:
        raise LeukotypeError(f"variant {variant.name!r}: its fitted state ({STATE_FILE}) was not given to the job")
    return ImagePreparer(variant, analyses, states, keys)


def analysis_table(step: Step, validated: Any) -> Any:
    """The per-image table of ``step`` for every valid image of a validated table."""
    import pandas as pd

    from leukotype.images import load_rgb

    ok = validated[validated["status"] == "ok"]
    rows = [
        {"image_id": i, "path": p, "abspath": a, **step.analyse(load_rgb(a))}
        for i, p, a in zip(ok["image_id"], ok["path"], ok["abspath"])
    ]
    columns = ["image_id", "path", "abspath", "status", "reason", *step.analysis_columns]
    return pd.DataFrame(rows, columns=columns)


def reference_image_ids(splits: Sequence[Any], n: int, seed: int, fold: str | None = None) -> list[str]:
    """At most ``n`` images (seeded sample) that are training images and never a test image in
    any fold of any task's split table, or, with ``fold``, in that fold of every task's split
    (a state fitted per fold): what a fitted step may see."""
    train, test = set(), set()
    for table in splits:
        if fold is not None:
            table = table[table["fold"].astype(str) == fold]
            if table.empty:
                raise LeukotypeError(f"fold {fold!r} is in no split table; a state fitted per fold needs it")
        train |= set(table.loc[table["part"] == "train", "image_id"].astype(str))
        test |= set(table.loc[table["part"] == "test", "image_id"].astype(str))
    candidates = sorted(train - test)
    if not candidates:
        where = f"of fold {fold!r}" if fold is not None else "in every fold"
        raise LeukotypeError(f"no image is a training image {where} of every task's split: a fitted preprocessing step has nothing to fit on")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(candidates, size=min(n, len(candidates)), replace=False).tolist())


def fit_variant(
    variant: Variant,
    images: Sequence[tuple[str, Image.Image]],
    analyses: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> list[dict[str, Any] | None]:
    """Each step's state: a fitted step sees ``images`` (abspath, decoded image) as the steps
    before it (with their states) leave them."""
    states: list[dict[str, Any] | None] = [None] * len(variant.steps)
    for i, step in enumerate(variant.steps):
        if not step.fitted:
            continue
        before = ImagePreparer(Variant(variant.name, variant.steps[:i]), analyses, states[:i])
        rows = [before.analysis(step, image, path) for path, image in images] if step.per_image else []
        states[i] = step.fit([before(image, path) for path, image in images], rows)
    return states

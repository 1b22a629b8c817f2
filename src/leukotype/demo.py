"""Synthetic FAB-like leukemia cells: an offline demo dataset (NOT real data).

Each synthetic cell is rendered as optical densities (Beer-Lambert: intensity = 255 * exp(-OD)),
the way stain absorbs light, from analytic shapes plus a little texture:

- L1: small uniform blasts, round nucleus, scant deep-blue cytoplasm, no visible nucleoli.
- L2: larger cells, irregular (cleft) nuclei with visible nucleoli, more cytoplasm.
- M2: oval eccentric nucleus, azurophilic granules in the cytoplasm, occasional Auer rod.
- M3: heavy granulation (also over the nucleus), bilobed nucleus, Auer rods more often.
- M5: large cells, folded/kidney-shaped nucleus, abundant grey-blue cytoplasm, vacuoles.

Per-patient stain variation (hue and intensity), per-patient cell size, per-cell size, position,
rotation and shape jitter, neighbouring red cells and pixel noise keep the classes learnable
without any single pixel statistic separating them. Each cell yields two images with the same
``group`` (the synthetic patient): the segmented nucleus (``element=nucleus``) and the whole
cell (``element=cellula``), as in Khan & Tehsin (2022).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from leukotype.errors import LeukotypeError
from leukotype.io import atomic_write

Point = tuple[float, float]
Circle = tuple[float, float, float]  # x, y, radius

SUBTYPES = ("L1", "L2", "M2", "M3", "M5")
ELEMENTS = ("nucleus", "cellula")
#: Rendering happens at this multiple of the output size, then is box-downsampled. 1 is enough:
#: every edge is already soft (anti-aliased analytically); 2 looks the same at 2.7x the cost.
SUPERSAMPLE = 1
#: Nucleus crop side / the nucleus' bounding-box side (a segmented nucleus, cropped with margin).
NUCLEUS_MARGIN = 1.2

# Stain colours as optical density per RGB channel (-ln(I/255)); e.g. the nucleus absorbs red
# and green and looks purple.
OD_BACKGROUND = np.array([0.05, 0.10, 0.08], dtype=np.float32)
OD_RBC = np.array([0.12, 0.42, 0.36], dtype=np.float32)
OD_CHROMATIN = np.array([1.05, 1.70, 0.70], dtype=np.float32)
OD_NUCLEOLUS = np.array([0.45, 0.55, 0.20], dtype=np.float32)
OD_AZUROPHIL = np.array([0.85, 2.00, 0.95], dtype=np.float32)
OD_AUER = np.array([0.55, 1.90, 1.00], dtype=np.float32)


@dataclass(frozen=True)
class Morphology:
    """Class-level drawing parameters (radii are fractions of the image side)."""

    cell_radius: float
    nucleus_ratio: float  # nucleus radius / cell radius
    nucleus_shape: str  # round | irregular | oval | bilobed | kidney
    eccentricity: float  # nucleus centre offset / (cell radius - nucleus radius)
    irregularity: float  # amplitude of the nuclear outline's harmonics
    chromatin_density: float
    chromatin_texture: float  # amplitude of chromatin clumping
    chromatin_grain: int  # texture grid: larger = finer chromatin
    cytoplasm_od: tuple[float, float, float]
    nucleoli: tuple[int, int]  # inclusive range
    granules: tuple[int, int]
    granules_over_nucleus: bool
    auer_probability: float
    max_auer_rods: int
    vacuoles: tuple[int, int]


# fmt: off
# Fields in order: cell radius, nucleus/cell ratio, nucleus shape, eccentricity, irregularity,
# chromatin density, texture, grain, cytoplasm OD (RGB), nucleoli, granules, granules over the
# nucleus, P(Auer rods), most rods, vacuoles.
MORPHOLOGY: dict[str, Morphology] = {
    "L1": Morphology(0.21, 0.84, "round", 0.2, 0.025, 1.10, 0.18, 8, (0.55, 0.40, 0.10),
                     (0, 0), (0, 0), False, 0.0, 0, (0, 0)),
    "L2": Morphology(0.29, 0.74, "irregular", 0.3, 0.09, 0.90, 0.30, 12, (0.42, 0.33, 0.10),
                     (1, 3), (0, 2), False, 0.0, 0, (0, 1)),
    "M2": Morphology(0.29, 0.64, "oval", 0.6, 0.04, 0.95, 0.28, 12, (0.36, 0.34, 0.14),
                     (1, 2), (10, 30), False, 0.35, 1, (0, 1)),
    "M3": Morphology(0.30, 0.64, "bilobed", 0.3, 0.05, 0.95, 0.28, 12, (0.30, 0.38, 0.20),
                     (0, 1), (70, 140), True, 0.25, 3, (0, 0)),
    "M5": Morphology(0.34, 0.58, "kidney", 0.4, 0.05, 0.80, 0.38, 20, (0.36, 0.33, 0.20),
                     (0, 1), (0, 8), False, 0.0, 0, (1, 4)),
}
# fmt: on


@dataclass(frozen=True)
class Stain:
    """Per-patient staining: optical density scale and a per-channel (hue) gain."""

    intensity: float
    channel_gain: np.ndarray
    background_gain: float
    size_factor: float  # patients differ a little in typical cell size too


def patient_stain(rng: np.random.Generator) -> Stain:
    gain = rng.normal(1.0, 0.12, 3).clip(0.7, 1.3)
    return Stain(
        intensity=float(rng.uniform(0.75, 1.25)),
        channel_gain=(gain / gain.mean()).astype(np.float32),
        background_gain=float(rng.uniform(0.5, 1.6)),
        size_factor=float(rng.normal(1.0, 0.05)),
    )


# ------------------------------------------------------------------------------------------
# small helpers


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A Python float: NumPy float64 scalars would silently promote float32 grids."""
    return float(rng.uniform(low, high))


def _normal(rng: np.random.Generator, mean: float, sd: float) -> float:
    return float(rng.normal(mean, sd))


def _disc_points(
    rng: np.random.Generator, n: int, centre: Point, r_lo: float, r_hi: float
) -> list[Point]:
    """``n`` points uniformly distributed in the annulus ``r_lo..r_hi`` around ``centre``."""
    r_hi = max(r_hi, r_lo)  # a nucleus filling the cell leaves a thin ring only
    radius = np.sqrt(rng.uniform(r_lo**2, r_hi**2, n))
    angle = rng.uniform(0, 2 * np.pi, n)
    return [
        (centre[0] + float(r * math.cos(a)), centre[1] + float(r * math.sin(a)))
        for r, a in zip(radius, angle)
    ]


# ------------------------------------------------------------------------------------------
# a cell is planned once (all random draws), then painted into any view (whole cell, nucleus)


@dataclass(frozen=True)
class CellPlan:
    """Geometry and stain of one cell, in image coordinates (unit = image side, origin at the
    centre, y down), independent of the resolution it is painted at."""

    morph: Morphology
    centre: Point
    rotation: float
    cell_r: float
    cell_wobble: tuple[list[float], list[float]]
    nucleus_centre: Point
    nucleus_r: float
    nucleus_shape: dict[str, Any]
    nucleoli: list[Circle]
    vacuoles: list[Circle]
    granules: list[Circle]
    rods: list[tuple[Point, Point]]
    red_cells: list[Circle]
    chromatin_grid: np.ndarray  # random fields over [-1, 1]^2, interpolated per view
    cytoplasm_grid: np.ndarray
    background_grid: np.ndarray
    cytoplasm_od: np.ndarray
    noise_sigma: float


def _nucleus_shape_params(
    shape: str, morph: Morphology, rng: np.random.Generator
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "shape": shape,
        "harmonics": (rng.normal(0.0, morph.irregularity, 4) / np.arange(1, 5)).tolist(),
        "phases": rng.uniform(0, 2 * np.pi, 4).tolist(),
    }
    if shape == "oval":
        params["aspect"] = _uniform(rng, 1.15, 1.4)
    elif shape == "irregular":  # a cleft: a narrow groove from the outline inwards
        params.update(
            groove_angle=_uniform(rng, 0, 2 * np.pi),
            groove_depth=_uniform(rng, 0.35, 0.6),
            groove_width=_uniform(rng, 0.10, 0.18),
        )
    elif shape == "bilobed":
        params.update(
            lobe=_uniform(rng, 0.62, 0.7),
            gap=_uniform(rng, 0.42, 0.55),
            shift=_normal(rng, 0, 0.1),
            second=_uniform(rng, 0.85, 1.0),
        )
    elif shape == "kidney":
        params.update(bite_r=_uniform(rng, 0.45, 0.6), bite_x=_uniform(rng, 0.85, 1.0))
    elif shape != "round":
        raise ValueError(f"unknown nucleus shape {shape!r}")
    return params


def plan_cell(subtype: str, stain: Stain, rng: np.random.Generator) -> CellPlan:
    """Draw every random choice of one cell of ``subtype``."""
    morph = MORPHOLOGY[subtype]
    cell_r = float(
        np.clip(morph.cell_radius * stain.size_factor * _normal(rng, 1.0, 0.08), 0.15, 0.45)
    )
    centre = (_uniform(rng, -0.05, 0.05), _uniform(rng, -0.05, 0.05))
    rotation = _uniform(rng, 0, 2 * np.pi)
    cell_wobble = (rng.normal(0, 0.025, 3).tolist(), rng.uniform(0, 2 * np.pi, 3).tolist())
    nucleus_r = cell_r * float(np.clip(morph.nucleus_ratio * _normal(rng, 1.0, 0.06), 0.4, 0.92))
    offset = morph.eccentricity * (cell_r - nucleus_r) * _uniform(rng, 0.3, 1.0)
    direction = _uniform(rng, 0, 2 * np.pi)
    nucleus_centre = (
        centre[0] + offset * math.cos(direction),
        centre[1] + offset * math.sin(direction),
    )
    nucleus_shape = _nucleus_shape_params(morph.nucleus_shape, morph, rng)

    def count(bounds: tuple[int, int]) -> int:
        return int(rng.integers(bounds[0], bounds[1] + 1))

    n = count(morph.nucleoli)
    nucleoli = [
        (x, y, nucleus_r * _uniform(rng, 0.11, 0.17))
        for x, y in _disc_points(rng, n, nucleus_centre, 0.0, 0.5 * nucleus_r)
    ]
    n = count(morph.vacuoles)
    vacuoles = [
        (x, y, cell_r * _uniform(rng, 0.04, 0.08))
        for x, y in _disc_points(rng, n, centre, nucleus_r * 1.05, cell_r * 0.9)
    ]
    n = count(morph.granules)
    inner = 0.0 if morph.granules_over_nucleus else 0.5 * nucleus_r
    granules = [
        (x, y, _uniform(rng, 0.6, 1.3) / 96)  # about 1 pixel at the default size
        for x, y in _disc_points(rng, n, centre, inner, cell_r * 0.92)
    ]
    rods: list[tuple[Point, Point]] = []
    if rng.random() < morph.auer_probability:  # several at once: "faggot" cells in M3
        for _ in range(int(rng.integers(1, morph.max_auer_rods + 1))):
            ((mx, my),) = _disc_points(rng, 1, centre, nucleus_r * 1.05, cell_r * 0.85)
            angle = _uniform(rng, 0, 2 * np.pi)
            half = cell_r * _uniform(rng, 0.2, 0.35)
            dx, dy = half * math.cos(angle), half * math.sin(angle)
            rods.append(((mx - dx, my - dy), (mx + dx, my + dy)))
    red_cells = []
    for _ in range(int(rng.integers(0, 4))):
        angle, distance = _uniform(rng, 0, 2 * np.pi), _uniform(rng, 0.45, 0.7)
        red_cells.append(
            (distance * math.cos(angle), distance * math.sin(angle), _uniform(rng, 0.17, 0.22))
        )
    grain = morph.chromatin_grain
    return CellPlan(
        morph=morph,
        centre=centre,
        rotation=rotation,
        cell_r=cell_r,
        cell_wobble=cell_wobble,
        nucleus_centre=nucleus_centre,
        nucleus_r=nucleus_r,
        nucleus_shape=nucleus_shape,
        nucleoli=nucleoli,
        vacuoles=vacuoles,
        granules=granules,
        rods=rods,
        red_cells=red_cells,
        chromatin_grid=rng.random((2 * grain, 2 * grain)).astype(np.float32),
        cytoplasm_grid=rng.random((12, 12)).astype(np.float32),
        background_grid=rng.random((8, 8)).astype(np.float32),
        cytoplasm_od=np.array(morph.cytoplasm_od, dtype=np.float32) * _normal(rng, 1.0, 0.08),
        noise_sigma=_uniform(rng, 2.0, 5.0),
    )


@dataclass(frozen=True)
class View:
    """A square window of the image plane (top-left ``x0, y0``, side ``extent``) painted at
    ``pixels`` x ``pixels``."""

    x0: float
    y0: float
    extent: float
    pixels: int

    @property
    def pixel(self) -> float:
        return self.extent / self.pixels

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        steps = (np.arange(self.pixels, dtype=np.float32) + 0.5) * np.float32(self.pixel)
        return np.meshgrid(steps + np.float32(self.x0), steps + np.float32(self.y0))


# ------------------------------------------------------------------------------------------
# shapes on a grid: soft masks in [0, 1]


def _soft(signed_distance: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (negative distance), 0 outside, a smooth edge ``edge`` wide."""
    return np.clip(0.5 - signed_distance / edge, 0.0, 1.0)


def _polar_blob(
    x: np.ndarray,
    y: np.ndarray,
    radius: float,
    harmonics: Sequence[float],
    phases: Sequence[float],
    edge: float,
    aspect: float = 1.0,
) -> np.ndarray:
    """Star-shaped blob r(phi) = radius * (1 + sum_k a_k cos(k phi + p_k)), k = 2, 3, ..."""
    xs = x / aspect
    rho = np.hypot(xs, y)
    # cos(k phi + p) = Re(e^{i phi})^k e^{ip}): powers of the unit phasor are much cheaper
    # than one trigonometric call per harmonic.
    phasor = (xs + 1j * y) / np.maximum(rho, 1e-9)
    power = phasor * phasor
    wobble = np.zeros_like(rho)
    for amplitude, phase in zip(harmonics, phases):
        wobble += amplitude * (power * np.exp(1j * phase)).real
        power = power * phasor
    return _soft(rho - radius * (1.0 + wobble), edge)


def _segment(
    x: np.ndarray, y: np.ndarray, a: Point, b: Point, width: float, edge: float
) -> np.ndarray:
    """Soft thick line segment from ``a`` to ``b``."""
    abx, aby = b[0] - a[0], b[1] - a[1]
    t = np.clip(((x - a[0]) * abx + (y - a[1]) * aby) / (abx * abx + aby * aby), 0.0, 1.0)
    distance = np.hypot(x - a[0] - t * abx, y - a[1] - t * aby)
    return _soft(distance - width / 2, edge)


def _nucleus_mask(
    x: np.ndarray, y: np.ndarray, radius: float, p: dict[str, Any], edge: float
) -> np.ndarray:
    """Nucleus in local coordinates (centred on the nucleus, rotated with the cell)."""
    harmonics, phases = p["harmonics"], p["phases"]
    shape = p["shape"]
    if shape == "round":
        return _polar_blob(x, y, radius, harmonics, phases, edge)
    if shape == "oval":
        aspect = p["aspect"]
        return _polar_blob(x, y, radius / math.sqrt(aspect), harmonics, phases, edge, aspect)
    if shape == "irregular":
        blob = _polar_blob(x, y, radius, [1.5 * a for a in harmonics], phases, edge)
        c, s = math.cos(p["groove_angle"]), math.sin(p["groove_angle"])
        inner = radius * (1.0 - p["groove_depth"])
        groove = _segment(
            x,
            y,
            (1.2 * radius * c, 1.2 * radius * s),
            (inner * c, inner * s),
            radius * p["groove_width"],
            edge,
        )
        return np.minimum(blob, 1.0 - 0.7 * groove)  # a fold: thinner, not a hole
    if shape == "bilobed":
        lobe, gap = radius * p["lobe"], radius * p["gap"]
        a = _polar_blob(x - gap, y, lobe, harmonics, phases, edge)
        b = _polar_blob(
            x + gap, y + p["shift"] * lobe, lobe * p["second"], harmonics[::-1], phases, edge
        )
        waist = _segment(x, y, (-gap, 0.0), (gap, 0.0), lobe * 0.5, edge)
        return np.maximum(np.maximum(a, b), waist)
    if shape == "kidney":
        blob = _polar_blob(x, y, radius, harmonics, phases, edge, aspect=1.12)
        bite = _soft(np.hypot(x - radius * p["bite_x"], y) - radius * p["bite_r"], edge)
        return np.minimum(blob, 1.0 - bite)
    raise ValueError(f"unknown nucleus shape {shape!r}")


def _field(grid: np.ndarray, view: View) -> np.ndarray:
    """Smooth random field: ``grid`` spans [-1, 1]^2, bicubically interpolated on ``view``."""
    size = grid.shape[0]
    scale = size / 2.0  # grid cells per image-side unit
    field = Image.fromarray(grid, mode="F").transform(
        (view.pixels, view.pixels),
        Image.AFFINE,
        (
            view.pixel * scale,
            0.0,
            (view.x0 + 1.0) * scale,
            0.0,
            view.pixel * scale,
            (view.y0 + 1.0) * scale,
        ),
        resample=Image.BICUBIC,
    )
    return np.asarray(field, dtype=np.float32)


def _dots(view: View, circles: Sequence[Circle], blur: float) -> np.ndarray:
    """Discs drawn with PIL (cheap for many small granules), blurred by ``blur`` (image units);
    values in [0, 1]."""
    layer = Image.new("L", (view.pixels, view.pixels), 0)
    draw = ImageDraw.Draw(layer)
    for x, y, r in circles:
        px, py, pr = (x - view.x0) / view.pixel, (y - view.y0) / view.pixel, r / view.pixel
        draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=255)
    if blur > 0:
        layer = layer.filter(ImageFilter.GaussianBlur(blur / view.pixel))
    return np.asarray(layer, dtype=np.float32) / 255.0


# ------------------------------------------------------------------------------------------
# painting


def paint(
    plan: CellPlan, stain: Stain, view: View, nucleus_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Optical density image (pixels, pixels, 3) of ``plan`` in ``view``, and the nucleus mask.

    ``nucleus_only``: the segmented nucleus on plain background (granules over it kept).
    """
    morph = plan.morph
    gx, gy = view.grid()
    edge = 1.5 * view.pixel
    cos, sin = math.cos(plan.rotation), math.sin(plan.rotation)

    def local(origin: Point) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = gx - origin[0], gy - origin[1]
        return cos * dx + sin * dy, -sin * dx + cos * dy

    def stained(od: np.ndarray) -> np.ndarray:
        return od * stain.channel_gain * np.float32(stain.intensity)

    cell = _polar_blob(*local(plan.centre), plan.cell_r, *plan.cell_wobble, edge)
    nucleus = np.minimum(
        _nucleus_mask(*local(plan.nucleus_centre), plan.nucleus_r, plan.nucleus_shape, edge), cell
    )
    # Chromatin: clumped texture; nucleoli are pale holes in it.
    chromatin = morph.chromatin_density * (
        1.0 + morph.chromatin_texture * (_field(plan.chromatin_grid, view) - 0.5) * 2
    )
    nucleoli = _dots(view, plan.nucleoli, blur=0.01) * nucleus if plan.nucleoli else 0.0
    chromatin = chromatin * (1.0 - 0.75 * nucleoli)
    nucleus_od = (nucleus * chromatin)[..., None] * stained(OD_CHROMATIN) + (nucleoli * nucleus)[
        ..., None
    ] * stained(OD_NUCLEOLUS)
    background = (0.9 + 0.2 * _field(plan.background_grid, view))[..., None] * (
        OD_BACKGROUND * np.float32(stain.background_gain)
    )
    granules = _dots(view, plan.granules, blur=0.006) * cell if plan.granules else None
    if nucleus_only:
        od = background + nucleus_od
        if granules is not None and morph.granules_over_nucleus:
            od = od + (granules * nucleus)[..., None] * stained(OD_AZUROPHIL)
        return od, nucleus

    # Cytoplasm (under the nucleus too: densities add), vacuoles as pale holes.
    cytoplasm = cell * (0.85 + 0.3 * _field(plan.cytoplasm_grid, view))
    if plan.vacuoles:
        cytoplasm = cytoplasm * (1.0 - 0.8 * _dots(view, plan.vacuoles, blur=0.01))
    od = background + nucleus_od + cytoplasm[..., None] * stained(plan.cytoplasm_od)
    if granules is not None:
        if not morph.granules_over_nucleus:
            granules = granules * (1.0 - nucleus)
        od = od + granules[..., None] * stained(OD_AZUROPHIL)
    if plan.rods:
        rods = np.zeros_like(cell)
        for a, b in plan.rods:
            rods = np.maximum(rods, _segment(gx, gy, a, b, 2.2 / 96, edge))
        od = od + (rods * cell)[..., None] * stained(OD_AUER)
    # Neighbouring red cells (with central pallor), behind the cell.
    if plan.red_cells:
        red = np.zeros_like(cell)
        for x, y, r in plan.red_cells:
            rho = np.hypot(gx - x, gy - y)
            red = np.maximum(red, _soft(rho - r, edge) * (1.0 - 0.55 * _soft(rho - 0.5 * r, 0.06)))
        od = od + (red * (1.0 - cell))[..., None] * stained(OD_RBC)
    return od, nucleus


def nucleus_view(view: View, nucleus: np.ndarray, pixels: int) -> View:
    """Square window around the nucleus (its bounding box plus a margin), as a segmentation
    followed by a crop would give."""
    rows = np.flatnonzero((nucleus > 0.5).any(axis=1))
    cols = np.flatnonzero((nucleus > 0.5).any(axis=0))
    x_lo, x_hi = view.x0 + cols[0] * view.pixel, view.x0 + (cols[-1] + 1) * view.pixel
    y_lo, y_hi = view.y0 + rows[0] * view.pixel, view.y0 + (rows[-1] + 1) * view.pixel
    side = NUCLEUS_MARGIN * max(x_hi - x_lo, y_hi - y_lo)
    return View(float(x_lo + x_hi - side) / 2, float(y_lo + y_hi - side) / 2, float(side), pixels)


@dataclass(frozen=True)
class CellImages:
    cellula: Image.Image
    nucleus: Image.Image


def render_cell(
    subtype: str, stain: Stain, rng: np.random.Generator, image_size: int, zoom: float = 1.0
) -> CellImages:
    """Draw one synthetic cell: whole-cell image and the segmented-nucleus image.

    ``zoom`` > 1 magnifies: the whole-cell image frames the cell more tightly (another lab's
    microscope and cropping)."""
    plan = plan_cell(subtype, stain, rng)
    pixels = image_size * SUPERSAMPLE
    whole_view = View(-0.5, -0.5, 1.0, pixels)
    if zoom != 1.0:
        cx, cy = plan.centre
        whole_view = View(cx - 0.5 / zoom, cy - 0.5 / zoom, 1.0 / zoom, pixels)
    whole_od, nucleus = paint(plan, stain, whole_view)
    nucleus_od, _ = paint(plan, stain, nucleus_view(whole_view, nucleus, pixels), nucleus_only=True)
    return CellImages(
        cellula=_to_image(whole_od, image_size, rng, plan.noise_sigma),
        nucleus=_to_image(nucleus_od, image_size, rng, plan.noise_sigma),
    )


def _to_image(
    od: np.ndarray, image_size: int, rng: np.random.Generator, noise_sigma: float
) -> Image.Image:
    """Optical density -> 8-bit RGB at ``image_size``, with sensor noise."""
    intensity = 255.0 * np.exp(-od.astype(np.float32))
    img = Image.fromarray(np.clip(intensity, 0, 255).round().astype(np.uint8), mode="RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BOX)
    noise = rng.normal(0.0, noise_sigma, (image_size, image_size, 3)).astype(np.float32)
    arr = np.asarray(img, dtype=np.float32) + noise
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="RGB")


# ------------------------------------------------------------------------------------------
# the dataset


README_TEXT = """\
SYNTHETIC DEMO DATA - NOT REAL CELLS, NOT FOR ANY MEDICAL OR SCIENTIFIC CONCLUSION.

Generated by `python -m leukotype.demo` (leukotype.demo.make_demo_dataset) with
seed={seed}, n_patients_per_subtype={patients}, cells_per_patient={cells},
image_size={size}. The images are drawn programmatically: cartoons of the FAB
morphology of acute-leukemia blasts (L1, L2, M2, M3, M5) with random stain,
size, position, rotation and noise. They exist so that the workflow can run
end to end offline; accuracies measured on them say nothing about real data.

manifest.csv columns: path (relative to this folder), subtype (L1 L2 M2 M3 M5),
element (nucleus = segmented nucleus, cellula = whole cell) and group (the
synthetic patient; both images of a cell and all cells of a patient share it,
so group-aware splits keep a patient on one side).
"""


def make_demo_dataset(
    out_dir: str | os.PathLike,
    n_patients_per_subtype: int = 4,
    cells_per_patient: int = 6,
    image_size: int = 96,
    seed: int = 0,
) -> Path:
    """Write the synthetic dataset under ``out_dir``; return the path of its ``manifest.csv``.

    Files: ``images/<subtype>/synthetic_<subtype>_p<PP>_c<CC>_<element>.png``,
    ``manifest.csv`` (``path,subtype,element,group``) and ``README.txt``. The bytes depend only
    on the arguments (each cell has its own seeded generator).
    """
    if n_patients_per_subtype < 1 or cells_per_patient < 1:
        raise LeukotypeError(
            f"need at least one patient and one cell (got n_patients_per_subtype="
            f"{n_patients_per_subtype}, cells_per_patient={cells_per_patient})"
        )
    if image_size < 32:
        raise LeukotypeError(f"image_size must be >= 32 pixels (got {image_size})")
    if seed < 0:
        raise LeukotypeError(f"seed must be a non-negative integer (got {seed})")
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    # The manifest is the completion marker, written last and atomically: remove an old one
    # first so an interrupted run can never leave a manifest next to half-written images.
    # (Images are written directly: a temp file + rename per image tripled the wall time.)
    manifest.unlink(missing_ok=True)
    rows: list[tuple[str, str, str, str]] = []
    for s_index, subtype in enumerate(SUBTYPES):
        folder = out_dir / "images" / subtype
        folder.mkdir(parents=True, exist_ok=True)
        for patient in range(n_patients_per_subtype):
            group = f"synthetic-{subtype}-p{patient:02d}"
            stain = patient_stain(np.random.default_rng([seed, 1, s_index, patient]))
            for cell in range(cells_per_patient):
                rng = np.random.default_rng([seed, 2, s_index, patient, cell])
                images = render_cell(subtype, stain, rng, image_size)
                for element in ELEMENTS:
                    name = f"synthetic_{subtype}_p{patient:02d}_c{cell:02d}_{element}.png"
                    # Level 1: noisy images barely compress better at higher levels.
                    getattr(images, element).save(folder / name, format="PNG", compress_level=1)
                    rows.append((f"images/{subtype}/{name}", subtype, element, group))
    with atomic_write(out_dir / "README.txt") as handle:
        handle.write(
            README_TEXT.format(
                seed=seed, patients=n_patients_per_subtype, cells=cells_per_patient, size=image_size
            )
        )
    with atomic_write(manifest, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "subtype", "element", "group"])
        writer.writerows(rows)
    return manifest


#: The external demo lab: another stain (redder chromatin, darker yellowish background) and
#: magnification (cells framed tightly, as many labs crop them).
EXTERNAL_STAIN = Stain(
    intensity=1.15,
    channel_gain=np.array([0.8, 1.05, 1.15], dtype=np.float32),
    background_gain=3.0,
    size_factor=1.0,
)
EXTERNAL_ZOOM = 1.6


def make_demo_external(
    out_dir: str | os.PathLike, cells_per_subtype: int = 4, image_size: int = 96, seed: int = 0
) -> Path:
    """Write the demo's SYNTHETIC external test set under ``out_dir``; return its manifest.

    The same FAB-like classes as :func:`make_demo_dataset` (manifest columns ``path, subtype,
    element, group``), drawn with :data:`EXTERNAL_STAIN` at :data:`EXTERNAL_ZOOM`: a model
    trained on the demo data meets a stain and scale shift, as with another lab's images.
    """
    if cells_per_subtype < 1:
        raise LeukotypeError(f"need at least one cell per subtype (got {cells_per_subtype})")
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    manifest.unlink(missing_ok=True)
    rows: list[tuple[str, str, str, str]] = []
    for s_index, subtype in enumerate(SUBTYPES):
        folder = out_dir / "images" / subtype
        folder.mkdir(parents=True, exist_ok=True)
        for cell in range(cells_per_subtype):
            rng = np.random.default_rng([seed, 3, s_index, cell])
            images = render_cell(subtype, EXTERNAL_STAIN, rng, image_size, zoom=EXTERNAL_ZOOM)
            for element in ELEMENTS:
                name = f"external_{subtype}_c{cell:02d}_{element}.png"
                getattr(images, element).save(folder / name, format="PNG", compress_level=1)
                rows.append((f"images/{subtype}/{name}", subtype, element, f"external-{subtype}-c{cell:02d}"))
    with atomic_write(out_dir / "README.txt") as handle:
        handle.write("SYNTHETIC external demo set (another stain and magnification) - NOT REAL CELLS.\n")
    with atomic_write(manifest, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "subtype", "element", "group"])
        writer.writerows(rows)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m leukotype.demo",
        description="Write a SYNTHETIC FAB-like leukemia cell dataset (offline demo data).",
    )
    parser.add_argument("out_dir", type=Path, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patients", type=int, default=4, help="patients per subtype")
    parser.add_argument("--cells", type=int, default=6, help="cells per patient")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = make_demo_dataset(args.out_dir, args.patients, args.cells, args.size, args.seed)
    except LeukotypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_images = len(SUBTYPES) * args.patients * args.cells * len(ELEMENTS)
    print(
        f"wrote {n_images} synthetic images and {manifest} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

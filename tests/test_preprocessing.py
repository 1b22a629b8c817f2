"""Preprocessing variants: cell locator, stain normalisation, colour augmentation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk

from leukotype.preprocessing import (
    ColourJitter,
    Preprocessing,
    apply_preprocessing,
    colour_jitter,
    crop_box,
    fit_stain_reference,
    jitter_parameters,
    lab_statistics,
    locate_cell,
    normalise_stain,
)

BACKGROUND = (238, 228, 214)
RED_CELL = (222, 160, 165)
CYTOPLASM = (196, 176, 214)
NUCLEUS = (92, 48, 140)


def synthetic_cell(size, centre, radius, seed=0, red_cells=True):
    """A white cell (cytoplasm disc with a darker nucleus) among red cells on background."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = BACKGROUND
    if red_cells:
        for _ in range(8):
            r = radius * 0.8
            cy, cx = rng.uniform(0, size, 2)
            if np.hypot(cy - centre[0], cx - centre[1]) > radius + r + 4:  # not touching
                img[disk((cy, cx), r, shape=img.shape[:2])] = RED_CELL
    img[disk(centre, radius, shape=img.shape[:2])] = CYTOPLASM
    nucleus = (centre[0] + 0.1 * radius, centre[1] - 0.1 * radius)
    img[disk(nucleus, 0.6 * radius, shape=img.shape[:2])] = NUCLEUS
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "size,centre,radius",
    [(256, (128, 128), 20), (256, (90, 160), 40), (360, (200, 150), 60), (120, (60, 60), 45), (400, (120, 280), 30)],
)
def test_locator_finds_the_cell_at_several_scales_and_positions(size, centre, radius):
    box, reason = locate_cell(synthetic_cell(size, centre, radius, seed=radius), margin=0.2)
    assert reason == "" and box is not None
    cx, cy = box.centre
    assert abs(cy - centre[0]) <= 0.1 * radius + 2 and abs(cx - centre[1]) <= 0.1 * radius + 2
    assert box.cell_size == pytest.approx(2 * radius, rel=0.12)  # the cytoplasm, not the nucleus
    assert box.side == pytest.approx(1.4 * box.cell_size, abs=2)  # margin 0.2 on each side


def test_crop_gives_the_cell_the_same_share_of_the_input_whatever_the_framing():
    shares = []
    for size, radius in [(360, 30), (120, 45)]:  # PBC-like loose framing vs a tight crop
        rgb = synthetic_cell(size, (size // 2, size // 2), radius, seed=1)
        box, _ = locate_cell(rgb, margin=0.15)
        cropped = crop_box(Image.fromarray(rgb), box.left, box.top, box.side)
        shares.append(2 * radius / cropped.size[0])
    assert shares[0] == pytest.approx(shares[1], rel=0.08)


def test_blank_image_is_reported_not_cropped():
    blank = np.full((128, 128, 3), 230, dtype=np.uint8)
    box, reason = locate_cell(blank)
    assert box is None and reason.startswith("no_cell:")
    # a variant that crops uses such an image whole
    prep = Preprocessing.from_dict({"name": "crop", "crop": {"margin": 0.1}})
    assert apply_preprocessing(Image.fromarray(blank), prep, box=None).size == (128, 128)


def _stain_shift(rgb, gain=(0.5, 1.2, 1.7)):
    od = -np.log((rgb.astype(float) + 1) / 256)
    return np.clip(256 * np.exp(-od * np.asarray(gain)) - 1, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_normalisation_maps_a_stain_shifted_image_to_the_reference(method):
    reference_images = [synthetic_cell(160, (80, 80), 35, seed=s) for s in range(3)]
    reference = fit_stain_reference(reference_images, method)
    shifted = _stain_shift(synthetic_cell(160, (70, 90), 35, seed=9))
    target_mean, target_std = lab_statistics(reference_images[0])
    before_mean, _ = lab_statistics(shifted)
    after = normalise_stain(shifted, reference)
    after_mean, after_std = lab_statistics(after)
    distance_before = np.abs(before_mean - target_mean).max()
    distance_after = np.abs(after_mean - target_mean).max()
    assert distance_before > 8  # the shift is real (CIELAB units)
    if method == "reinhard":  # matches the reference LAB statistics by construction
        assert np.allclose(after_mean, reference["mean"], atol=1.0)
        assert np.allclose(after_std, reference["std"], atol=1.5)
        assert distance_after < 0.2 * distance_before
    else:  # Macenko's statistics: the stain vectors estimated from the image
        def angle(image):
            vectors = np.asarray(fit_stain_reference([image], "macenko")["HERef"])
            ref = np.asarray(reference["HERef"])
            cosines = (vectors * ref).sum(0) / np.linalg.norm(vectors, axis=0) / np.linalg.norm(ref, axis=0)
            return np.degrees(np.arccos(np.clip(cosines, -1, 1))).max()

        assert angle(shifted) > 5 and angle(after) < 0.3 * angle(shifted)


def test_colour_views_are_reproducible_and_differ():
    jitter = ColourJitter(views=2, seed=3)
    assert jitter.transforms() == ["colour1", "colour2"]
    a, b = jitter_parameters(jitter, "pbc/neutrophil/1.jpg", 1), jitter_parameters(jitter, "pbc/neutrophil/1.jpg", 2)
    assert a == jitter_parameters(jitter, "pbc/neutrophil/1.jpg", 1) and a != b
    image = Image.fromarray(synthetic_cell(96, (48, 48), 25))
    out = np.asarray(colour_jitter(image, a), dtype=float)
    assert out.shape == (96, 96, 3) and np.abs(out - np.asarray(image, dtype=float)).mean() > 1

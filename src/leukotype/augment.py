"""Lossless geometric augmentation (90-degree rotations, reflections) and sample tables.

A *sample* is an (image_id, transform) pair. Training parts are augmented with every
configured transform (identity included); test parts are seen as they are, unless test-time
augmentation is switched on (``evaluation.tta``, leukotype.tta), where test images get the same
views so their scores can be averaged. Test views never join a training part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from leukotype.errors import LeukotypeError

if TYPE_CHECKING:
    import torch

#: Every transform, in canonical order. Rotations are counter-clockwise.
TRANSFORMS = ("identity", "rot90", "rot180", "rot270", "flip_h", "flip_v")
ROTATION_TRANSFORMS = {90: "rot90", 180: "rot180", 270: "rot270"}
SAMPLE_COLUMNS = ["image_id", "transform", "label", "group", "fold", "part"]

#: PIL transpose operation per transform (lossless pixel permutations, no resampling).
_PIL_OPERATIONS = {
    "rot90": Image.Transpose.ROTATE_90,
    "rot180": Image.Transpose.ROTATE_180,
    "rot270": Image.Transpose.ROTATE_270,
    "flip_h": Image.Transpose.FLIP_LEFT_RIGHT,
    "flip_v": Image.Transpose.FLIP_TOP_BOTTOM,
}


#: Colour views of the training part (``colour1``, ``colour2``, ...): the geometry of
#: ``identity`` with a colour/stain jitter of their own, drawn by a preprocessing variant's
#: ``colour`` step (``leukotype.preprocessing``) when the image is decoded, never by
#: ``apply_transform``. They are training samples only (never test views).
COLOUR_PREFIX = "colour"
MAX_COLOUR_VIEWS = 99


def is_colour_transform(name: str) -> bool:
    suffix = str(name)[len(COLOUR_PREFIX):]
    return (
        str(name).startswith(COLOUR_PREFIX)
        and suffix.isdigit()
        and suffix[0] != "0"
        and 1 <= int(suffix) <= MAX_COLOUR_VIEWS
    )


def colour_view(name: str) -> int:
    """The view number of a ``colourK`` transform; 0 for every other transform."""
    return int(str(name)[len(COLOUR_PREFIX):]) if is_colour_transform(name) else 0


def colour_transforms(views: int) -> list[str]:
    if not 0 <= int(views) <= MAX_COLOUR_VIEWS:
        raise LeukotypeError(f"colour views must be 0..{MAX_COLOUR_VIEWS}, got {views}")
    return [f"{COLOUR_PREFIX}{k}" for k in range(1, int(views) + 1)]


def transform_rank(name: str) -> int:
    """Position in the canonical order: TRANSFORMS, then colour1, colour2, ..."""
    if is_colour_transform(name):
        return len(TRANSFORMS) + colour_view(name)
    return TRANSFORMS.index(check_transform(name))


def check_transform(name: str) -> str:
    """Return ``name`` if it is a known transform, else raise listing the valid names."""
    if name not in TRANSFORMS and not is_colour_transform(name):
        raise LeukotypeError(
            f"unknown transform {name!r}; valid transforms: {list(TRANSFORMS)} and "
            f"colour1..colour{MAX_COLOUR_VIEWS} (a variant's colour views)"
        )
    return name


def apply_transform(img: Image.Image, name: str) -> Image.Image:
    """Apply a transform to a PIL image (counter-clockwise rotations, lossless)."""
    check_transform(name)
    if name == "identity" or is_colour_transform(name):  # colour views: see COLOUR_PREFIX
        return img
    return img.transpose(_PIL_OPERATIONS[name])


def apply_transform_tensor(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Apply a transform to a ``(..., H, W)`` tensor, e.g. ``(C, H, W)`` or ``(N, C, H, W)``.

    Pixel-for-pixel equal to :func:`apply_transform` on the same image: ``torch.rot90`` over
    (H, W) turns the first row into the first column read upwards, i.e. counter-clockwise.
    """
    import torch  # lazily: sample tables and PIL transforms must not pay torch's import

    check_transform(name)
    if tensor.ndim < 2:
        raise LeukotypeError(
            f"expected a tensor with at least 2 dims (..., H, W), got {tensor.ndim}"
        )
    spatial = (-2, -1)
    if is_colour_transform(name):
        raise LeukotypeError(f"{name!r} is a colour view: it is drawn on decoded images, not tensors")
    if name == "identity":
        return tensor
    if name.startswith("rot"):
        return torch.rot90(tensor, k=int(name[3:]) // 90, dims=spatial)
    return torch.flip(tensor, dims=(-1,) if name == "flip_h" else (-2,))


def transforms_from_config(aug_cfg: Mapping[str, Any] | None) -> list[str]:
    """Transforms of an ``augmentation`` config section, identity first, canonical order.

    ``{rotations: [90, 180, 270], reflection: false}`` -> identity, rot90, rot180, rot270;
    ``reflection: true`` adds flip_h and flip_v. Only 90, 180 and 270 degrees are allowed:
    other angles would need interpolation and corner filling, which changes the cell image.
    """
    aug_cfg = dict(aug_cfg or {})
    rotations = aug_cfg.get("rotations") or []
    if isinstance(rotations, (str, int, float)):
        raise LeukotypeError(f"augmentation.rotations must be a list of angles, got {rotations!r}")
    chosen = {"identity"}
    for angle in rotations:
        if (
            not isinstance(angle, (int, float))
            or isinstance(angle, bool)
            or (angle not in ROTATION_TRANSFORMS)
        ):
            raise LeukotypeError(
                f"augmentation.rotations: angle {angle!r} is not supported; use any of "
                f"{sorted(ROTATION_TRANSFORMS)} (degrees, counter-clockwise)"
            )
        chosen.add(ROTATION_TRANSFORMS[int(angle)])
    reflection = aug_cfg.get("reflection", False)
    if not isinstance(reflection, bool):
        raise LeukotypeError(f"augmentation.reflection must be true or false, got {reflection!r}")
    if reflection:
        chosen.update({"flip_h", "flip_v"})
    return [name for name in TRANSFORMS if name in chosen]


def _canonical_transforms(transforms: Sequence[str]) -> list[str]:
    chosen = {check_transform(name) for name in transforms} | {"identity"}
    return [name for name in TRANSFORMS if name in chosen]


def augmented_samples(
    split_table: pd.DataFrame,
    transforms: Sequence[str],
    tta: bool = False,
    training_views: Sequence[str] = (),
) -> pd.DataFrame:
    """Sample table: train rows x every transform (identity always included), test rows x identity
    (x every transform too with ``tta``, for test-time augmentation). ``training_views``
    (a variant's colour views, ``colourK``) join the training rows only, after the transforms.

    Columns ``image_id, transform, label, group, fold, part``; rows keep the split table's
    order, transforms in canonical order within an image.
    """
    missing = sorted({"image_id", "label", "group", "fold", "part"} - set(split_table.columns))
    if missing:
        raise LeukotypeError(f"split table lacks column(s) {missing}")
    bad_parts = sorted(set(split_table["part"]) - {"train", "test"})
    if bad_parts:
        raise LeukotypeError(f"split table has unknown part(s) {bad_parts}; expected train/test")
    chosen = _canonical_transforms(transforms)
    views = [check_transform(name) for name in training_views]
    if any(not is_colour_transform(name) for name in views):
        raise LeukotypeError(f"training views must be colour views (colourK), got {views}")
    test_copies = len(chosen) if tta else 1
    copies = np.where(split_table["part"].to_numpy() == "train", len(chosen) + len(views), test_copies)
    rows = np.repeat(np.arange(len(split_table)), copies)
    # position of each copy within its row; identity is chosen[0], so test rows get identity
    first_copy = np.repeat(np.cumsum(copies) - copies, copies)
    transform = np.asarray(chosen + views, dtype=object)[np.arange(len(rows)) - first_copy]
    table = split_table.iloc[rows].reset_index(drop=True).assign(transform=transform)
    return table[SAMPLE_COLUMNS]


def sample_union(sample_tables: pd.DataFrame | Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Unique (image_id, transform) pairs of one or more sample tables.

    Sorted by image_id, then by the canonical transform order (identity first).
    """
    if isinstance(sample_tables, pd.DataFrame):
        sample_tables = [sample_tables]
    frames = [table[["image_id", "transform"]] for table in sample_tables]
    if not frames:
        return pd.DataFrame({"image_id": pd.Series(dtype=str), "transform": pd.Series(dtype=str)})
    union = pd.concat(frames, ignore_index=True).drop_duplicates()
    for name in union["transform"].unique():
        check_transform(name)
    rank = union["transform"].map(transform_rank)
    union = union.assign(_rank=rank).sort_values(["image_id", "_rank"], kind="stable")
    return union.drop(columns="_rank").reset_index(drop=True)

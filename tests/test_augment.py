"""Lossless augmentation and sample tables: train-only, exact counts, PIL == tensor."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from leukotype.augment import (
    TRANSFORMS,
    apply_transform,
    apply_transform_tensor,
    augmented_samples,
    sample_union,
    transforms_from_config,
)
from leukotype.errors import LeukotypeError


def random_image(height: int = 5, width: int = 7, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def split_table() -> pd.DataFrame:
    """Two folds over 5 images: 3 train + 2 test, then 2 train + 3 test."""
    rows = []
    for fold, test_ids in [("r0f0", {"i3", "i4"}), ("r0f1", {"i0", "i1", "i2"})]:
        for index, image_id in enumerate(["i0", "i1", "i2", "i3", "i4"]):
            part = "test" if image_id in test_ids else "train"
            rows.append((image_id, f"g{index}", "ab"[index % 2], fold, part))
    return pd.DataFrame(rows, columns=["image_id", "group", "label", "fold", "part"])


def test_transforms_are_the_contract_names():
    assert TRANSFORMS == ("identity", "rot90", "rot180", "rot270", "flip_h", "flip_v")


def test_rotations_are_counter_clockwise_and_lossless():
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 2] = 255  # marker in the top-right corner
    img = Image.fromarray(pixels, "RGB")
    rotated = np.asarray(apply_transform(img, "rot90"))
    assert rotated.shape == (3, 2, 3)
    assert rotated[0, 0].tolist() == [255, 255, 255]  # top-right -> top-left when turned CCW
    assert np.asarray(apply_transform(img, "rot270"))[2, 1].tolist() == [255] * 3
    assert np.asarray(apply_transform(img, "flip_h"))[0, 0].tolist() == [255] * 3
    assert np.asarray(apply_transform(img, "flip_v"))[1, 2].tolist() == [255] * 3
    source = random_image()
    np.testing.assert_array_equal(
        np.asarray(apply_transform(source, "rot90")), np.asarray(source.rotate(90, expand=True))
    )
    turned = source
    for _ in range(4):
        turned = apply_transform(turned, "rot90")
    assert turned.tobytes() == source.tobytes()


@pytest.mark.parametrize("name", TRANSFORMS)
def test_tensor_transform_matches_pil_exactly(name):
    img = random_image(height=5, width=7, seed=3)
    from_pil = torch.from_numpy(np.asarray(apply_transform(img, name)).copy()).permute(2, 0, 1)
    chw = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    assert torch.equal(apply_transform_tensor(chw, name), from_pil)
    batch = torch.stack([chw, chw.flip(0)])  # (N, C, H, W) works too
    assert torch.equal(apply_transform_tensor(batch, name)[0], from_pil)


def test_unknown_transform_lists_valid_names():
    for apply, data in [
        (apply_transform, random_image()),
        (apply_transform_tensor, torch.ones(3, 2, 2)),
    ]:
        with pytest.raises(LeukotypeError, match=r"'rot45'.*identity.*flip_v"):
            apply(data, "rot45")


def test_transforms_from_config():
    assert transforms_from_config({"rotations": [90, 180, 270], "reflection": False}) == [
        "identity",
        "rot90",
        "rot180",
        "rot270",
    ]
    assert transforms_from_config({"rotations": [270, 90, 90], "reflection": True}) == [
        "identity",
        "rot90",
        "rot270",
        "flip_h",
        "flip_v",
    ]
    assert transforms_from_config({}) == ["identity"]
    assert transforms_from_config(None) == ["identity"]
    with pytest.raises(LeukotypeError, match=r"angle 45 is not supported.*\[90, 180, 270\]"):
        transforms_from_config({"rotations": [90, 45]})
    with pytest.raises(LeukotypeError, match="list of angles"):
        transforms_from_config({"rotations": 90})
    with pytest.raises(LeukotypeError, match="reflection must be true or false"):
        transforms_from_config({"reflection": "yes"})


def test_augmented_samples_only_augment_training_rows():
    table = split_table()
    transforms = transforms_from_config({"rotations": [90, 180, 270]})
    samples = augmented_samples(table, transforms)
    assert list(samples.columns) == ["image_id", "transform", "label", "group", "fold", "part"]
    assert samples.loc[samples["part"] == "test", "transform"].eq("identity").all()
    for fold, rows in table.groupby("fold"):
        in_fold = samples[samples["fold"] == fold]
        n_train = int((rows["part"] == "train").sum())
        assert (in_fold["part"] == "train").sum() == 4 * n_train  # exactly 4x
        assert (in_fold["part"] == "test").sum() == (rows["part"] == "test").sum()
        train = in_fold[in_fold["part"] == "train"]
        per_image = train.groupby("image_id")["transform"].apply(tuple)
        assert set(per_image) == {("identity", "rot90", "rot180", "rot270")}
    assert len(samples) == 4 * 5 + 5
    pd.testing.assert_frame_equal(samples, augmented_samples(table, transforms))


def test_augmented_samples_always_include_identity_and_check_names():
    samples = augmented_samples(split_table(), ["flip_h"])
    train = samples[samples["part"] == "train"]
    assert sorted(train["transform"].unique()) == ["flip_h", "identity"]
    with pytest.raises(LeukotypeError, match="unknown transform 'mirror'"):
        augmented_samples(split_table(), ["mirror"])
    with pytest.raises(LeukotypeError, match=r"unknown part\(s\) \['val'\]"):
        augmented_samples(split_table().assign(part="val"), ["identity"])


def test_sample_union_is_sorted_and_unique():
    table = split_table()
    plain = augmented_samples(table, ["identity"])
    rotated = augmented_samples(table, ["rot180", "rot90"])
    union = sample_union([rotated, plain])
    assert list(union.columns) == ["image_id", "transform"]
    assert not union.duplicated().any()
    # every image is training in some fold, so all get identity, rot90, rot180
    assert union.to_records(index=False).tolist() == [
        (image_id, name)
        for image_id in ["i0", "i1", "i2", "i3", "i4"]
        for name in ("identity", "rot90", "rot180")
    ]
    pd.testing.assert_frame_equal(sample_union(rotated), union)


def test_colour_views_join_training_rows_only_even_with_tta():
    from leukotype.augment import augmented_samples

    split = pd.DataFrame(
        {"image_id": ["a", "b"], "label": ["x", "y"], "group": ["g1", "g2"], "fold": "holdout", "part": ["train", "test"]}
    )
    table = augmented_samples(split, ["identity", "rot90"], tta=True, training_views=["colour1", "colour2"])
    assert table[table["image_id"] == "a"]["transform"].tolist() == ["identity", "rot90", "colour1", "colour2"]
    assert table[table["image_id"] == "b"]["transform"].tolist() == ["identity", "rot90"]

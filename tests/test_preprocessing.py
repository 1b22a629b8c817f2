"""Preprocessing variants: cell locator, stain normalisation, colour augmentation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk

from leukotype import paths
from leukotype.errors import LeukotypeError
from leukotype.preprocessing import (
    STEPS,
    ColourJitter,
    ImagePreparer,
    Step,
    Variant,
    check_preprocessing_config,
    colour_jitter,
    crop_box,
    fit_stain_reference,
    fitted_variant_name,
    fold_fitted_variants,
    jitter_parameters,
    lab_statistics,
    locate_cell,
    normalise_stain,
    per_fold_variants,
    preparer_from_record,
    reference_image_ids,
    register_step,
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
    # a variant that crops uses such an image whole (its row says why)
    variant = Variant.from_dict({"name": "crop", "steps": [{"step": "crop", "margin": 0.1}]})
    row = variant.steps[0].analyse(Image.fromarray(blank))
    assert row["status"] == "not_found" and row["reason"].startswith("no_cell:")
    assert ImagePreparer(variant)(Image.fromarray(blank), "blank.png").size == (128, 128)


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


# --------------------------------------------------------------------------------------------
# variants: named sequences of steps from one registry


def test_variant_is_a_sequence_of_registered_steps_and_round_trips():
    entry = {
        "name": "cropstain",
        "steps": [{"step": "crop", "margin": 0.2}, {"step": "stain", "method": "macenko"}, {"step": "colour", "views": 3}],
    }
    variant = Variant.from_dict(entry)
    assert [s.kind for s in variant.steps] == ["crop", "stain", "colour"]
    assert variant.views == 3 and variant.view_transforms() == ["colour1", "colour2", "colour3"]
    assert variant.analysis_keys() == ["crop_m0.2"] and variant.fitted
    assert Variant.from_dict(variant.to_dict()) == variant
    with pytest.raises(LeukotypeError, match=r"unknown preprocessing step 'blur'.*colour.*crop.*stain"):
        Variant.from_dict({"name": "x", "steps": [{"step": "blur"}]})
    with pytest.raises(LeukotypeError, match=r"unknown setting\(s\) \['margn'\]"):
        Variant.from_dict({"name": "x", "steps": [{"step": "crop", "margn": 0.2}]})
    with pytest.raises(LeukotypeError, match="choose one of"):
        Variant.from_dict({"name": "x", "steps": [{"step": "stain", "method": "vahadane"}]})


def test_a_new_step_plugs_in_through_the_registry_alone():
    """What a research step (greyscale) needs: a class and @register_step; config validation,
    the preparer (so extraction, fine-tuning, bundles) and the record take it unchanged."""
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True)
    class Greyscale(Step):
        kind: ClassVar[str] = "test_greyscale"

        def apply(self, image, context):
            return image.convert("L").convert("RGB")

    register_step(Greyscale)
    try:
        cfg = {"preprocessing": [{"name": "grey", "steps": [{"step": "test_greyscale"}]}], "split": {"method": "holdout"}}
        assert check_preprocessing_config(cfg) == []
        variant = Variant.from_dict(cfg["preprocessing"][0])
        image = Image.fromarray(synthetic_cell(64, (32, 32), 16))
        out = np.asarray(ImagePreparer(variant)(image, "a.png"), dtype=int)
        assert np.array_equal(out[..., 0], out[..., 2]) and not np.array_equal(np.asarray(image)[..., 0], np.asarray(image)[..., 2])
        again = preparer_from_record(ImagePreparer(variant).record())
        assert np.array_equal(np.asarray(again(image, "a.png")), out)
    finally:
        del STEPS["test_greyscale"]


def test_preparer_crops_then_normalises_and_draws_colour_views_for_training_only():
    rgb = synthetic_cell(200, (80, 120), 30, seed=2)
    variant = Variant.from_dict(
        {"name": "v", "steps": [{"step": "crop", "margin": 0.15}, {"step": "stain", "method": "reinhard"}, {"step": "colour", "views": 2}]}
    )
    reference = fit_stain_reference([synthetic_cell(160, (80, 80), 35, seed=s) for s in range(2)], "reinhard")
    row = variant.steps[0].analyse(Image.fromarray(rgb))
    assert row["status"] == "found"
    prepare = ImagePreparer(variant, {"crop_m0.15": {"img.png": row}}, [None, reference, None], {"img.png": "md5a"})
    plain = prepare(Image.fromarray(rgb), "img.png")
    assert plain.size == (row["side"], row["side"]) and row["side"] < 200  # cropped around the cell
    assert np.allclose(lab_statistics(np.asarray(plain))[0], reference["mean"], atol=1.0)  # then normalised
    view1, view2 = (np.asarray(prepare(Image.fromarray(rgb), "img.png", f"colour{k}"), dtype=float) for k in (1, 2))
    assert np.abs(view1 - np.asarray(plain, dtype=float)).mean() > 1 and np.abs(view1 - view2).mean() > 1
    assert np.array_equal(view1, np.asarray(prepare(Image.fromarray(rgb), "img.png", "colour1"), dtype=float))
    with pytest.raises(LeukotypeError, match="draws 2 colour views"):
        prepare(Image.fromarray(rgb), "img.png", "colour3")


def test_fitted_steps_see_training_images_that_are_never_test_images():
    import pandas as pd

    task_a = pd.DataFrame({"image_id": ["i0", "i1", "i2", "i3"], "part": ["train", "train", "test", "train"], "fold": "holdout"})
    task_b = pd.DataFrame({"image_id": ["i0", "i1", "i3"], "part": ["train", "test", "train"], "fold": "holdout"})
    assert reference_image_ids([task_a, task_b], n=10, seed=0) == ["i0", "i3"]  # i1 is test in task b
    assert len(reference_image_ids([task_a], n=2, seed=0)) == 2
    kfold = pd.DataFrame({"image_id": ["i0", "i1", "i0", "i1"], "part": ["train", "test", "test", "train"], "fold": ["f0", "f0", "f1", "f1"]})
    with pytest.raises(LeukotypeError, match="no image is a training image in every fold"):
        reference_image_ids([kfold], n=10, seed=0)
    # fitted per fold: that fold's training images, in every task's split
    assert reference_image_ids([kfold], n=10, seed=0, fold="f0") == ["i0"]
    assert reference_image_ids([kfold], n=10, seed=0, fold="f1") == ["i1"]
    other_task = pd.DataFrame({"image_id": ["i0", "i1", "i2", "i0", "i1", "i2"], "part": ["test", "train", "train", "train", "train", "test"],
                               "fold": ["f0", "f0", "f0", "f1", "f1", "f1"]})
    assert reference_image_ids([kfold, other_task], n=10, seed=0, fold="f1") == ["i1"]  # i0 is f1-test in kfold
    assert reference_image_ids([kfold, other_task], n=10, seed=0, fold="f0") == ["i2"]  # i0 is f0-test in the other
    flipped = kfold.assign(part=kfold["part"].map({"train": "test", "test": "train"}))
    with pytest.raises(LeukotypeError, match="no image is a training image of fold 'f0'"):
        reference_image_ids([kfold, flipped], n=10, seed=0, fold="f0")
    with pytest.raises(LeukotypeError, match="fold 'f9' is in no split table"):
        reference_image_ids([kfold], n=10, seed=0, fold="f9")
    cfg = {"preprocessing": [{"name": "st", "steps": [{"step": "stain", "method": "reinhard"}]}, {"name": "none"},
                             {"name": "cropped", "steps": [{"step": "crop"}]}], "split": {"method": "kfold"}}
    assert check_preprocessing_config(cfg) == []  # k-fold fits it per fold
    assert per_fold_variants(cfg) == {"st"}  # a step without a fit, or a hold-out split, needs no per-fold state
    assert per_fold_variants({**cfg, "split": {"method": "holdout"}}) == set()
    assert fitted_variant_name("st", "r0f1", {"st"}) == "st.r0f1" and fitted_variant_name("cropped", "r0f1", {"st"}) == "cropped"
    assert paths.split_fold_fitted("st.r0f1") == ("st", "r0f1") and paths.split_fold_fitted("st") == ("st", None)
    derived = fold_fitted_variants(cfg, ["r0f0", "r0f1"])
    assert sorted(derived) == ["st.r0f0", "st.r0f1"] and derived["st.r0f1"].steps == Variant.from_dict(cfg["preprocessing"][0]).steps
    cfg["preprocessing"].append({"name": "none", "steps": [{"step": "crop"}]})
    assert any("reserved" in p for p in check_preprocessing_config(cfg))


def test_a_reference_source_outside_the_study_lets_kfold_fit_a_variant(tmp_path):
    steps = [{"step": "crop", "margin": 0.15}, {"step": "white_balance"}]
    cfg = {"preprocessing": [{"name": "wb", "steps": steps, "reference_source": str(tmp_path)}], "split": {"method": "kfold"}}
    assert check_preprocessing_config(cfg) == []  # fitted on images no split touches
    variant = Variant.from_dict(cfg["preprocessing"][0])
    assert variant.to_dict()["reference_source"] == str(tmp_path)
    assert "reference_source" not in Variant.from_dict({"name": "wb", "steps": steps}).to_dict()  # old params unchanged
    cfg["preprocessing"][0]["reference_source"] = str(tmp_path / "missing")
    (problem,) = check_preprocessing_config(cfg)
    assert "does not exist" in problem and "missing" in problem
    cfg["preprocessing"] = [{"name": "cropped", "steps": steps[:1], "reference_source": str(tmp_path)}]
    (problem,) = check_preprocessing_config(cfg)
    assert "no step is fitted" in problem


def test_a_variant_fitted_per_fold_sees_that_folds_training_images_only(tmp_path):
    """``<variant>.<fold>`` (k-fold, no reference_source): the fit reads the fold's training
    images and records the fold; its target is their background, not the fold's test images'."""
    import pandas as pd

    from leukotype.io import read_json
    from leukotype.stages import run_fit_preprocessing

    casts = [(1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.7, 0.9, 1.2), (0.7, 0.9, 1.2)]  # the last two: another lamp
    rows = []
    for i, gains in enumerate(casts):
        path = tmp_path / f"c{i}.png"
        Image.fromarray(_cast(synthetic_cell(128, (64, 64), 25, seed=i), gains)).save(path)
        rows.append({"image_id": f"img{i}", "path": path.name, "abspath": str(path), "status": "ok"})
    validated = tmp_path / "validated.tsv"
    pd.DataFrame(rows).to_csv(validated, sep="\t", index=False)
    split = pd.DataFrame({"image_id": [f"img{i}" for i in range(4)] * 2,
                          "part": ["train", "train", "test", "test", "test", "test", "train", "train"],
                          "fold": ["r0f0"] * 4 + ["r0f1"] * 4})
    splits = tmp_path / "subtype.tsv"
    split.to_csv(splits, sep="\t", index=False)
    steps = [{"step": "white_balance"}]
    targets = {}
    for fold, expected in (("r0f0", ["img0", "img1"]), ("r0f1", ["img2", "img3"])):
        variant = {"name": paths.fold_fitted("wb", fold), "steps": steps, "reference_images": 10}
        record = run_fit_preprocessing(validated, [splits], variant, [], 0, tmp_path / f"{fold}.json")
        assert record["image_ids"] == expected and record["fold"] == fold and record["n_images"] == 2
        assert read_json(tmp_path / f"{fold}.json")["states"] == record["states"]
        targets[fold] = np.asarray(record["states"][0]["target"])
    # the second fold's training images are the blue-cast ones: its target is bluer, less red
    assert targets["r0f1"][2] > targets["r0f0"][2] + 10 and targets["r0f1"][0] < targets["r0f0"][0] - 30
    with pytest.raises(LeukotypeError, match="in every fold"):  # the variant's own name: no image serves every fold
        run_fit_preprocessing(validated, [splits], {"name": "wb", "steps": steps}, [], 0, tmp_path / "all.json")


def test_a_bundle_of_a_kfold_run_records_its_own_folds_state(tmp_path):
    """export reads ``<variant>.<fold>``'s state for a run of a variant fitted per fold (and the
    variant's own state otherwise): a bundle of fold r0f1 must prepare images as r0f1 did."""
    from leukotype.config import frozen_features_prep
    from leukotype.export import image_steps_record
    from leukotype.io import write_json

    steps = [{"step": "white_balance"}]
    cfg = {"preprocessing": [{"name": "wb", "steps": steps}], "split": {"method": "kfold"}}
    for name, target in (("wb.r0f0", [240.0, 230.0, 220.0]), ("wb.r0f1", [200.0, 210.0, 250.0])):
        write_json({"states": [{"target": target, "n_images": 3}]}, tmp_path / paths.prep_state("", name))
    variant = Variant.from_dict(cfg["preprocessing"][0])
    assert frozen_features_prep(cfg, "wb", "r0f1") == "wb.r0f1"
    record = image_steps_record(tmp_path, variant, frozen_features_prep(cfg, "wb", "r0f1"))
    assert record["states"] == [{"target": [200.0, 210.0, 250.0], "n_images": 3}]
    holdout = {**cfg, "split": {"method": "holdout"}}
    assert frozen_features_prep(holdout, "wb", "holdout") == "wb"
    with pytest.raises(LeukotypeError, match="no fitted state"):  # never silently the variant's own
        image_steps_record(tmp_path, variant, frozen_features_prep(holdout, "wb", "holdout"))


def test_a_variant_is_fitted_on_its_reference_images_and_never_on_a_study_image(tmp_path):
    import pandas as pd

    from leukotype.io import read_json
    from leukotype.preprocessing import fit_variant
    from leukotype.stages import run_fit_preprocessing

    def save(path, array):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
        return path

    study = [save(tmp_path / "study" / f"s{i}.png", synthetic_cell(128, (64, 64), 25, seed=i)) for i in range(3)]
    # the reference slide: another stain (a colour cast), in sub-folders, with one unreadable file
    cast = np.array([0.8, 1.0, 1.15])
    reference = [save(tmp_path / "ref" / f"slide{i % 2}" / f"r{i}.png",
                      np.clip(synthetic_cell(128, (60, 70), 28, seed=10 + i) * cast, 0, 255).astype(np.uint8))
                 for i in range(4)]
    (tmp_path / "ref" / "notes.png").write_text("not an image")
    validated = tmp_path / "validated.tsv"
    import hashlib
    pd.DataFrame({"image_id": [f"img{i}" for i in range(3)], "path": [p.name for p in study],
                  "abspath": [str(p) for p in study], "md5": [hashlib.md5(p.read_bytes()).hexdigest() for p in study],
                  "status": "ok"}).to_csv(validated, sep="\t", index=False)
    variant = {"name": "wb", "steps": [{"step": "crop", "margin": 0.15}, {"step": "white_balance"}],
               "reference_images": 3, "reference_source": str(tmp_path / "ref")}
    checks = {"min_side": 32, "max_pixels": 50_000_000, "max_aspect_ratio": 5, "allow_outside_paths": False}
    record = run_fit_preprocessing(validated, [], variant, [], 0, tmp_path / "state.json",
                                   reference=tmp_path / "ref", validation=checks)
    assert read_json(tmp_path / "state.json")["states"] == record["states"]
    used = [r["path"] for r in record["reference"]]
    assert record["n_images"] == 3 and len(set(used)) == 3 and "image_ids" not in record
    assert set(used) <= {str(p) for p in reference}  # never the study's images, nor the unreadable file
    images = [(p, Image.open(p).convert("RGB")) for p in used]
    expected = fit_variant(Variant.from_dict(variant), images)  # crop boxes found on each image
    assert record["states"] == expected and record["states"][0] is None
    # the fitted background is the reference slide's cast one, not the study's
    study_fit = fit_variant(Variant.from_dict(variant), [(str(p), Image.open(p).convert("RGB")) for p in study])
    target, study_target = (np.asarray(s[1]["target"]) for s in (record["states"], study_fit))
    assert target[2] > study_target[2] + 10 and target[0] < study_target[0] - 10
    # a study image among the reference images is refused, naming it
    (tmp_path / "ref" / "slide0" / "copy.png").write_bytes(study[1].read_bytes())
    with pytest.raises(LeukotypeError, match=r"study images.*copy.png = the study's s1.png"):
        run_fit_preprocessing(validated, [], variant, [], 0, tmp_path / "state2.json",
                              reference=tmp_path / "ref", validation=checks)
    assert not (tmp_path / "state2.json").exists()
# ------------------------------------------------------------------ steps that remove lab differences


def _cast(rgb, gains):
    """A lab's lamp/camera colour cast: one gain per channel."""
    return (rgb.astype(np.float32) * np.asarray(gains)).round().clip(0, 255).astype(np.uint8)


def test_a_nucleus_in_separate_lobes_keeps_every_lobe_in_the_cell_and_not_a_nearby_platelet():
    """A threshold splits a neutrophil's nucleus into lobes; the cell is grown around all of
    them (segmentation 1 grew it around one lobe and lost the rest of the cell), and a small
    stained platelet on the background near the cell is not taken for a lobe."""
    from leukotype.preprocessing import _segment_cell, cell_mask

    for size, radius in ((360, 60), (120, 45)):
        img = np.full((size, size, 3), BACKGROUND, np.float32)
        c = size / 2
        img[disk((c, c), radius, shape=img.shape[:2])] = CYTOPLASM
        for dx in (-0.4, 0.4):  # two lobes, cytoplasm in the gap (2/3 of a lobe radius)
            img[disk((c, c + dx * radius), 0.3 * radius, shape=img.shape[:2])] = NUCLEUS
        img[disk((c + 1.25 * radius, c - 0.6 * radius), 0.1 * radius, shape=img.shape[:2])] = NUCLEUS  # platelet
        img = np.clip(img + np.random.default_rng(2).normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        truth = np.zeros((size, size), bool)
        truth[disk((c, c), radius, shape=truth.shape)] = True
        mask, _ = cell_mask(img)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.85, size
        box, _ = locate_cell(img, margin=0.15)
        assert box.cell_size == pytest.approx(2 * radius, rel=0.1)
        assert abs(box.centre[0] - c) < 0.1 * radius and abs(box.centre[1] - c) < 0.1 * radius
        one_lobe, _, _ = _segment_cell(img, join_lobes=False)  # the old segmentation lost the cell
        assert one_lobe.sum() < 0.8 * _segment_cell(img)[0].sum()


@pytest.mark.shared_data
@pytest.mark.parametrize("image,old_area,new_area,cell_size", [
    ("pbc/eosinophil/EO_291883.jpg", 5414, 7830, 147),  # three lobes; a platelet nearby
    ("jtsc/neutrophil/024.bmp", 3117, 5689, 89),
    ("jtsc/neutrophil/034.bmp", 2414, 4479, 79),
])
def test_real_cells_whose_nucleus_the_threshold_splits_keep_all_of_it(shared_data, image, old_area, new_area, cell_size):
    """Real cells where segmentation 1 grew the cell around one lobe (bench/cell_lobes.py):
    the cell now holds every lobe (its working-copy area as measured when the fix was made),
    and its box is the whole cell's, not a platelet's or one lobe's."""
    from leukotype.images import load_rgb
    from leukotype.preprocessing import _segment_cell

    rgb = np.asarray(load_rgb(shared_data / image))
    assert _segment_cell(rgb, join_lobes=False)[0].sum() == old_area
    assert _segment_cell(rgb)[0].sum() == new_area
    box, _ = locate_cell(rgb, margin=0.15)
    assert box.cell_size == pytest.approx(cell_size, abs=2)


def test_cell_mask_covers_the_cell_and_its_box_matches_locate_cell():
    from leukotype.preprocessing import box_from_mask, cell_mask

    img = synthetic_cell(360, (200, 150), 60, seed=3)
    mask, reason = cell_mask(img)
    assert reason == "" and mask.shape == (360, 360)
    truth = np.zeros((360, 360), bool)
    truth[disk((200, 150), 60, shape=truth.shape)] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.85
    box, _ = locate_cell(img, margin=0.2)
    from_mask = box_from_mask(mask, 0.2)
    assert abs(from_mask.side - box.side) <= 4 and abs(from_mask.left - box.left) <= 3 and abs(from_mask.top - box.top) <= 3
    assert cell_mask(np.full((64, 64, 3), 200, np.uint8))[0] is None


def test_crop_mask_cuts_the_same_square_as_crop_box():
    from leukotype.preprocessing import crop_mask

    mask = np.zeros((50, 80), bool)
    mask[10:30, 60:80] = True
    image = Image.fromarray(np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2))
    for left, top, side in [(55, 5, 40), (-10, -10, 30), (0, 0, 50)]:
        cropped = np.asarray(crop_box(image, left, top, side))[..., 0] == 255
        assert np.array_equal(crop_mask(mask, left, top, side), cropped)


def test_luminance_drops_hue_and_keeps_three_channels():
    from leukotype.preprocessing import luminance

    rgb = synthetic_cell(120, (60, 60), 40)
    grey = luminance(rgb)
    assert grey.shape == rgb.shape and grey.dtype == np.uint8
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    flat = np.full((4, 4, 3), 128, np.uint8)
    assert np.abs(luminance(flat).astype(int) - 128).max() <= 1
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    assert abs(int(luminance(red)[0, 0, 0]) - round(0.2125 * 255)) <= 1


def test_white_balance_undoes_a_lamp_cast_and_leaves_the_stain():
    from leukotype.preprocessing import background_median, cell_mask, white_balance

    rgb = synthetic_cell(200, (100, 100), 50, seed=1, red_cells=False)
    yellow = _cast(rgb, (1.05, 1.0, 0.7))
    mask, _ = cell_mask(yellow)
    target = background_median(rgb, cell_mask(rgb)[0])
    balanced = white_balance(yellow, background_median(yellow, mask), target)
    assert np.abs(background_median(balanced, mask) - target).max() <= 1.5
    # the cast was a gain per channel, so the cell's colours come back too
    inside = mask & (rgb.min(axis=2) > 20)
    assert np.abs(balanced[inside].astype(float).mean(axis=0) - rgb[inside].mean(axis=0)).max() < 3
    assert np.abs(yellow[inside].astype(float).mean(axis=0) - rgb[inside].mean(axis=0)).max() > 20


def test_flatten_background_sets_only_the_outside():
    from leukotype.preprocessing import flatten_background

    rgb = synthetic_cell(120, (60, 60), 30, seed=2)
    mask = np.zeros((120, 120), bool)
    mask[disk((60, 60), 30, shape=mask.shape)] = True
    out = flatten_background(rgb, mask, (200, 190, 180), grow=2)
    assert np.array_equal(out[mask], rgb[mask])
    far = np.ones_like(mask)
    far[disk((60, 60), 33, shape=mask.shape)] = False
    assert (out[far] == (200, 190, 180)).all()


def test_stretch_contrast_maps_the_percentiles_and_keeps_order():
    from leukotype.preprocessing import stretch_contrast

    rgb = synthetic_cell(120, (60, 60), 40)
    dull = (rgb.astype(np.float32) * 0.4 + 90).astype(np.uint8)
    out = stretch_contrast(dull, 1, 99)
    spread = lambda img: np.subtract(*np.percentile(img.astype(np.float32).mean(axis=2), [99, 1]))  # noqa: E731
    assert spread(dull) < 90 and spread(out) > 200  # (channels clip at 0 and 255, so not exactly 255)
    # one affine map for all channels: the stretched dull image matches the stretched original
    assert np.abs(out.astype(int) - stretch_contrast(rgb, 1, 99).astype(int)).mean() < 4


def test_foreground_reinhard_ignores_the_background_colour():
    from leukotype.preprocessing import cell_mask

    rgb = synthetic_cell(200, (100, 100), 60, seed=4, red_cells=False)
    mask, _ = cell_mask(rgb)
    yellow_bg = rgb.copy()
    yellow_bg[~mask] = (235, 230, 150)
    reference = fit_stain_reference([rgb], "reinhard", [mask])
    assert reference["foreground"] is True
    fg_a = normalise_stain(rgb, reference, mask)[mask].astype(float)
    fg_b = normalise_stain(yellow_bg, reference, mask)[mask].astype(float)
    assert np.abs(fg_a - fg_b).mean() < 1.0  # the cell comes out the same on either background
    whole = fit_stain_reference([rgb], "reinhard")
    wa = normalise_stain(rgb, whole)[mask].astype(float)
    wb = normalise_stain(yellow_bg, whole)[mask].astype(float)
    assert np.abs(wa - wb).mean() > 5.0  # whole-image statistics let the background recolour it


def test_hue_jitter_rotates_hue_and_keeps_earlier_view_parameters():
    from leukotype.preprocessing import hsv_jitter

    rgb = synthetic_cell(64, (32, 32), 20)
    assert np.abs(hsv_jitter(rgb, 0.0, 0.0).astype(int) - rgb).max() <= 1
    back = hsv_jitter(hsv_jitter(rgb, 0.5, 0.0), 0.5, 0.0)
    assert np.abs(back.astype(int) - rgb).max() <= 2
    assert np.abs(hsv_jitter(rgb, 0.5, 0.0).astype(int) - rgb).mean() > 10
    plain = jitter_parameters(ColourJitter(views=2), "a.png", 1)
    hued = jitter_parameters(ColourJitter(views=2, hue=0.5, saturation=0.5), "a.png", 1)
    assert {k: plain[k] for k in ("hed", "brightness", "contrast", "blur", "scale")} == {
        k: hued[k] for k in ("hed", "brightness", "contrast", "blur", "scale")}
    assert plain["hue"] == 0.0 and -0.5 <= hued["hue"] <= 0.5 and hued["hue"] != 0.0
    assert np.array_equal(np.asarray(colour_jitter(Image.fromarray(rgb), plain)),
                          np.asarray(colour_jitter(Image.fromarray(rgb), {k: v for k, v in plain.items() if k not in ("hue", "saturation")})))




def test_white_balance_step_maps_each_images_background_to_the_training_median_then_grey():
    """The recipe crop -> white_balance -> grey: the per-image row is the background outside the
    cell on the decoded image; the fitted target is the training rows' median background; a
    cast image's background lands on the target, and grey leaves no hue."""
    cast = np.asarray([1.0, 0.92, 0.7])  # a yellow lamp
    train = [Image.fromarray(synthetic_cell(128, (64, 64), 25, seed=s, red_cells=False)) for s in range(3)]
    variant = Variant.from_dict(
        {"name": "wbg", "steps": [{"step": "crop", "margin": 0.15}, {"step": "white_balance"}, {"step": "grey"}]}
    )
    assert variant.analysis_keys() == ["crop_m0.15", "white_balance"] and variant.fitted
    from leukotype.preprocessing import fit_variant

    states = fit_variant(variant, [(f"t{i}.png", im) for i, im in enumerate(train)])
    target = np.asarray(states[1]["target"])
    assert np.allclose(target, BACKGROUND, atol=3)  # the synthetic slide's colour
    shifted = Image.fromarray((synthetic_cell(128, (60, 70), 25, seed=9, red_cells=False) * cast).round().astype(np.uint8))
    step = variant.steps[1]
    row = step.analyse(shifted)
    assert row["status"] == "found" and np.allclose(step.background(row), np.asarray(BACKGROUND) * cast, atol=3)
    balanced = np.asarray(ImagePreparer(Variant("wb", variant.steps[:2]), states=states[:2])(shifted, "s.png"), dtype=float)
    assert np.abs(np.median(balanced[:4].reshape(-1, 3), axis=0) - target).max() < 4  # border is background
    out = np.asarray(ImagePreparer(variant, states=states)(shifted, "s.png"))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])



def test_limit_detail_brings_a_sharp_and_a_blurry_lab_to_one_resolution():
    from leukotype.preprocessing import detail_level, limit_detail, step_from_dict

    rng = np.random.default_rng(0)
    sharp = synthetic_cell(180, (90, 90), 60, seed=5).astype(np.int16)
    sharp = (sharp + rng.integers(-40, 41, size=sharp.shape[:2])[..., None]).clip(0, 255).astype(np.uint8)
    # the same cell through coarser optics and framed tighter: another lab's 120-px image
    blurry = np.asarray(Image.fromarray(sharp).resize((30, 30), Image.BOX).resize((120, 120), Image.BICUBIC))
    assert detail_level(sharp) > 3 * detail_level(blurry)
    out_sharp, out_blurry = limit_detail(sharp, 24), limit_detail(blurry, 24)
    assert out_sharp.shape == sharp.shape and out_sharp.dtype == np.uint8  # the image keeps its size
    assert abs(detail_level(out_sharp) - detail_level(out_blurry)) < 0.25 * detail_level(out_blurry)
    assert np.abs(out_sharp.astype(float).mean((0, 1)) - sharp.mean((0, 1))).max() < 2  # colour kept
    assert np.array_equal(limit_detail(blurry, 120), blurry)  # no coarser than the image: unchanged
    assert detail_level(np.full((50, 50, 3), 128, np.uint8)) == 0.0  # a flat image has no detail
    step = step_from_dict({"step": "resample", "side": 24})
    assert np.array_equal(np.asarray(step.apply(Image.fromarray(sharp), None)), out_sharp)
    assert step.to_dict() == {"step": "resample", "side": 24}
    with pytest.raises(LeukotypeError, match="side must be an integer >= 8"):
        step_from_dict({"step": "resample", "side": 4})

"""End-to-end: preprocessing variants as a DAG dimension on a tiny synthetic study.

One model (EfficientNet-Lite0 features -> SVM), one task, no rotations, three variants (none,
crop + Reinhard, colour views) and the demo's external set: a handful of small jobs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_helpers import REPO, planned_jobs, snakemake

pytestmark = pytest.mark.e2e

VARIANTS = [
    {"name": "none"},
    {"name": "cropstain", "steps": [{"step": "crop", "margin": 0.15}, {"step": "stain", "method": "reinhard"}]},
    {"name": "colour", "steps": [{"step": "colour", "views": 2}]},
]
RUN = "results/runs/subtype/features_svm/efficientnet_lite0{}/pool/holdout"
EXTERNAL = "external/lab2/none/metrics.json"
FEW_SHOT = "external/lab2/shots"


def _config(workdir: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
    cfg["tasks"] = [t for t in cfg["tasks"] if t["name"] == "subtype"]
    cfg["augmentation"] = {"rotations": []}
    cfg["models"] = [{"backbone": "efficientnet_lite0", "weights": "imagenet", "strategies": ["features_svm"]}]
    cfg["preprocessing"] = VARIANTS
    cfg["evaluation"] = {"n_bootstrap": 50, "external": [
        {"name": "lab2", "source": "demo", "tasks": ["subtype"], "train_per_class": 2, "shot_weight": "balanced",
         "shot_method": "augment"}]}
    path = workdir / "variants.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _targets() -> list[str]:
    runs = [RUN.format(s) for s in ("", "@cropstain", "@colour")]
    run = RUN.format("@cropstain")
    return [f"{r}/metrics.json" for r in runs] + [f"{run}/{EXTERNAL}", f"{run}/{FEW_SHOT}/metrics.json"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path]:
    workdir = tmp_path_factory.mktemp("variants")
    config = _config(workdir)
    snakemake(workdir, *_targets(), configfile=config)
    return workdir, config


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False, dtype={"group": str, "image_id": str})


def _features(folder: Path) -> tuple[pd.DataFrame, np.ndarray]:
    return read(folder / "index.tsv"), np.load(folder / "pool.npy")


def test_variants_have_their_own_features_cached_per_image_and_transform(study):
    workdir, config = study
    validated = read(workdir / "results/data/validated.tsv")
    n_images = int((validated["status"] == "ok").sum())
    plain_index, plain = _features(workdir / "results/features/efficientnet_lite0")
    crop_index, crop = _features(workdir / "results/features/efficientnet_lite0@cropstain")
    colour_index, colour = _features(workdir / "results/features/efficientnet_lite0@colour")
    assert len(plain_index) == len(crop_index) == n_images  # identity only: rotations are off
    assert colour_index.groupby("transform").size().to_dict() == {"identity": n_images, "colour1": n_images, "colour2": n_images}
    assert plain_index.equals(crop_index)
    # the variant changes what the network sees: every image's features differ
    assert (np.abs(crop - plain).max(axis=1) > 1e-3).all()
    # colour views are training samples; the identity rows are the plain images
    identity = colour_index["transform"] == "identity"
    np.testing.assert_allclose(colour[identity.to_numpy()], plain, rtol=0, atol=1e-5)
    assert (np.abs(colour[~identity.to_numpy()][:n_images] - plain).max(axis=1) > 1e-3).all()
    meta = json.loads((workdir / "results/features/efficientnet_lite0@cropstain/meta.json").read_text())
    assert [s["step"] for s in meta["image_steps"]["variant"]["steps"]] == ["crop", "stain"]
    # the colour variant's SVM trained on three samples per training image, the others on one
    train = {v: read(workdir / f"results/data/samples/subtype{s}.tsv") for v, s in (("none", ""), ("colour", "@colour"))}
    n_train = int((train["none"]["part"] == "train").sum())
    assert int((train["colour"]["part"] == "train").sum()) == 3 * n_train
    assert not (workdir / "results/data/samples/subtype@cropstain.tsv").exists()  # no views: the plain table
    # nothing changed: nothing reruns (the cache is per image x transform and variant)
    result = snakemake(workdir, "-n", *_targets(), configfile=config)
    assert planned_jobs(result) == {}


def test_crop_boxes_per_image_and_a_stain_reference_from_training_images_only(study):
    workdir, _ = study
    crops = read(workdir / "results/preprocessing/crop_m0.15/images.tsv")
    validated = read(workdir / "results/data/validated.tsv")
    assert crops["image_id"].tolist() == validated.loc[validated["status"] == "ok", "image_id"].tolist()
    found = crops[crops["status"] == "found"]
    assert len(found) >= 0.9 * len(crops) and (found["reason"] == "").all()
    assert (crops.loc[crops["status"] != "found", "reason"].str.startswith("no_cell:")).all()
    assert (found["side"].astype(int) > 0).all()
    # the external set's own boxes, from its own images (the training table holds none of them)
    external = read(workdir / "results/external/lab2/validated.tsv")
    external_crops = read(workdir / "results/external/lab2/preprocessing/crop_m0.15/images.tsv")
    assert external_crops["abspath"].tolist() == external.loc[external["status"] == "ok", "abspath"].tolist()
    assert not set(external_crops["abspath"]) & set(crops["abspath"])
    state = json.loads((workdir / "results/preprocessing/cropstain/state.json").read_text())
    split = read(workdir / "results/data/splits/subtype.tsv")
    train = set(split.loc[split["part"] == "train", "image_id"])
    assert state["image_ids"] and set(state["image_ids"]) <= train  # never a test image
    assert state["n_images"] == len(train)  # all of them (fewer than reference_images)
    reference = state["states"][1]
    assert reference["method"] == "reinhard" and len(reference["mean"]) == 3
    assert state["states"][0] is None  # the crop step fits nothing


def test_a_variant_is_scored_on_the_external_set(study):
    workdir, _ = study
    record = json.loads((workdir / RUN.format("@cropstain") / EXTERNAL).read_text())
    assert record["prep"] == "cropstain" and record["model"] == "efficientnet_lite0-pool@cropstain"
    external = read(workdir / "results/external/lab2/validated.tsv")
    assert record["n_external"] == int((external["status"] == "ok").sum()) > 0
    low, high = record["external_ci"]["accuracy"]
    assert 0.0 <= low <= record["external_metrics"]["accuracy"] <= high <= 1.0
    internal = json.loads((workdir / RUN.format("@cropstain") / "metrics.json").read_text())
    assert internal["prep"] == "cropstain"


def test_a_variant_is_refitted_few_shot_on_the_external_sets_own_features(study):
    """train_per_class: 2 cells per class of the set join the run's training part; the record
    is scored on the set's other cells, and the job read the variant's external features."""
    workdir, _ = study
    run = workdir / RUN.format("@cropstain")
    record = json.loads((run / FEW_SHOT / "metrics.json").read_text())
    shots = read(run / FEW_SHOT / "shots.tsv")
    scored = read(run / FEW_SHOT / "predictions.tsv")
    external = read(workdir / "results/external/lab2/validated.tsv")
    n_ok = int((external["status"] == "ok").sum())
    assert record["adapt"] == "shots" and record["prep"] == "cropstain" and record["train_per_class"] == 2
    assert record["shots_per_class"] == shots.groupby("label").size().to_dict()
    assert set(record["shots_per_class"]) == set(record["shared_classes"])
    assert all(1 <= n <= 2 for n in record["shots_per_class"].values())
    assert record["n_external"] == len(scored) == n_ok - len(shots)
    assert not set(scored["image_id"]) & set(shots["image_id"].astype(str))
    # the refitted model's internal predictions: the run's test part, every image
    internal = read(run / FEW_SHOT / "internal_predictions.tsv")
    assert set(internal["image_id"]) == set(read(run / "predictions.tsv")["image_id"])
    log = (workdir / "results/logs/adapt_external_svm/subtype/features_svm/efficientnet_lite0@cropstain/pool/holdout/lab2.log").read_text()
    assert f"+ {len(shots)} cells of lab2" in log
    # shot_weight: balanced: the lab's cells together weigh as much as the training rows
    n_train = int((read(workdir / "results/data/samples/subtype.tsv")["part"] == "train").sum())
    assert record["shot_weight"] == "balanced" and record["weight_per_shot"] == pytest.approx(n_train / len(shots))
    assert shots["weight"].tolist() == pytest.approx([n_train / len(shots)] * len(shots))
    # the run's own model and its unadapted external record are untouched by the refit
    assert json.loads((run / EXTERNAL).read_text())["n_external"] == n_ok


def test_bundle_of_a_crop_and_stain_run_reproduces_its_predictions(study, tmp_path):
    """The bundle records the variant's steps and stain reference; `leukotype predict` finds
    each image's cell itself and reproduces the run's calibrated test probabilities."""
    from leukotype.bundle import load_bundle
    from leukotype.config import Run
    from leukotype.export import export_run
    from leukotype.predict import run_predict

    workdir, _ = study
    run = Run("subtype", "features_svm", "efficientnet_lite0", "pool", "holdout", "cropstain")
    bundle = load_bundle(export_run(workdir / "results", run, tmp_path / "bundle"))
    state = json.loads((workdir / "results/preprocessing/cropstain/state.json").read_text())
    assert bundle.spec["image_steps"]["states"] == state["states"]
    expected = read(workdir / RUN.format("@cropstain") / "predictions.tsv")
    validated = read(workdir / "results/data/validated.tsv").set_index("image_id")
    files = validated.loc[expected["image_id"], "abspath"].tolist()
    # `leukotype predict` on the image files: validation, the variant's steps, features, SVM
    table = run_predict(tmp_path / "bundle", files, tmp_path / "pred.csv", device="cpu")
    assert table["pred"].tolist() == expected["pred"].tolist()
    probs = [f"prob_{c}" for c in bundle.classes]
    np.testing.assert_allclose(table[probs].to_numpy(float), expected[probs].to_numpy(float), rtol=0, atol=1e-6)


def test_few_shot_bundle_predicts_the_other_labs_cells_as_its_run_did(study, tmp_path):
    """`leukotype export --few-shot lab2`: the refitted SVM, the variant's steps; `leukotype
    predict` on the set's image files gives the few-shot run's predictions, and the card says
    which cells it was measured on."""
    from leukotype.bundle import load_bundle
    from leukotype.cli import main
    from leukotype.config import Run
    from leukotype.export import export_run
    from leukotype.predict import run_predict

    workdir, _ = study
    run = "runs/subtype/features_svm/efficientnet_lite0@cropstain/pool/holdout"
    out = tmp_path / "few_shot_bundle"
    assert main(["export", "--results", str(workdir / "results"), "--run", run, "--out", str(out), "--few-shot", "lab2"]) == 0
    bundle = load_bundle(out)
    # the refitted SVM, not the run's own
    digest = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in (
        ("bundle", bundle.path(bundle.spec["classifier"]["file"])),
        ("refitted", workdir / "results" / run / FEW_SHOT / "svm.skops"), ("run", workdir / "results" / run / "svm.skops"))}
    assert digest["bundle"] == digest["refitted"] != digest["run"]
    record = json.loads((workdir / "results" / run / FEW_SHOT / "metrics.json").read_text())
    assert bundle.spec["few_shot"]["shots_per_class"] == record["shots_per_class"]
    assert bundle.spec["metrics"]["n_test"] == record["n_external"]
    # the run's own bundle is still the run's: no few-shot record, the training part's cells only
    plain = load_bundle(export_run(workdir / "results", Run.from_path(run), tmp_path / "plain"))
    n_shots = sum(record["shots_per_class"].values())
    assert plain.spec["few_shot"] is None and n_shots > 0
    assert bundle.spec["training_data"]["n_train_images"] == plain.spec["training_data"]["n_train_images"] + n_shots
    expected = read(workdir / "results" / run / FEW_SHOT / "predictions.tsv")
    validated = read(workdir / "results/external/lab2/validated.tsv").set_index("image_id")
    table = run_predict(out, validated.loc[expected["image_id"], "abspath"].tolist(), tmp_path / "pred.csv", device="cpu")
    assert table["pred"].tolist() == expected["pred"].tolist()
    card = (out / "MODEL_CARD.md").read_text()
    assert f"other {record['n_external']} cells" in card and "Few-shot model for the lab of `lab2`" in card
    assert bundle.spec["few_shot"]["weight_per_shot"] == record["weight_per_shot"] > 1
    assert f"each weighing {record['weight_per_shot']:.3g} training rows" in card
    assert bundle.spec["few_shot"]["shot_method"] == record["shot_method"] == "augment" and "feature-augmented" in card
    # its temperature was fitted on augmented refits' scores, over the training rows and the lab's cells
    calibration = bundle.spec["calibration"]
    assert "each row scored by its own lab's view" in calibration["fitted_on"]
    assert calibration["n"] == plain.spec["training_data"]["n_train_images"] + n_shots

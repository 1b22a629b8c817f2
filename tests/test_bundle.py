"""Model bundles, calibration, the out-of-distribution score and saliency on small synthetic data.

The bundles of a real workflow run (round trip against predictions.tsv, predict on a folder
with bad files) are tested on the end-to-end study in ``test_workflow.py``; the
out-of-distribution flag on real cells in ``test_bundle_real.py``.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from leukotype import bundle as fmt
from leukotype.calibration import (
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    fit_svm_calibration,
    fit_temperature,
    softmax,
)
from leukotype.errors import LeukotypeError
from leukotype.ood import fit_ood


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(logits); the model reports 4x the logits (over-confident)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 4)) * 1.5
    true_p = softmax(logits)
    labels = np.array([rng.choice(4, p=p) for p in true_p])
    return 4.0 * logits, labels


def test_temperature_scaling_lowers_ece_of_an_overconfident_model_on_held_out_data():
    fit_scores, fit_labels = _overconfident(3000, seed=0)
    held_scores, held_labels = _overconfident(3000, seed=1)
    temperature = fit_temperature(fit_scores, fit_labels)
    assert temperature == pytest.approx(4.0, rel=0.1)  # it undoes the factor of 4
    before = expected_calibration_error(softmax(held_scores), held_labels)
    after = expected_calibration_error(softmax(held_scores, temperature), held_labels)
    assert before > 0.15 and after < 0.03
    assert brier_score(softmax(held_scores, temperature), held_labels) < brier_score(softmax(held_scores), held_labels)
    # the labels never change: temperature keeps the arg-max
    assert (softmax(held_scores, temperature).argmax(1) == held_scores.argmax(1)).all()


def test_ece_and_brier_match_hand_computed_values():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    # bins of width 1/15: 0.9 -> (0.8667, 0.9333], 0.8 -> (0.7333, 0.8], 0.7 -> (0.6667, 0.7333],
    # 0.6 -> (0.5333, 0.6]: one sample each, |acc - conf| = 0.1, 0.8, 0.3, 0.4
    assert expected_calibration_error(p, y) == pytest.approx((0.1 + 0.8 + 0.3 + 0.4) / 4)
    # Brier: sum over classes of squared error, averaged
    expected = np.mean([0.01 + 0.01, 0.64 + 0.64, 0.09 + 0.09, 0.16 + 0.16])
    assert brier_score(p, y) == pytest.approx(expected)
    result = calibration_metrics(p, y, n_boot=200, seed=0)
    low, high = result["ci"]["ece"]
    assert low <= result["metrics"]["ece"] <= high


def test_svm_calibration_uses_out_of_fold_scores_of_the_training_part():
    from leukotype.classify import make_svm_pipeline

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 1.2
    y = np.repeat(["a", "b", "c"], 60)
    X = centres[np.repeat([0, 1, 2], 60)] + rng.normal(size=(180, 8))
    groups = np.array([f"g{i // 2}" for i in range(180)])
    pipeline = make_svm_pipeline(kernel="linear", C=1.0).fit(X, y)
    record = fit_svm_calibration(pipeline, X, y, groups, ["a", "b", "c"], cv_folds=3, seed=0)
    assert record["method"] == "temperature" and record["n"] == 180
    assert record["nll_after"] <= record["nll_before"]
    assert 0 < record["temperature"] < 100


def test_ood_distance_flags_shifted_features_and_few_in_distribution_ones():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(5, 64))
    train = rng.normal(size=(300, 5)) @ basis + 0.1 * rng.normal(size=(300, 64))
    groups = [f"g{i}" for i in range(300)]
    density = fit_ood(train, groups, quantile=0.95)
    fresh = rng.normal(size=(400, 5)) @ basis + 0.1 * rng.normal(size=(400, 64))
    shifted = fresh + 0.8 * rng.normal(size=(400, 64))  # varies where training never did
    flagged_fresh = np.mean(density.distance(fresh) > density.threshold)
    flagged_shifted = np.mean(density.distance(shifted) > density.threshold)
    assert flagged_fresh < 0.12  # about 1 - quantile, not the in-sample optimism
    assert flagged_shifted > 0.95


def _tiny_bundle(tmp_path, versions=None):
    from leukotype.backbones import get_spec

    spec = {
        "classes": ["a", "b"],
        "preprocessing": {"paper_cnn": fmt.preprocessing_steps(get_spec("paper_cnn"))},
        "provenance": {"versions": versions or {}},
    }
    writers = {fmt.OOD_FILE: lambda path: fmt.save_tensors({"mean": np.zeros(3, np.float32)}, path)}
    return fmt.write_bundle(tmp_path / "bundle", spec, writers, "# card\n")


def test_bundle_manifest_lists_every_file_and_loads(tmp_path):
    from leukotype.io import package_versions

    folder = _tiny_bundle(tmp_path, versions=package_versions())
    listed = fmt.read_manifest(folder)
    assert set(listed) == {fmt.BUNDLE_JSON, fmt.MODEL_CARD, fmt.OOD_FILE}
    loaded = fmt.load_bundle(folder)
    assert loaded.differences == []
    assert loaded.tensors(fmt.OOD_FILE)["mean"].tolist() == [0.0, 0.0, 0.0]


def test_tampered_bundle_file_fails_its_sha256_with_the_file_named(tmp_path):
    folder = _tiny_bundle(tmp_path)
    spec_path = folder / fmt.BUNDLE_JSON
    spec = json.loads(spec_path.read_text())
    spec["classes"] = ["b", "a"]  # swapping labels: the kind of change that must not pass
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(LeukotypeError, match=r"bundle\.json: sha256 mismatch") as error:
        fmt.load_bundle(folder)
    assert "nothing was loaded" in str(error.value)
    (folder / "extra.py").write_text("print('hi')\n")
    with pytest.raises(LeukotypeError, match=r"extra\.py: not listed"):
        fmt.verify_bundle(folder)


def test_bundle_from_another_version_states_what_differs(tmp_path):
    from leukotype.io import package_versions

    versions = {**package_versions(), "leukotype": "0.0.9", "torch": "2.0.0"}
    loaded = fmt.load_bundle(_tiny_bundle(tmp_path, versions=versions))
    assert f"leukotype: bundle made with 0.0.9, installed {package_versions()['leukotype']}" in loaded.differences
    assert any(line.startswith("torch: bundle made with 2.0.0") for line in loaded.differences)


def test_bundle_needing_an_unknown_preprocessing_step_is_refused(tmp_path):
    folder = _tiny_bundle(tmp_path)
    spec = json.loads((folder / fmt.BUNDLE_JSON).read_text())
    spec["preprocessing"]["paper_cnn"].insert(1, {"op": "stain_normalise_v9"})
    (folder / fmt.BUNDLE_JSON).write_text(json.dumps(spec))
    fmt.write_manifest(folder)
    with pytest.raises(LeukotypeError, match="stain_normalise_v9"):
        fmt.load_bundle(folder)



def test_reliability_diagram_from_metrics_records(tmp_path):
    from leukotype.calibration import reliability_bins
    from leukotype.calibration_plots import plot_reliability

    scores, labels = _overconfident(400, seed=2)
    records = []
    for strategy, temperature in (("features_svm", 1.0), ("finetune", 4.0)):
        p = softmax(scores, temperature)
        bins = {k: v.tolist() for k, v in reliability_bins(p, labels).items()}
        records.append({"strategy": strategy, "backbone": "efficientnet_lite0", "layer": "pool",
                        "metrics": {"ece": expected_calibration_error(p, labels)}, "reliability": bins})
    # the over-confident run's curve lies below the diagonal, the calibrated one on it
    over, calibrated = (np.asarray(r["reliability"]["accuracy"]) - np.asarray(r["reliability"]["confidence"]) for r in records)
    assert np.nanmean(over) < -0.1 and abs(np.nanmean(calibrated[np.asarray(records[1]["reliability"]["count"]) > 20])) < 0.1
    fig = plot_reliability(records, "subtype", tmp_path / "rel.png", dataset="SYNTHETIC: demo")
    assert (tmp_path / "rel.png").stat().st_size > 5_000
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("Fine tuning" in t and "ECE" in t for t in legend) and "perfectly calibrated" in legend


def test_predict_validates_new_images_with_the_bundles_training_settings(tmp_path):
    """A strip fails max_aspect_ratio; a manifest row outside the manifest's folder fails the
    outside-path rule (unless the bundle was trained with allow_outside_paths); each gets a row
    with its reason, the cell passes. Bundles from before these keys read the embedded config."""
    from PIL import Image

    from leukotype.predict import gather_inputs, validate_inputs

    inbox, lab = tmp_path / "inbox", tmp_path / "lab"
    inbox.mkdir(), lab.mkdir()
    Image.new("RGB", (64, 64), (200, 120, 160)).save(inbox / "cell.png")
    Image.new("RGB", (400, 40), (200, 120, 160)).save(inbox / "strip.png")  # 10:1
    Image.new("RGB", (64, 64), (90, 60, 150)).save(tmp_path / "elsewhere.png")
    Image.new("RGB", (64, 64), (90, 60, 150)).save(lab / "inside.png")
    (lab / "list.csv").write_text("path,label\ninside.png,x\n../elsewhere.png,x\n")

    old = fmt.Bundle(tmp_path, {"validation": {"min_side": 32, "max_pixels": 10**6},
                                "provenance": {"config": {"validation": {"max_aspect_ratio": 5,
                                                                         "allow_outside_paths": False}}}})
    assert old.validation == {"min_side": 32, "max_pixels": 10**6, "max_aspect_ratio": 5, "allow_outside_paths": False}
    table = validate_inputs(gather_inputs([inbox, lab / "list.csv"]), old.validation)
    reasons = dict(zip(table["path"].map(lambda p: p.rsplit("/", 1)[-1]), table["reason"]))
    assert set(reasons) == {"cell.png", "strip.png", "inside.png", "elsewhere.png"}  # nothing skipped
    assert reasons["cell.png"] == reasons["inside.png"] == ""
    assert reasons["strip.png"].startswith("extreme_aspect_ratio: 400x40 is 10.0:1 > 5:1")
    assert reasons["elsewhere.png"].startswith("outside_dataset: ")
    assert reasons["elsewhere.png"].endswith("trained without validation.allow_outside_paths: put the image under "
                                             "the manifest's folder, or name it (or its folder) directly")
    assert table.loc[table["reason"] != "", "status"].eq("rejected").all()
    # the md5 of the bytes that were checked; none for a file the outside-path rule never opened
    md5s = dict(zip(table["path"].map(lambda p: p.rsplit("/", 1)[-1]), table["md5"]))
    assert md5s["cell.png"] == hashlib.md5((inbox / "cell.png").read_bytes()).hexdigest()
    assert md5s["strip.png"] == hashlib.md5((inbox / "strip.png").read_bytes()).hexdigest()
    assert md5s["elsewhere.png"] == ""

    permissive = fmt.Bundle(tmp_path, {"validation": {"min_side": 32, "max_pixels": 10**6, "max_aspect_ratio": 20,
                                                      "allow_outside_paths": True}})
    table = validate_inputs(gather_inputs([inbox, lab / "list.csv"]), permissive.validation)
    assert table["status"].eq("ok").all()
    (lab / "new.tsv").write_text("path\ninside.png\n")  # new images: a manifest needs no label column
    unlabelled = gather_inputs([lab / "new.tsv"])
    assert unlabelled["path"].tolist() == ["inside.png"] and "label" not in unlabelled.columns
    assert unlabelled["abspath"].tolist() == [str((lab / "inside.png").resolve())]

"""Test-time augmentation: averaged scores, the flip it can cause, and the TTA metrics/columns."""

import numpy as np
import pandas as pd
import pytest

from leukotype.augment import augmented_samples
from leukotype.metrics import fold_summary
from leukotype.report import paper_table
from leukotype.stages import _add_tta_metrics, fold_parts
from leukotype.tta import tta_predictions

CLASSES = ["A", "B"]
VIEWS = ["identity", "rot90", "rot180", "rot270"]


def _views(image_id, true, probs_a):
    return pd.DataFrame(
        {
            "image_id": image_id,
            "transform": VIEWS[: len(probs_a)],
            "true": true,
            "pred": ["A" if p > 0.5 else "B" for p in probs_a],
            "prob_A": probs_a,
            "prob_B": [1 - p for p in probs_a],
        }
    )


def test_averaged_scores_are_the_mean_of_the_views():
    table = pd.concat([_views("x", "A", [0.9, 0.7, 0.2, 0.6]), _views("y", "B", [0.1, 0.3])])
    averaged = tta_predictions(table, CLASSES).set_index("image_id")
    assert averaged.loc["x", "prob_A"] == pytest.approx(0.6)
    assert averaged.loc["y", "prob_B"] == pytest.approx(0.8)
    assert averaged["n_views"].tolist() == [4, 2]
    assert averaged["pred"].tolist() == ["A", "B"]
    assert (averaged["transform"] == "identity").all()


def test_a_wrong_identity_view_flips_when_the_rotated_views_are_right():
    # Image z is class B: its identity view says A (0.8), its three rotations say B (0.3 each).
    table = pd.concat([_views("z", "B", [0.8, 0.3, 0.3, 0.3]), _views("w", "A", [0.9, 0.8, 0.7, 0.6])])
    averaged = tta_predictions(table, CLASSES).set_index("image_id")
    assert averaged.loc["z", "prob_A"] == pytest.approx(0.425)
    assert averaged.loc["z", "pred"] == "B"
    record = {"metrics": {"accuracy": 0.5}, "ci": {}}
    _add_tta_metrics(record, table, CLASSES, {"z": "g1", "w": "g2"}, {"n_bootstrap": 50, "seed": 0})
    assert record["metrics"]["accuracy_tta"] == 1.0
    assert record["metrics"]["balanced_accuracy_tta"] == 1.0
    assert record["tta"]["n_views"] == 4


def test_identity_only_predictions_gain_no_tta_metrics():
    record = {"metrics": {}, "ci": {}}
    _add_tta_metrics(record, _views("z", "B", [0.8]), CLASSES, {"z": "g"}, {"n_bootstrap": 10, "seed": 0})
    assert record == {"metrics": {}, "ci": {}}


def test_tta_gives_test_images_every_view_and_keeps_them_out_of_training():
    split = pd.DataFrame({"image_id": ["a", "b", "c"], "label": "L", "group": ["a", "b", "c"],
                          "fold": "holdout", "part": ["train", "train", "test"]})
    plain = augmented_samples(split, ["rot90"])
    tta = augmented_samples(split, ["rot90"], tta=True)
    assert plain[plain["part"] == "test"]["transform"].tolist() == ["identity"]
    assert tta[tta["part"] == "test"]["transform"].tolist() == ["identity", "rot90"]
    train, test = fold_parts(tta, "holdout")
    assert set(train["image_id"]) == {"a", "b"} and test["image_id"].tolist() == ["c", "c"]


def test_tables_show_a_run_with_and_without_tta():
    base = {"task": "t", "strategy": "features_svm", "backbone": "vgg16", "layer": "fc6", "fold": "holdout",
            "classes": CLASSES, "n_test": 2}
    metrics = {"accuracy": 0.5, "precision_macro": 0.5, "recall_macro": 0.5, "f1_macro": 0.5,
               "balanced_accuracy": 0.5, "kappa": 0.0}
    with_tta = {**base, "metrics": {**metrics, "accuracy_tta": 1.0, "balanced_accuracy_tta": 0.75}, "ci": {}}
    table = paper_table(fold_summary([with_tta]), "t")
    assert table["Accuracy"].iloc[0].startswith("50.0")
    assert table["Accuracy (TTA)"].iloc[0].startswith("100.0")
    assert table["Balanced accuracy (TTA)"].iloc[0].startswith("75.0")
    plain = paper_table(fold_summary([{**base, "metrics": metrics, "ci": {}}]), "t")
    assert "Accuracy (TTA)" not in plain.columns
    assert np.isfinite(fold_summary([with_tta])["accuracy_tta_mean"]).all()


@pytest.mark.parametrize("enabled", [True, False])
def test_predict_applies_the_bundles_tta_setting(tmp_path, enabled):
    """With the bundle's TTA on, predict scores every view of a new image and averages the
    probabilities and distances (the rotated views outvote a wrong identity view); off, it
    scores the identity view alone."""
    from types import SimpleNamespace

    from PIL import Image

    from leukotype.predict import prediction_table

    Image.new("RGB", (40, 40), (200, 120, 150)).save(tmp_path / "cell.png")
    prob_a = {"identity": 0.4, "rot90": 0.9, "rot180": 0.8}
    scored = []

    class Predictor:  # the views' scores, as Predictor.predict_samples gives them
        bundle = SimpleNamespace(
            classes=CLASSES,
            validation={"min_side": 32, "max_pixels": 10**6, "max_aspect_ratio": None, "allow_outside_paths": False},
            spec={"tta": {"enabled": enabled, "transforms": list(prob_a)}, "thresholds": {"low_confidence": 0.75},
                  "ood": {"threshold": 1.0}},
        )

        def predict_samples(self, views):
            scored.append(views["transform"].tolist())
            p = views["transform"].map(prob_a).to_numpy()
            return pd.DataFrame({"image_id": views["image_id"], "transform": views["transform"],
                                 "pred": np.where(p > 0.5, "A", "B"), "prob_A": p, "prob_B": 1 - p,
                                 "ood_distance": views["transform"].map({"identity": 0.5, "rot90": 1.5, "rot180": 2.5})})

    row = prediction_table(Predictor(), [tmp_path / "cell.png"]).iloc[0]
    if enabled:
        assert scored == [["identity", "rot90", "rot180"]]
        assert row["pred"] == "A" and row["prob_A"] == pytest.approx(0.7) and row["confidence"] == pytest.approx(0.7)
        assert row["ood_distance"] == pytest.approx(1.5) and bool(row["ood"]) and bool(row["low_confidence"])
    else:
        assert scored == [["identity"]]
        assert row["pred"] == "B" and row["prob_B"] == pytest.approx(0.6) and row["ood_distance"] == pytest.approx(0.5)
        assert not bool(row["ood"]) and bool(row["low_confidence"])

"""Metrics against hand-computed values, bootstrap behaviour, fold summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from leukotype.errors import LeukotypeError
from leukotype.metrics import (
    METRICS,
    bootstrap_ci,
    classification_metrics,
    confusion_csv,
    evaluate_predictions,
    fold_summary,
)

# Hand example, classes a, b, c. Confusion matrix (rows true, columns predicted):
#        a  b  c   | support
#   a    3  1  1   |   5
#   b    1  2  0   |   3
#   c    0  1  1   |   2
#   pred 4  4  2   n = 10, correct = 6
CLASSES = ["a", "b", "c"]
Y_TRUE = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
Y_PRED = ["a", "a", "a", "b", "c", "b", "b", "a", "c", "b"]
HAND = {
    "accuracy": 6 / 10,
    # precision a 3/4, b 2/4, c 1/2
    "precision_macro": (3 / 4 + 2 / 4 + 1 / 2) / 3,  # 0.58333
    # recall a 3/5, b 2/3, c 1/2
    "recall_macro": (3 / 5 + 2 / 3 + 1 / 2) / 3,  # 0.58889
    # F1 = 2tp / (2tp + fp + fn): a 6/9, b 4/7, c 2/4
    "f1_macro": (6 / 9 + 4 / 7 + 2 / 4) / 3,  # 0.57937
    "balanced_accuracy": (3 / 5 + 2 / 3 + 1 / 2) / 3,
    # p_o = 0.6, p_e = (5*4 + 3*4 + 2*2) / 100 = 0.36, kappa = 0.24 / 0.64
    "kappa": 0.375,
}


def test_classification_metrics_match_hand_computed_values():
    result = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    for name, expected in HAND.items():
        assert result[name] == pytest.approx(expected, abs=1e-12), name
    assert result["confusion"] == [[3, 1, 1], [1, 2, 0], [0, 1, 1]]
    assert result["n"] == 10
    assert result["per_class"]["a"] == pytest.approx(
        {"precision": 0.75, "recall": 0.6, "f1": 2 / 3, "support": 5}
    )
    assert result["per_class"]["b"]["f1"] == pytest.approx(4 / 7)
    assert result["per_class"]["c"]["support"] == 2


def test_absent_class_counts_as_zero_in_macro_average_but_not_in_balanced_accuracy():
    result = classification_metrics(Y_TRUE, Y_PRED, CLASSES + ["d"])
    assert result["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert result["precision_macro"] == pytest.approx(1.75 / 4)
    assert result["recall_macro"] == pytest.approx((3 / 5 + 2 / 3 + 1 / 2) / 4)
    assert result["balanced_accuracy"] == pytest.approx(HAND["balanced_accuracy"])
    assert result["confusion"][3] == [0, 0, 0, 0]


def test_metrics_agree_with_scikit_learn_on_random_labels():
    rng = np.random.default_rng(3)
    classes = ["L1", "L2", "M2", "M3", "M5"]
    y_true = rng.choice(classes, 300, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.choice(classes[:4], 300))
    result = classification_metrics(y_true, y_pred, classes)
    kw = {"labels": classes, "average": "macro", "zero_division": 0}
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert result["precision_macro"] == pytest.approx(skm.precision_score(y_true, y_pred, **kw))
    assert result["recall_macro"] == pytest.approx(skm.recall_score(y_true, y_pred, **kw))
    assert result["f1_macro"] == pytest.approx(skm.f1_score(y_true, y_pred, **kw))
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert result["kappa"] == pytest.approx(skm.cohen_kappa_score(y_true, y_pred, labels=classes))
    assert result["confusion"] == skm.confusion_matrix(y_true, y_pred, labels=classes).tolist()


def test_kappa_is_nan_when_undefined_and_unknown_labels_are_named():
    assert math.isnan(classification_metrics(["a", "a"], ["a", "a"], ["a", "b"])["kappa"])
    with pytest.raises(LeukotypeError, match=r"\['z'\]"):
        classification_metrics(["a", "z"], ["a", "a"], ["a", "b"])
    with pytest.raises(LeukotypeError, match="pair up"):
        classification_metrics(["a"], ["a", "b"], ["a", "b"])


# ------------------------------------------------------------------------------- bootstrap


def _noisy_labels(n: int, accuracy: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.choice(CLASSES, n)
    wrong = rng.random(n) > accuracy
    shifted = np.array(CLASSES)[(np.searchsorted(CLASSES, y_true) + 1) % 3]
    return y_true, np.where(wrong, shifted, y_true)


def test_bootstrap_ci_contains_point_estimate_and_is_deterministic():
    y_true, y_pred = _noisy_labels(200, 0.8, seed=1)
    point = classification_metrics(y_true, y_pred, CLASSES)
    ci = bootstrap_ci(y_true, y_pred, CLASSES, n_boot=500, seed=7)
    assert set(ci) == set(METRICS)
    for name, (low, high) in ci.items():
        assert low <= point[name] <= high, name
        assert low < high, name
    assert bootstrap_ci(y_true, y_pred, CLASSES, n_boot=500, seed=7) == ci
    assert bootstrap_ci(y_true, y_pred, CLASSES, n_boot=500, seed=8) != ci


def test_bootstrap_ci_narrows_with_more_data():
    y_true, y_pred = _noisy_labels(100, 0.8, seed=2)
    small = bootstrap_ci(y_true, y_pred, CLASSES, n_boot=1000, seed=0)
    large = bootstrap_ci(np.tile(y_true, 16), np.tile(y_pred, 16), CLASSES, n_boot=1000, seed=0)
    for name in ("accuracy", "f1_macro", "balanced_accuracy"):
        width_small = small[name][1] - small[name][0]
        width_large = large[name][1] - large[name][0]
        # sqrt(16) = 4 times narrower in theory; allow for Monte-Carlo noise
        assert width_large < 0.4 * width_small, name


def test_group_bootstrap_resamples_whole_groups():
    # 20 groups of 10 images; all errors sit in 4 groups, so groups are strongly correlated.
    y_true = np.array(CLASSES * 67)[:200]
    y_pred = y_true.copy()
    groups = np.repeat(np.arange(20), 10)
    wrong = np.isin(groups, [0, 1, 2, 3])
    y_pred[wrong] = np.array(CLASSES)[(np.searchsorted(CLASSES, y_true[wrong]) + 1) % 3]
    assert classification_metrics(y_true, y_pred, CLASSES)["accuracy"] == pytest.approx(0.8)

    independent = bootstrap_ci(y_true, y_pred, CLASSES, n_boot=2000, seed=0)["accuracy"]
    clustered = bootstrap_ci(y_true, y_pred, CLASSES, n_boot=2000, seed=0, groups=groups)[
        "accuracy"
    ]
    # resampling groups of 10 correlated errors widens the interval by about sqrt(10)
    assert clustered[1] - clustered[0] > 2.0 * (independent[1] - independent[0])
    # accuracy of a group resample is a multiple of 1/20 (each group: all right or all wrong)
    assert clustered[0] * 20 == pytest.approx(round(clustered[0] * 20))

    # a single group: every resample is the whole data set
    one = bootstrap_ci(y_true, y_pred, CLASSES, n_boot=50, seed=0, groups=["p1"] * 200)
    assert one["accuracy"] == pytest.approx((0.8, 0.8))
    with pytest.raises(LeukotypeError, match="one group id per prediction"):
        bootstrap_ci(y_true, y_pred, CLASSES, groups=groups[:5])


def test_bootstrap_of_10k_predictions_matches_the_binomial_interval():
    # At 10k predictions the percentile interval of accuracy must agree with the normal
    # approximation of a binomial proportion, with and without (independent) pairs as groups.
    # Its speed is a benchmark matter (bench/), not a timed test.
    y_true, y_pred = _noisy_labels(10_000, 0.7, seed=4)
    accuracy = float(np.mean(y_true == y_pred))
    half_width = 1.96 * math.sqrt(accuracy * (1.0 - accuracy) / 10_000)
    independent = bootstrap_ci(y_true, y_pred, CLASSES, n_boot=1000, seed=0)["accuracy"]
    paired = bootstrap_ci(
        y_true, y_pred, CLASSES, n_boot=1000, seed=0, groups=np.arange(10_000) // 2
    )["accuracy"]
    for low, high in (independent, paired):
        assert low < accuracy < high
        assert (high - low) / 2.0 == pytest.approx(half_width, rel=0.15)
        assert (low + high) / 2.0 == pytest.approx(accuracy, abs=0.002)


# ------------------------------------------------------------------------------- records


def _prediction_table() -> pd.DataFrame:
    ids = [f"img{i:06d}" for i in range(10)]
    identity = pd.DataFrame(
        {"image_id": ids, "transform": "identity", "true": Y_TRUE, "pred": Y_PRED}
    )
    # augmented rows must be ignored: make them all wrong
    rotated = identity.assign(transform="rot90", pred="c")
    return pd.concat([identity, rotated], ignore_index=True)


def test_evaluate_predictions_builds_strict_json_record_from_identity_rows():
    meta = {
        "task": "subtype",
        "strategy": "features_svm",
        "backbone": "vgg16",
        "layer": "fc6",
        "fold": "holdout",
        "config": {"evaluation": {"n_bootstrap": 200}},
    }
    record = evaluate_predictions(_prediction_table(), CLASSES, meta, n_boot=200, seed=0)
    assert record["model"] == "vgg16-fc6"
    assert record["task"] == "subtype" and record["fold"] == "holdout"
    assert "config" not in record
    assert record["provenance"]["config"] == meta["config"]
    assert record["provenance"]["seed"] == 0
    assert record["n_test"] == 10
    assert record["classes"] == CLASSES
    for name, expected in HAND.items():
        assert record["metrics"][name] == pytest.approx(expected), name
        low, high = record["ci"][name]
        assert low <= high
    assert record["confusion"] == [[3, 1, 1], [1, 2, 0], [0, 1, 1]]
    assert record["ci_method"]["resample"] == "images"
    json.dumps(record, allow_nan=False)  # strict JSON

    groups = {f"img{i:06d}": f"p{i // 2}" for i in range(10)}
    grouped = evaluate_predictions(
        _prediction_table(), CLASSES, meta, n_boot=50, seed=0, groups=groups
    )
    assert grouped["ci_method"]["resample"] == "groups"
    with pytest.raises(LeukotypeError, match="no group given"):
        evaluate_predictions(
            _prediction_table(), CLASSES, meta, n_boot=50, groups={"img000000": "p"}
        )


def test_evaluate_predictions_rejects_bad_tables():
    table = _prediction_table()
    with pytest.raises(LeukotypeError, match="lacks columns"):
        evaluate_predictions(table.drop(columns="transform"), CLASSES, {}, n_boot=10)
    with pytest.raises(LeukotypeError, match="no 'identity' rows"):
        evaluate_predictions(table[table["transform"] == "rot90"], CLASSES, {}, n_boot=10)
    doubled = pd.concat([table, table.iloc[:1]])
    with pytest.raises(LeukotypeError, match="repeats image ids"):
        evaluate_predictions(doubled, CLASSES, {}, n_boot=10)


def test_confusion_csv_has_class_labels(tmp_path):
    record = {"classes": CLASSES, "confusion": [[3, 1, 1], [1, 2, 0], [0, 1, 1]]}
    path = tmp_path / "confusion.csv"
    confusion_csv(record, path)
    assert path.read_text() == "true\\pred,a,b,c\na,3,1,1\nb,1,2,0\nc,0,1,1\n"


# ------------------------------------------------------------------------------- fold summary


def _record(
    fold: str,
    accuracy: float,
    *,
    strategy="finetune",
    backbone="vgg16",
    layer="softmax",
    ci=(0.0, 1.0),
    task="subtype",
) -> dict:
    return {
        "task": task,
        "strategy": strategy,
        "backbone": backbone,
        "layer": layer,
        "fold": fold,
        "classes": CLASSES,
        "n_test": 10,
        "metrics": {name: accuracy for name in METRICS},
        "ci": {name: list(ci) for name in METRICS},
    }


def test_fold_summary_mean_sd_and_t_interval_match_hand_values():
    records = [_record("r0f0", 0.80), _record("r0f1", 0.90), _record("r0f2", 0.85)]
    summary = fold_summary(records)
    assert len(summary) == 1
    row = summary.iloc[0]
    assert (row["task"], row["strategy"], row["model"], row["scheme"]) == (
        "subtype",
        "finetune",
        "vgg16-softmax",
        "kfold",
    )
    assert row["n_folds"] == 3 and row["n_test"] == 30 and row["n_classes"] == 3
    assert row["accuracy_mean"] == pytest.approx(0.85)
    # sd (ddof=1) = sqrt((0.05^2 + 0.05^2 + 0) / 2) = 0.05
    assert row["accuracy_sd"] == pytest.approx(0.05)
    # t(0.975, 2) = 4.302653; half width = 4.302653 * 0.05 / sqrt(3) = 0.1242069
    assert row["accuracy_ci_lo"] == pytest.approx(0.85 - 0.1242069, abs=1e-6)
    assert row["accuracy_ci_hi"] == pytest.approx(0.85 + 0.1242069, abs=1e-6)
    assert row["ci_method"] == "t"


def test_fold_summary_single_fold_uses_bootstrap_interval_and_clips_t_interval():
    holdout = _record(
        "holdout", 0.92, strategy="features_svm", backbone="alexnet", layer="fc6", ci=(0.90, 0.94)
    )
    # two folds: t(0.975, 1) = 12.706 makes the raw interval exceed 1
    kfold = [_record("r0f0", 0.80), _record("r0f1", 0.90)]
    summary = fold_summary([*kfold, holdout]).set_index("model")
    single = summary.loc["alexnet-fc6"]
    assert single["n_folds"] == 1 and single["scheme"] == "holdout"
    assert math.isnan(single["accuracy_sd"])
    assert (single["accuracy_ci_lo"], single["accuracy_ci_hi"]) == (0.90, 0.94)
    assert single["ci_method"] == "bootstrap"
    two = summary.loc["vgg16-softmax"]
    assert two["accuracy_sd"] == pytest.approx(math.sqrt(0.005))
    # mean 0.85, sd/sqrt(2) = 0.05: 0.85 - 12.7062047 * 0.05 = 0.2146898; upper end clipped to 1
    assert two["accuracy_ci_lo"] == pytest.approx(0.2146898, abs=1e-6)
    assert two["accuracy_ci_hi"] == 1.0


def test_fold_summary_rejects_repeated_folds_and_incomplete_records():
    with pytest.raises(LeukotypeError, match="more than once"):
        fold_summary([_record("r0f0", 0.8), _record("r0f0", 0.9)])
    with pytest.raises(LeukotypeError, match="lacks"):
        fold_summary([{"task": "t", "fold": "holdout"}])
    with pytest.raises(LeukotypeError, match="at least one"):
        fold_summary([])


def test_fold_summary_skips_undefined_kappa_folds():
    records = [_record("r0f0", 0.80), _record("r0f1", 0.90), _record("r0f2", 0.85)]
    records[2]["metrics"]["kappa"] = None  # undefined in one fold (stored as JSON null)
    row = fold_summary(records).iloc[0]
    assert row["kappa_mean"] == pytest.approx(0.85)
    assert row["kappa_sd"] == pytest.approx(math.sqrt(0.005))
    # two defined folds: t(0.975, 1) = 12.7062047, half width 12.7062047 * 0.05 = 0.635
    assert row["kappa_ci_lo"] == pytest.approx(0.85 - 0.6353102, abs=1e-6)
    assert row["kappa_ci_hi"] == 1.0
    records[1]["metrics"]["kappa"] = None
    row = fold_summary(records).iloc[0]
    assert row["kappa_mean"] == pytest.approx(0.80)
    assert math.isnan(row["kappa_sd"]) and math.isnan(row["kappa_ci_lo"])

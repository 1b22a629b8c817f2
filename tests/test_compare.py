"""Paired comparisons: McNemar, paired bootstrap, Holm and Nadeau-Bengio against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from leukotype.compare import (
    MCNEMAR,
    NADEAU_BENGIO,
    compare_runs,
    fold_sizes_from_samples,
    holm,
    mcnemar_exact,
    nadeau_bengio,
    paired_bootstrap,
    run_predictions,
    standing_against_best,
)
from leukotype.errors import LeukotypeError

CLASSES = ["L1", "L2"]


def _design(n=100, common=60, a_only=10, b_only=0):
    """Labels and two runs' predictions: both right on ``common`` cells, A alone right on
    ``a_only`` more, B alone on ``b_only`` more, both wrong on the rest."""
    true = np.array(["L1", "L2"] * (n // 2))
    flip = {"L1": "L2", "L2": "L1"}
    wrong = np.array([flip[t] for t in true])
    pred_a, pred_b = wrong.copy(), wrong.copy()
    pred_a[:common] = pred_b[:common] = true[:common]
    pred_a[common : common + a_only] = true[common : common + a_only]
    pred_b[common + a_only : common + a_only + b_only] = true[common + a_only : common + a_only + b_only]
    return true, pred_a, pred_b


def _frame(ids, true, pred, transform="identity"):
    return pd.DataFrame({"image_id": ids, "transform": transform, "true": true, "pred": pred})


def test_mcnemar_matches_the_binomial_test_computed_by_hand():
    true, pred_a, pred_b = _design(a_only=12, b_only=4)
    result = mcnemar_exact(pred_a == true, pred_b == true)
    assert (result["a_only"], result["b_only"]) == (12, 4)
    assert result["statistic"] == 4.0  # the smaller discordant count
    # two-sided exact binomial: 2 * P(X <= 4), X ~ Bin(16, 1/2)
    by_hand = 2 * sum(math.comb(16, i) for i in range(5)) / 2**16
    assert by_hand == pytest.approx(0.076812744140625)
    assert result["p_value"] == pytest.approx(by_hand, rel=1e-12)

    true, pred_a, pred_b = _design(a_only=10, b_only=0)
    result = mcnemar_exact(pred_a == true, pred_b == true)
    assert result["statistic"] == 0.0
    assert result["p_value"] == pytest.approx(2 * 0.5**10, rel=1e-12)


def test_paired_bootstrap_equals_a_resampling_loop_written_out():
    true, pred_a, pred_b = _design(n=40, common=24, a_only=5, b_only=1)
    groups = [f"g{i:03d}" for i in range(40)]  # sorted order = index order
    n_boot, seed = 300, 11
    result = paired_bootstrap(true, pred_a, pred_b, CLASSES, groups=groups, n_boot=n_boot, seed=seed)

    # By hand: the same uniform picks of 40 groups per resample, both runs scored on them.
    picks = np.random.default_rng(seed).integers(0, 40, size=(n_boot, 40))
    acc, bal = [], []
    for idx in picks:
        t, a, b = true[idx], pred_a[idx], pred_b[idx]
        acc.append(np.mean(a == t) - np.mean(b == t))
        recall = lambda p: np.mean([np.mean(p[t == c] == c) for c in CLASSES if (t == c).any()])  # noqa: E731
        bal.append(recall(a) - recall(b))
    assert result["accuracy"]["diff"] == pytest.approx((5 - 1) / 40)
    assert result["accuracy"]["ci_lo"] == pytest.approx(np.quantile(acc, 0.025), abs=1e-12)
    assert result["accuracy"]["ci_hi"] == pytest.approx(np.quantile(acc, 0.975), abs=1e-12)
    assert result["balanced_accuracy"]["ci_lo"] == pytest.approx(np.quantile(bal, 0.025), abs=1e-12)
    assert result["balanced_accuracy"]["ci_hi"] == pytest.approx(np.quantile(bal, 0.975), abs=1e-12)


def test_paired_bootstrap_interval_is_the_binomial_of_the_extra_cells():
    # A is right on exactly 10 extra cells of 100: a resample's difference is (number of those
    # cells drawn) / 100, Binomial(100, 0.1) / 100, whose 2.5% and 97.5% points are 5 and 16.
    true, pred_a, pred_b = _design(n=100, common=60, a_only=10)
    result = paired_bootstrap(true, pred_a, pred_b, CLASSES, n_boot=20000, seed=3)
    assert stats.binom.ppf([0.025, 0.975], 100, 0.1).tolist() == [5.0, 16.0]
    assert result["accuracy"]["diff"] == pytest.approx(0.10)
    assert result["accuracy"]["ci_lo"] == pytest.approx(0.05, abs=0.0101)
    assert result["accuracy"]["ci_hi"] == pytest.approx(0.16, abs=0.0101)


def test_identical_runs_give_p_one_and_a_zero_interval():
    true, pred_a, _ = _design(n=50, common=30, a_only=10)
    assert mcnemar_exact(pred_a == true, pred_a == true)["p_value"] == 1.0
    result = paired_bootstrap(true, pred_a, pred_a.copy(), CLASSES, n_boot=500, seed=0)
    for name in ("accuracy", "balanced_accuracy"):
        assert result[name] == {"diff": 0.0, "ci_lo": 0.0, "ci_hi": 0.0}


def test_holm_matches_a_worked_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    adjusted, reject = holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert adjusted.tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert reject.tolist() == [True, False, False, True]
    adjusted, reject = holm([0.2, math.nan, 0.01])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.02)


def test_nadeau_bengio_matches_a_hand_computation():
    d = [0.02, 0.04, 0.00, 0.06, 0.03]
    # mean 0.03; s^2 = (1e-4 + 1e-4 + 9e-4 + 9e-4 + 0) / 4 = 5e-4;
    # corrected variance (1/5 + 20/80) * 5e-4 = 2.25e-4 -> se 0.015 -> t = 2.0 on 4 df.
    result = nadeau_bengio(d, n_train=80, n_test=20)
    assert result["mean"] == pytest.approx(0.03)
    assert result["se"] == pytest.approx(0.015)
    assert result["statistic"] == pytest.approx(2.0)
    assert result["df"] == 4
    assert result["p_value"] == pytest.approx(2 * stats.t.sf(2.0, 4))
    assert result["p_value"] == pytest.approx(0.11612, abs=1e-5)
    half = stats.t.ppf(0.975, 4) * 0.015
    assert (result["ci_lo"], result["ci_hi"]) == pytest.approx((0.03 - half, 0.03 + half))
    # The uncorrected paired t-test would call it significant (t = 3.0, p = 0.040).
    assert stats.ttest_1samp(d, 0.0).pvalue == pytest.approx(2 * stats.t.sf(3.0, 4))
    assert nadeau_bengio([0.0, 0.0, 0.0], 10, 5)["p_value"] == 1.0
    with pytest.raises(LeukotypeError, match="at least 2 folds"):
        nadeau_bengio([0.1], 10, 5)


def _holdout_runs():
    ids = [f"img{i:03d}" for i in range(100)]
    true, better, worse = _design(n=100, common=60, a_only=10)
    return ids, true, [
        run_predictions("features_svm:a", "holdout", _frame(ids, true, worse)),
        run_predictions("finetune:b", "holdout", _frame(ids, true, better)),
        run_predictions("finetune_svm:c", "holdout", _frame(ids, true, better.copy())),
    ]


def test_compare_runs_holdout_pairs_ranked_and_holm_corrected():
    ids, true, runs = _holdout_runs()
    table = compare_runs(runs, CLASSES, groups={i: i for i in ids}, n_boot=400, seed=0)
    assert len(table) == 3
    first = table.iloc[0]
    # b and c tie (identical predictions): ranked by id, b first; both beat a.
    assert (first["run_a"], first["run_b"]) == ("finetune:b", "finetune_svm:c")
    assert first["p_value"] == 1.0 and first["accuracy_diff"] == 0.0
    against_a = table[table["run_b"] == "features_svm:a"]
    assert set(against_a["run_a"]) == {"finetune:b", "finetune_svm:c"}
    assert (against_a["test"] == MCNEMAR).all()
    assert against_a["accuracy_diff"].tolist() == pytest.approx([0.10, 0.10])
    assert against_a["p_value"].tolist() == pytest.approx([2 * 0.5**10] * 2)
    # Holm over 3 p-values (0.00195, 0.00195, 1): smallest x3, next x2 -> running max 0.00586
    assert against_a["p_holm"].tolist() == pytest.approx([3 * 2 * 0.5**10] * 2)
    assert against_a["significant"].all() and not first["significant"]
    standing = standing_against_best(table, ["features_svm:a", "finetune:b", "finetune_svm:c"])
    assert standing == {
        "finetune:b": "best",
        "finetune_svm:c": "not significantly worse",
        "features_svm:a": "worse",
    }


def test_compare_runs_refuses_different_test_images():
    ids, true, runs = _holdout_runs()
    other = run_predictions("x:y", "holdout", _frame([f"other{i}" for i in range(100)], true, true))
    with pytest.raises(LeukotypeError, match="same images"):
        compare_runs([*runs, other], CLASSES)


def test_compare_runs_scores_identity_rows_only():
    ids, true, _ = _holdout_runs()
    frame = pd.concat([_frame(ids, true, true), _frame(ids, true, true, transform="rot90")])
    assert len(run_predictions("r", "holdout", frame).predictions) == 100


def test_compare_runs_kfold_uses_nadeau_bengio_per_fold():
    rng = np.random.default_rng(0)
    runs, sizes = [], {}
    for f in range(5):
        ids = [f"f{f}i{i:02d}" for i in range(20)]
        true = np.array(CLASSES * 10)
        right_a = rng.random(20) < 0.9
        right_b = rng.random(20) < 0.6
        flip = {"L1": "L2", "L2": "L1"}
        pred_a = np.where(right_a, true, [flip[t] for t in true])
        pred_b = np.where(right_b, true, [flip[t] for t in true])
        runs += [
            run_predictions("s:a", f"r0f{f}", _frame(ids, true, pred_a)),
            run_predictions("s:b", f"r0f{f}", _frame(ids, true, pred_b)),
        ]
        sizes[f"r0f{f}"] = (80, 20)
    table = compare_runs(runs, CLASSES, fold_sizes=sizes)
    row = table.iloc[0]
    assert row["test"] == NADEAU_BENGIO and row["n_folds"] == 5 and row["n_images"] == 100
    diffs = [
        np.mean(r1.predictions["pred"] == r1.predictions["true"])
        - np.mean(r2.predictions["pred"] == r2.predictions["true"])
        for r1, r2 in zip(runs[::2], runs[1::2])
    ]
    if row["run_a"] == "s:b":
        diffs = [-d for d in diffs]
    expected = nadeau_bengio(diffs, 80, 20)
    assert row["accuracy_diff"] == pytest.approx(expected["mean"])
    assert row["p_value"] == pytest.approx(expected["p_value"])
    assert row["p_holm"] == pytest.approx(expected["p_value"])  # one pair: nothing to correct
    with pytest.raises(LeukotypeError, match="sizes"):
        compare_runs(runs, CLASSES)


def test_fold_sizes_count_images_not_augmented_samples():
    samples = pd.DataFrame(
        {
            "image_id": ["a", "a", "b", "c", "a", "b", "c", "c"],
            "transform": ["identity", "rot90", "identity", "identity"] * 2,
            "fold": ["r0f0"] * 4 + ["r0f1"] * 4,
            "part": ["train", "train", "train", "test", "test", "train", "train", "train"],
        }
    )
    assert fold_sizes_from_samples(samples) == {"r0f0": (2, 1), "r0f1": (2, 1)}


def test_run_compare_stage_on_files_including_an_external_set(tmp_path):
    """The stage pairs metrics with predictions, names runs, and takes another test set (with
    its own groups and an adapted variant of a run) as the same call with other inputs."""
    import json

    from leukotype.stages import run_compare

    ids = [f"x{i:03d}" for i in range(40)]
    true, better, worse = _design(n=40, common=20, a_only=8)
    samples = pd.DataFrame({"image_id": ["t1", "t2", "t3"], "transform": "identity", "label": "L1",
                            "group": ["g1", "g2", "g3"], "fold": "holdout", "part": ["train", "train", "test"]})
    samples.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    metrics, predictions = [], []
    for name, pred, adapt in (("a", worse, "none"), ("b", better, "none"), ("c", better, "bn")):
        record = {"task": "subtype", "strategy": "features_svm", "backbone": "vgg16" if name != "b" else "alexnet",
                  "layer": "fc6", "fold": "holdout", "adapt": adapt, "classes": CLASSES, "n_test": 40,
                  "metrics": {"accuracy": float(np.mean(pred == true))}, "confusion": [[1, 0], [0, 1]]}
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
        _frame(ids, true, pred).to_csv(tmp_path / f"{name}.tsv", sep="\t", index=False)
        metrics.append(tmp_path / f"{name}.json")
        predictions.append(tmp_path / f"{name}.tsv")
    task = {"name": "subtype", "column": "subtype", "classes": CLASSES}
    table = run_compare(metrics, predictions, tmp_path / "samples.tsv", task,
                        {"n_bootstrap": 100, "seed": 0, "alpha": 0.05}, tmp_path / "cmp.csv",
                        tmp_path / "cmp.png", test_set="jtsc", test_groups={i: i for i in ids})
    assert set(table["test_set"]) == {"jtsc"} and len(table) == 3
    assert set(table["run_a"]) | set(table["run_b"]) == {
        "features_svm:vgg16-fc6", "features_svm:alexnet-fc6", "features_svm:vgg16-fc6#bn"}
    csv = pd.read_csv(tmp_path / "cmp.csv")
    labels = dict(zip(csv["run_a"], csv["label_a"])) | dict(zip(csv["run_b"], csv["label_b"]))
    assert labels["features_svm:vgg16-fc6#bn"] == "VGG16 (fc6) — Feature extraction [bn]"
    row = table[(table["run_b"] == "features_svm:vgg16-fc6")].iloc[0]
    assert row["accuracy_diff"] == pytest.approx(8 / 40) and row["p_value"] == pytest.approx(2 * 0.5**8)
    assert (tmp_path / "cmp.png").stat().st_size > 5_000

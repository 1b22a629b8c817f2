"""Paired comparisons between runs evaluated on the same test images.

Two runs scored on the same cells are compared cell by cell, not by their separate intervals
(which overlap far more often than the runs' difference is in doubt):

- **hold-out**: the difference in accuracy and balanced accuracy with a paired bootstrap
  interval (both runs' predictions of one resample come from the same drawn groups, with the
  cluster bootstrap of :mod:`leukotype.metrics`), and an exact McNemar test on the cells that
  exactly one of the two runs gets right (``statsmodels``);
- **k-fold**: the Nadeau-Bengio corrected resampled t-test over the per-fold differences
  (C. Nadeau and Y. Bengio, "Inference for the Generalization Error", *Machine Learning*
  52:239-281, 2003; for repeated k-fold as in R. R. Bouckaert and E. Frank, "Evaluating the
  Replicability of Significance Tests for Comparing Learning Algorithms", PAKDD 2004). Folds
  share most of their training data, so their differences are correlated; the plain paired
  t-test ignores that and rejects far too often. The correction inflates the variance of the
  mean difference from ``sigma^2 / J`` to ``(1/J + n_test/n_train) sigma^2``.

p-values are corrected for the number of pairs with Holm's step-down method (``statsmodels``).
Everything here takes runs' predictions on a common set of images, whatever that set is (the
internal test part, or an external test set), so each test set is one call with its own inputs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from leukotype.errors import LeukotypeError
from leukotype.metrics import (
    bootstrap_cell_counts,
    classification_metrics,
    encode_groups,
    encode_labels,
    groups_of,
    metrics_from_confusion,
    model_id,
    scored_rows,
)

#: Metrics compared between runs (differences in proportion, shown in percentage points).
COMPARED_METRICS = ("accuracy", "balanced_accuracy")

HOLDOUT = "holdout"
MCNEMAR = "exact McNemar"
NADEAU_BENGIO = "Nadeau-Bengio corrected t"


@dataclass(frozen=True)
class RunPredictions:
    """One run's (one fold's) predictions: ``predictions`` has ``image_id, true, pred``.

    ``run`` identifies the configuration across folds (e.g. ``features_svm:vgg16-fc6``);
    ``fold`` is ``holdout`` or a k-fold id. Build it with :func:`run_predictions` from a
    workflow prediction table so that the rows are the ones evaluation scores.
    """

    run: str
    fold: str
    predictions: pd.DataFrame


def run_key(strategy: str, model: str) -> str:
    """The id of a run configuration across folds: ``strategy:model``."""
    return f"{strategy}:{model}"


def record_run_key(record: Mapping[str, Any]) -> str:
    """The run id of a metrics record (internal or external): ``strategy:model``, and
    ``#<adapt>`` for a test-time adaptation other than ``none`` (an adapted run is a run of its
    own). The one reading of a record's identity: comparisons and the tables that mark the
    best run use it, so their keys agree."""
    model = record.get("model") or model_id(record["backbone"], record.get("layer"))
    key = run_key(str(record["strategy"]), str(model))
    adapt = str(record.get("adapt") or "none")
    return key if adapt == "none" else f"{key}#{adapt}"  # '+' and '@' occur in backbone names


def run_predictions(run: str, fold: str, pred_df: pd.DataFrame) -> RunPredictions:
    """A :class:`RunPredictions` of the rows evaluation scores (one per test image)."""
    rows = scored_rows(pred_df)
    frame = pd.DataFrame(
        {
            "image_id": rows["image_id"].astype(str).to_numpy(),
            "true": rows["true"].astype(str).to_numpy(),
            "pred": rows["pred"].astype(str).to_numpy(),
        }
    )
    return RunPredictions(str(run), str(fold), frame.sort_values("image_id", ignore_index=True))


# --------------------------------------------------------------------------------------------
# the tests themselves


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test of two runs' per-image correctness (boolean arrays, same images).

    Returns ``statistic`` (statsmodels' exact statistic: the smaller discordant count),
    ``p_value`` (two-sided binomial test on the discordant cells), ``a_only`` (A right, B
    wrong) and ``b_only``. With no discordant cells the runs cannot be told apart: p = 1.
    """
    from statsmodels.stats.contingency_tables import mcnemar

    correct_a = np.asarray(correct_a, dtype=bool)
    correct_b = np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise LeukotypeError(
            f"McNemar needs paired results; got {correct_a.shape} and {correct_b.shape}"
        )
    both = int(np.sum(correct_a & correct_b))
    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    neither = int(np.sum(~correct_a & ~correct_b))
    result = mcnemar([[both, a_only], [b_only, neither]], exact=True)
    return {
        "statistic": float(result.statistic),
        "p_value": float(min(1.0, result.pvalue)),
        "a_only": a_only,
        "b_only": b_only,
    }


def holm(p_values: Sequence[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm-adjusted p-values and rejections (statsmodels ``multipletests(method='holm')``).

    NaN p-values (a test that could not be computed) stay NaN and do not count as tests.
    """
    from statsmodels.stats.multitest import multipletests

    values = np.asarray(p_values, dtype=float)
    adjusted = np.full(values.shape, np.nan)
    reject = np.zeros(values.shape, dtype=bool)
    finite = np.isfinite(values)
    if finite.any():
        reject[finite], adjusted[finite], _, _ = multipletests(
            values[finite], alpha=alpha, method="holm"
        )
    return adjusted, reject


def nadeau_bengio(
    differences: Sequence[float], n_train: float, n_test: float, alpha: float = 0.05
) -> dict[str, float]:
    """Corrected resampled t-test of per-fold differences (Nadeau and Bengio 2003).

    With J folds (all repeats of a repeated k-fold together), mean difference ``d`` and sample
    variance ``s^2`` (ddof 1), the statistic is ``t = d / sqrt((1/J + n_test/n_train) s^2)``
    with J - 1 degrees of freedom, two-sided; the interval is ``d ± t_{1-alpha/2, J-1}`` times
    the same standard error. ``n_train`` and ``n_test`` are the (mean) training and test sizes
    of a fold. Identical differences in every fold (``s = 0``) give p = 1 when they are all 0
    and p = 0 otherwise.
    """
    from scipy import stats

    values = np.asarray(differences, dtype=float)
    values = values[np.isfinite(values)]
    n_folds = values.size
    if n_folds < 2:
        raise LeukotypeError(
            f"the corrected resampled t-test needs at least 2 folds, got {n_folds}"
        )
    if n_train <= 0 or n_test <= 0:
        raise LeukotypeError(f"fold sizes must be positive, got n_train={n_train}, n_test={n_test}")
    mean = float(values.mean())
    variance = float(values.var(ddof=1))
    se = math.sqrt((1.0 / n_folds + n_test / n_train) * variance)
    df = n_folds - 1
    t_crit = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    if se == 0.0:
        statistic = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p_value = 1.0 if mean == 0.0 else 0.0
    else:
        statistic = mean / se
        p_value = float(2.0 * stats.t.sf(abs(statistic), df))
    return {
        "mean": mean,
        "statistic": statistic,
        "df": float(df),
        "p_value": p_value,
        "se": se,
        "ci_lo": mean - t_crit * se,
        "ci_hi": mean + t_crit * se,
    }


def paired_bootstrap(
    y_true: Sequence[Any],
    pred_a: Sequence[Any],
    pred_b: Sequence[Any],
    classes: Sequence[str],
    groups: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    metrics: Sequence[str] = COMPARED_METRICS,
) -> dict[str, dict[str, float]]:
    """Difference A - B of each metric with a paired percentile bootstrap interval.

    Each resample draws images (or, with ``groups``, whole groups) once and scores both runs
    on that same resample, so the interval reflects the runs' disagreement, not each run's
    own sampling noise. The resamples come from :func:`leukotype.metrics.bootstrap_cell_counts`
    on the joint (true, pred A, pred B) cells, the machinery of every other interval here.
    Returns ``{metric: {diff, ci_lo, ci_hi}}``.
    """
    if n_boot < 1:
        raise LeukotypeError(f"n_boot must be at least 1, got {n_boot}")
    classes = [str(c) for c in classes]
    k = len(classes)
    true_idx = encode_labels(y_true, classes, "true labels")
    a_idx = encode_labels(pred_a, classes, "predicted labels of run A")
    b_idx = encode_labels(pred_b, classes, "predicted labels of run B")
    if not len(true_idx) == len(a_idx) == len(b_idx) or len(true_idx) == 0:
        raise LeukotypeError(
            f"paired bootstrap needs the same non-empty images for both runs; got "
            f"{len(true_idx)} labels, {len(a_idx)} and {len(b_idx)} predictions"
        )
    group_idx = None if groups is None else encode_groups(groups, len(true_idx))

    # Only the joint cells that occur can be drawn: resample those, then map each to its cell
    # in A's and in B's confusion matrix.
    joint = (true_idx * k + a_idx) * k + b_idx
    cells, cell_of_item = np.unique(joint, return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = bootstrap_cell_counts(cell_of_item, len(cells), n_boot, rng, group_idx)
    cell_true, rest = np.divmod(cells, k * k)
    cell_a, cell_b = np.divmod(rest, k)
    to_a = np.zeros((len(cells), k * k))
    to_a[np.arange(len(cells)), cell_true * k + cell_a] = 1.0
    to_b = np.zeros((len(cells), k * k))
    to_b[np.arange(len(cells)), cell_true * k + cell_b] = 1.0
    counts_f = counts.astype(np.float64)
    boot_a = metrics_from_confusion((counts_f @ to_a).reshape(n_boot, k, k))
    boot_b = metrics_from_confusion((counts_f @ to_b).reshape(n_boot, k, k))

    point_a = classification_metrics(list(np.asarray(classes)[true_idx]),
                                     list(np.asarray(classes)[a_idx]), classes)
    point_b = classification_metrics(list(np.asarray(classes)[true_idx]),
                                     list(np.asarray(classes)[b_idx]), classes)
    out: dict[str, dict[str, float]] = {}
    for name in metrics:
        diffs = boot_a[name] - boot_b[name]
        diffs = diffs[np.isfinite(diffs)]
        low, high = (
            np.quantile(diffs, [alpha / 2.0, 1.0 - alpha / 2.0]) if diffs.size else (math.nan,) * 2
        )
        out[name] = {
            "diff": float(point_a[name] - point_b[name]),
            "ci_lo": float(low),
            "ci_hi": float(high),
        }
    return out


# --------------------------------------------------------------------------------------------
# every pair of runs


def _by_run(runs: Sequence[RunPredictions]) -> dict[str, dict[str, pd.DataFrame]]:
    table: dict[str, dict[str, pd.DataFrame]] = {}
    for item in runs:
        folds = table.setdefault(item.run, {})
        if item.fold in folds:
            raise LeukotypeError(f"run {item.run!r} has fold {item.fold!r} twice")
        folds[item.fold] = item.predictions
    return table


def _check_common_images(by_run: Mapping[str, Mapping[str, pd.DataFrame]]) -> list[str]:
    """The common folds; every run must predict the same images with the same labels."""
    runs = list(by_run)
    folds = sorted(by_run[runs[0]])
    for run in runs[1:]:
        if sorted(by_run[run]) != folds:
            raise LeukotypeError(
                f"runs are not evaluated on the same folds: {runs[0]!r} has {folds}, "
                f"{run!r} has {sorted(by_run[run])}"
            )
    for fold in folds:
        reference = by_run[runs[0]][fold]
        for run in runs[1:]:
            other = by_run[run][fold]
            if list(other["image_id"]) != list(reference["image_id"]):
                only_ref = sorted(set(reference["image_id"]) - set(other["image_id"]))
                only_other = sorted(set(other["image_id"]) - set(reference["image_id"]))
                raise LeukotypeError(
                    f"fold {fold!r}: runs {runs[0]!r} and {run!r} were not tested on the same "
                    f"images (only in the first: {only_ref[:5]}, only in the second: "
                    f"{only_other[:5]}); paired comparisons need a common test set"
                )
            if list(other["true"]) != list(reference["true"]):
                raise LeukotypeError(
                    f"fold {fold!r}: runs {runs[0]!r} and {run!r} disagree on true labels"
                )
    return folds


def run_summary(
    runs: Sequence[RunPredictions], classes: Sequence[str]
) -> pd.DataFrame:
    """Per run: mean accuracy and balanced accuracy over its folds, ranked best first.

    The rank orders by accuracy, then balanced accuracy, then run id (deterministic ties).
    """
    rows = []
    for run, folds in _by_run(runs).items():
        values = {name: [] for name in COMPARED_METRICS}
        for frame in folds.values():
            point = classification_metrics(frame["true"], frame["pred"], classes)
            for name in COMPARED_METRICS:
                values[name].append(point[name])
        rows.append({"run": run, **{name: float(np.mean(v)) for name, v in values.items()}})
    table = pd.DataFrame(rows)
    table = table.sort_values(
        ["accuracy", "balanced_accuracy", "run"], ascending=[False, False, True]
    ).reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    return table


def compare_runs(
    runs: Sequence[RunPredictions],
    classes: Sequence[str],
    groups: Mapping[str, Any] | pd.Series | None = None,
    fold_sizes: Mapping[str, tuple[int, int]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    test_set: str = "internal",
) -> pd.DataFrame:
    """Every pair of runs on their common test images, one row per pair.

    Hold-out (every run has the single fold ``holdout``): paired bootstrap intervals (whole
    ``groups`` resampled when given, ``image_id -> group``) and an exact McNemar test. k-fold
    (several folds): the Nadeau-Bengio test per metric, with ``fold_sizes`` ``{fold: (n_train,
    n_test)}`` in images. In a pair, ``run_a`` is the higher-ranked run (see
    :func:`run_summary`), so differences are A - B >= 0 in accuracy. ``p_holm`` is Holm's
    correction over all pairs of this call (one family per task and test set); ``significant``
    is ``p_holm < alpha``. The accuracy test decides ``significant``; k-fold rows also carry a
    balanced-accuracy test (``balanced_accuracy_p_value``/``_p_holm``).
    """
    classes = [str(c) for c in classes]
    by_run = _by_run(runs)
    if len(by_run) < 2:
        return pd.DataFrame(columns=list(COMPARISON_COLUMNS))
    folds = _check_common_images(by_run)
    holdout = folds == [HOLDOUT]
    ranking = run_summary(runs, classes)
    order = list(ranking["run"])
    summary = ranking.set_index("run")
    if not holdout:
        if fold_sizes is None or any(fold not in fold_sizes for fold in folds):
            raise LeukotypeError(
                f"k-fold comparisons need the training and test sizes of every fold {folds}"
            )
        n_train = float(np.mean([fold_sizes[f][0] for f in folds]))
        n_test = float(np.mean([fold_sizes[f][1] for f in folds]))

    rows = []
    for run_a, run_b in itertools.combinations(order, 2):
        row: dict[str, Any] = {
            "test_set": test_set,
            "scheme": "holdout" if holdout else "kfold",
            "run_a": run_a,
            "run_b": run_b,
            "rank_a": int(summary.loc[run_a, "rank"]),
            "rank_b": int(summary.loc[run_b, "rank"]),
            "n_folds": len(folds),
            "n_images": int(sum(len(by_run[run_a][f]) for f in folds)),
        }
        for name in COMPARED_METRICS:
            row[f"{name}_a"] = float(summary.loc[run_a, name])
            row[f"{name}_b"] = float(summary.loc[run_b, name])
        if holdout:
            frame_a, frame_b = by_run[run_a][HOLDOUT], by_run[run_b][HOLDOUT]
            group_values = (
                None if groups is None else groups_of(frame_a["image_id"], groups)
            )
            diffs = paired_bootstrap(
                frame_a["true"], frame_a["pred"], frame_b["pred"], classes,
                groups=group_values, n_boot=n_boot, seed=seed, alpha=alpha,
            )
            test = mcnemar_exact(
                (frame_a["pred"] == frame_a["true"]).to_numpy(),
                (frame_b["pred"] == frame_b["true"]).to_numpy(),
            )
            row.update({"test": MCNEMAR, "statistic": test["statistic"], "df": math.nan,
                        "a_only": test["a_only"], "b_only": test["b_only"],
                        "p_value": test["p_value"], "balanced_accuracy_p_value": math.nan,
                        "ci_method": "paired percentile bootstrap, "
                        + ("groups" if groups is not None else "images")
                        + f", n_boot={n_boot}"})
            for name in COMPARED_METRICS:
                row[f"{name}_diff"] = diffs[name]["diff"]
                row[f"{name}_ci_lo"] = diffs[name]["ci_lo"]
                row[f"{name}_ci_hi"] = diffs[name]["ci_hi"]
        else:
            tests = {}
            for name in COMPARED_METRICS:
                per_fold = [
                    classification_metrics(by_run[run_a][f]["true"], by_run[run_a][f]["pred"], classes)[name]
                    - classification_metrics(by_run[run_b][f]["true"], by_run[run_b][f]["pred"], classes)[name]
                    for f in folds
                ]
                tests[name] = nadeau_bengio(per_fold, n_train, n_test, alpha=alpha)
                row[f"{name}_diff"] = tests[name]["mean"]
                row[f"{name}_ci_lo"] = tests[name]["ci_lo"]
                row[f"{name}_ci_hi"] = tests[name]["ci_hi"]
            row.update({"test": NADEAU_BENGIO, "statistic": tests["accuracy"]["statistic"],
                        "df": tests["accuracy"]["df"], "a_only": math.nan, "b_only": math.nan,
                        "p_value": tests["accuracy"]["p_value"],
                        "balanced_accuracy_p_value": tests["balanced_accuracy"]["p_value"],
                        "ci_method": f"corrected t (n_train={n_train:g}, n_test={n_test:g})"})
        rows.append(row)

    table = pd.DataFrame(rows)
    table["p_holm"], table["significant"] = holm(table["p_value"], alpha)
    table["balanced_accuracy_p_holm"], _ = holm(table["balanced_accuracy_p_value"], alpha)
    return table[list(COMPARISON_COLUMNS)]


#: Columns of :func:`compare_runs`, in order.
COMPARISON_COLUMNS = (
    "test_set",
    "scheme",
    "run_a",
    "run_b",
    "rank_a",
    "rank_b",
    "n_folds",
    "n_images",
    "accuracy_a",
    "accuracy_b",
    "accuracy_diff",
    "accuracy_ci_lo",
    "accuracy_ci_hi",
    "balanced_accuracy_a",
    "balanced_accuracy_b",
    "balanced_accuracy_diff",
    "balanced_accuracy_ci_lo",
    "balanced_accuracy_ci_hi",
    "test",
    "statistic",
    "df",
    "a_only",
    "b_only",
    "p_value",
    "p_holm",
    "significant",
    "balanced_accuracy_p_value",
    "balanced_accuracy_p_holm",
    "ci_method",
)


def standing_against_best(comparisons: pd.DataFrame, runs: Sequence[str]) -> dict[str, str]:
    """``best``, ``not significantly worse`` or ``worse`` for every run of one comparison.

    The best run is rank 1; a run is "not significantly worse" when its pair with the best run
    is not significant after Holm's correction. A single run is the best.
    """
    runs = list(runs)
    if comparisons.empty:
        return {run: "best" for run in runs[:1]} | {run: "" for run in runs[1:]}
    best = comparisons.loc[comparisons["rank_a"] == 1, "run_a"]
    best_run = str(best.iloc[0]) if len(best) else str(comparisons["run_a"].iloc[0])
    standing = {run: "" for run in runs}
    standing[best_run] = "best"
    against_best = comparisons[comparisons["run_a"] == best_run]
    for row in against_best.itertuples():
        standing[str(row.run_b)] = "worse" if bool(row.significant) else "not significantly worse"
    return standing


def fold_sizes_from_samples(samples: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """``{fold: (n_train, n_test)}`` in images (not augmented samples) from a samples table."""
    required = {"image_id", "fold", "part"}
    missing = sorted(required - set(samples.columns))
    if missing:
        raise LeukotypeError(f"samples table lacks columns {missing}")
    sizes = {}
    for fold, rows in samples.groupby(samples["fold"].astype(str)):
        images = rows.drop_duplicates(["image_id"])
        parts = images["part"].astype(str)
        sizes[str(fold)] = (int((parts == "train").sum()), int((parts == "test").sum()))
    return sizes

"""Evaluation metrics, bootstrap confidence intervals and summaries over folds.

Every metric is computed from confusion matrices (rows = true class, columns = predicted
class, in the task's ``classes`` order). One implementation serves both the point estimate and
the bootstrap, where thousands of confusion matrices are evaluated as one array operation.
Undefined ratios follow scikit-learn's ``zero_division=0`` convention throughout: a class that is
never predicted has precision 0, a class that never occurs has recall 0 (and is still part of
the macro average, as with ``sklearn.metrics.*_score(labels=classes)``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from leukotype.errors import LeukotypeError
from leukotype.io import atomic_write, provenance

#: Scalar metrics of one evaluation, in report order.
METRICS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "balanced_accuracy",
    "kappa",
)

#: Metrics that get a bootstrap confidence interval.
CI_METRICS = METRICS

#: Calibration of a run's probabilities (leukotype.calibration), where the run has them; they
#: are summarised over folds like METRICS (NaN for runs without probabilities).
CALIBRATION_METRICS = ("ece", "brier")

#: Metrics of test-time augmentation (leukotype.tta), where a run has them (NaN otherwise).
TTA_METRICS = ("accuracy_tta", "balanced_accuracy_tta")

#: Range of each metric; t-intervals are clipped to it (an accuracy above 100% means nothing).
METRIC_BOUNDS = {name: (0.0, 1.0) for name in METRICS} | {"kappa": (-1.0, 1.0), "ece": (0.0, 1.0), "brier": (0.0, 2.0)} | {name: (0.0, 1.0) for name in TTA_METRICS}

#: Columns identifying one evaluated configuration.
RECORD_KEYS = ("task", "strategy", "model")

#: Largest number of (resample x group) picks held in memory at once (8 bytes each).
_MAX_DRAW_CELLS = 4_000_000


# --------------------------------------------------------------------------------------------
# label encoding and confusion matrices


def encode_labels(
    labels: Sequence[Any], classes: Sequence[str], what: str = "labels"
) -> np.ndarray:
    """Map labels to their index in ``classes``; unknown labels are an error naming them."""
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise LeukotypeError(f"classes must be unique, got {classes}")
    lookup = {c: i for i, c in enumerate(classes)}
    values = np.asarray([str(v) for v in labels], dtype=object)
    unknown = sorted({v for v in values if v not in lookup})
    if unknown:
        raise LeukotypeError(f"{what} contain {unknown}, which are not among the classes {classes}")
    return np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values))


def confusion_counts(true_idx: np.ndarray, pred_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) confusion matrix of integer-encoded labels (rows true, columns predicted)."""
    cells = np.bincount(true_idx * n_classes + pred_idx, minlength=n_classes * n_classes)
    return cells.reshape(n_classes, n_classes)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (``zero_division=0``)."""
    numerator = np.asarray(numerator, dtype=float)
    denominator = np.asarray(denominator, dtype=float)
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Scalar and per-class metrics of a stack of confusion matrices.

    ``confusion`` has shape (..., K, K). Returns arrays with the leading shape for every name in
    :data:`METRICS` plus per-class ``precision``, ``recall``, ``f1`` and ``support`` (..., K).
    Kappa is NaN where it is undefined (chance agreement of 1, e.g. a single class everywhere).
    """
    cm = np.asarray(confusion, dtype=float)
    true_pos = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)  # row sums: how often each class occurs
    predicted = cm.sum(axis=-2)  # column sums: how often each class is predicted
    n = support.sum(axis=-1)

    precision = _safe_divide(true_pos, predicted)
    recall = _safe_divide(true_pos, support)
    # 2tp / (2tp + fp + fn) equals the harmonic mean of precision and recall where it is defined
    # and is 0 (not NaN) when the class is neither present nor predicted, as in scikit-learn.
    f1 = _safe_divide(2 * true_pos, support + predicted)

    observed = _safe_divide(true_pos.sum(axis=-1), n)
    expected = _safe_divide((support * predicted).sum(axis=-1), n * n)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(expected < 1.0, (observed - expected) / (1.0 - expected), np.nan)

    # Balanced accuracy averages recall over the classes that occur (scikit-learn drops the
    # others), so a class missing from a test set is not counted as a failure here.
    present = support > 0
    balanced = _safe_divide((recall * present).sum(axis=-1), present.sum(axis=-1))

    return {
        "accuracy": observed,
        "precision_macro": precision.mean(axis=-1),
        "recall_macro": recall.mean(axis=-1),
        "f1_macro": f1.mean(axis=-1),
        "balanced_accuracy": balanced,
        "kappa": kappa,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
    }


# --------------------------------------------------------------------------------------------
# point estimates


def encode_pairs(
    y_true: Sequence[Any], y_pred: Sequence[Any], classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Class indices of paired true and predicted labels (non-empty, same length)."""
    true_idx = encode_labels(y_true, classes, "true labels")
    pred_idx = encode_labels(y_pred, classes, "predicted labels")
    if len(true_idx) != len(pred_idx):
        raise LeukotypeError(
            f"y_true has {len(true_idx)} labels but y_pred has {len(pred_idx)}; they must pair up"
        )
    if len(true_idx) == 0:
        raise LeukotypeError("no predictions to evaluate (empty y_true / y_pred)")
    return true_idx, pred_idx


def classification_metrics(
    y_true: Sequence[Any], y_pred: Sequence[Any], classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, balanced accuracy, Cohen's kappa and a per-class report.

    Returns plain Python values (JSON-ready): the scalar metrics, ``per_class`` as
    ``{class: {precision, recall, f1, support}}``, ``confusion`` as a list of lists (rows = true,
    columns = predicted, in ``classes`` order) and ``n``.
    """
    classes = [str(c) for c in classes]
    true_idx, pred_idx = encode_pairs(y_true, y_pred, classes)
    confusion = confusion_counts(true_idx, pred_idx, len(classes))
    values = metrics_from_confusion(confusion)
    result: dict[str, Any] = {name: float(values[name]) for name in METRICS}
    result["per_class"] = {
        cls: {
            "precision": float(values["precision"][k]),
            "recall": float(values["recall"][k]),
            "f1": float(values["f1"][k]),
            "support": int(values["support"][k]),
        }
        for k, cls in enumerate(classes)
    }
    result["confusion"] = confusion.astype(int).tolist()
    result["n"] = int(len(true_idx))
    return result


# --------------------------------------------------------------------------------------------
# bootstrap


def bootstrap_cell_counts(
    cell_idx: np.ndarray,
    n_cells: int,
    n_boot: int,
    rng: np.random.Generator,
    group_idx: np.ndarray | None,
) -> np.ndarray:
    """(n_boot, n_cells) counts of integer-coded cells in bootstrap resamples.

    Only the cell counts of a resample matter (a confusion matrix is one such count table; a
    paired comparison of two runs uses the joint (true, pred A, pred B) cells), so resamples
    are drawn as counts:
    - images: n draws with replacement from n items put Multinomial(n, counts / n) counts into
      the cells; this is the ordinary bootstrap, exactly, at O(n_cells) cost per resample;
    - groups: G draws with replacement from G groups give each group a Multinomial(G, 1/G)
      multiplicity (drawn as G uniform picks); the resample's counts are
      multiplicities @ per-group counts.
    """
    if group_idx is None:
        observed = np.bincount(cell_idx, minlength=n_cells)
        n = int(observed.sum())
        return rng.multinomial(n, observed / n, size=n_boot)

    n_groups = int(group_idx.max()) + 1
    per_group = np.zeros((n_groups, n_cells), dtype=np.int64)
    np.add.at(per_group, (group_idx, cell_idx), 1)
    # Float matrices so the product runs in BLAS; counts stay exact far below 2**53.
    per_group_f = per_group.astype(np.float64)
    chunk = max(1, _MAX_DRAW_CELLS // n_groups)
    out = np.empty((n_boot, n_cells), dtype=np.float64)
    for start in range(0, n_boot, chunk):
        size = min(n_boot, start + chunk) - start
        picks = rng.integers(0, n_groups, size=(size, n_groups))
        offsets = (np.arange(size) * n_groups)[:, None]
        multiplicity = np.bincount((picks + offsets).ravel(), minlength=size * n_groups)
        out[start : start + size] = multiplicity.reshape(size, n_groups) @ per_group_f
    return np.rint(out).astype(np.int64)


def _bootstrap_confusions(
    true_idx: np.ndarray,
    pred_idx: np.ndarray,
    n_classes: int,
    n_boot: int,
    rng: np.random.Generator,
    group_idx: np.ndarray | None,
) -> np.ndarray:
    """(n_boot, K, K) confusion matrices of bootstrap resamples (see bootstrap_cell_counts)."""
    counts = bootstrap_cell_counts(
        true_idx * n_classes + pred_idx, n_classes * n_classes, n_boot, rng, group_idx
    )
    return counts.reshape(n_boot, n_classes, n_classes)


def encode_groups(groups: Sequence[Any], n_items: int) -> np.ndarray:
    """Dense integer codes of one group id per prediction (the cluster-bootstrap unit)."""
    group_values = np.asarray([str(g) for g in groups], dtype=object)
    if len(group_values) != n_items:
        raise LeukotypeError(
            f"groups has {len(group_values)} entries but there are {n_items} "
            "predictions; pass one group id per prediction"
        )
    return np.unique(group_values, return_inverse=True)[1]


def bootstrap_ci(
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    classes: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence[Any] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap ``(1 - alpha)`` intervals for every metric in :data:`CI_METRICS`.

    Without ``groups`` predictions are resampled independently. With ``groups`` (e.g. patient
    ids, one per prediction) whole groups are resampled (cluster bootstrap): cells of one patient
    are correlated, so treating them as independent would understate the uncertainty. Kappa
    resamples where it is undefined are ignored; an interval with no defined value is NaN.
    The result is deterministic for a given ``seed``.
    """
    if n_boot < 1:
        raise LeukotypeError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise LeukotypeError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    classes = [str(c) for c in classes]
    true_idx, pred_idx = encode_pairs(y_true, y_pred, classes)
    group_idx = None if groups is None else encode_groups(groups, len(true_idx))

    rng = np.random.default_rng(seed)
    confusions = _bootstrap_confusions(true_idx, pred_idx, len(classes), n_boot, rng, group_idx)
    values = metrics_from_confusion(confusions)
    quantiles = [alpha / 2.0, 1.0 - alpha / 2.0]
    intervals: dict[str, tuple[float, float]] = {}
    for name in CI_METRICS:
        finite = values[name][np.isfinite(values[name])]
        if finite.size == 0:
            intervals[name] = (math.nan, math.nan)
            continue
        low, high = np.quantile(finite, quantiles)
        intervals[name] = (float(low), float(high))
    return intervals


# --------------------------------------------------------------------------------------------
# one evaluation record


def _json_number(value: float) -> float | None:
    """NaN/inf become None so that records are strict JSON."""
    return None if value is None or not math.isfinite(value) else float(value)


def scored_rows(pred_df: pd.DataFrame) -> pd.DataFrame:
    """The rows of a prediction table that are scored: one per test image (``identity``).

    Every consumer that scores or compares runs per image (evaluation, paired comparisons)
    selects rows here, so they always agree on what "a run's prediction for an image" is.
    """
    required = {"image_id", "transform", "true", "pred"}
    missing = sorted(required - set(pred_df.columns))
    if missing:
        raise LeukotypeError(
            f"prediction table lacks columns {missing}; expected at least {sorted(required)}"
        )
    identity = pred_df[pred_df["transform"].astype(str) == "identity"]
    if identity.empty:
        raise LeukotypeError(
            "prediction table has no 'identity' rows to evaluate (test rows must be untransformed)"
        )
    duplicated = identity["image_id"][identity["image_id"].duplicated()].unique().tolist()
    if duplicated:
        raise LeukotypeError(
            f"prediction table repeats image ids {duplicated[:5]} with transform 'identity'; "
            "each test image must be predicted once"
        )
    return identity


def groups_of(image_ids: Sequence[Any], groups: Mapping[str, Any] | pd.Series) -> list[str]:
    """The group (patient) id of each image, from an ``image_id -> group`` mapping."""
    lookup = pd.Series(groups).copy()  # never relabel the caller's Series
    lookup.index = lookup.index.astype(str)
    ids = pd.Series(image_ids).astype(str)
    absent = sorted(set(ids) - set(lookup.index))
    if absent:
        raise LeukotypeError(
            f"no group given for test images {absent[:5]} (of {len(absent)}); "
            "the groups mapping must cover every evaluated image_id"
        )
    return lookup.loc[ids].astype(str).tolist()


def evaluate_predictions(
    pred_df: pd.DataFrame,
    classes: Sequence[str],
    meta: Mapping[str, Any],
    n_boot: int = 1000,
    seed: int = 0,
    groups: Mapping[str, Any] | pd.Series | None = None,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The metrics JSON record of one run (task x strategy x model x fold).

    ``pred_df`` has columns ``image_id, transform, true, pred`` (see
    ``leukotype.classify.predict_table``); only ``identity`` rows are evaluated, so each test
    image counts once. ``meta`` carries ``task, strategy, model, backbone, layer, fold`` (copied
    to the top level) and optionally ``config`` (stored in the provenance only). ``groups`` maps
    ``image_id`` to a group (patient) id and switches the bootstrap to resampling groups.
    """
    identity = scored_rows(pred_df)
    classes = [str(c) for c in classes]
    y_true = identity["true"].astype(str).tolist()
    y_pred = identity["pred"].astype(str).tolist()
    point = classification_metrics(y_true, y_pred, classes)

    group_values = None if groups is None else groups_of(identity["image_id"], groups)
    intervals = bootstrap_ci(
        y_true, y_pred, classes, n_boot=n_boot, seed=seed, alpha=alpha, groups=group_values
    )

    record: dict[str, Any] = {k: v for k, v in meta.items() if k != "config"}
    if not record.get("model") and record.get("backbone"):
        record["model"] = model_id(record["backbone"], record.get("layer"))
    record.update(
        {
            "classes": classes,
            "n_test": point["n"],
            "metrics": {name: _json_number(point[name]) for name in METRICS},
            "ci": {
                name: [_json_number(low), _json_number(high)]
                for name, (low, high) in intervals.items()
            },
            "ci_method": {
                "method": "percentile bootstrap",
                "resample": "groups" if group_values is not None else "images",
                "n_boot": int(n_boot),
                "confidence": 1.0 - alpha,
            },
            "per_class": point["per_class"],
            "confusion": point["confusion"],
            "provenance": provenance(config=meta.get("config"), seed=seed),
        }
    )
    return record


# --------------------------------------------------------------------------------------------
# summaries over folds


def model_id(backbone: str, layer: str | None = None) -> str:
    """The run's model id: ``backbone`` or ``backbone-layer``."""
    return f"{backbone}-{layer}" if layer else str(backbone)


def _scheme(fold: str) -> str:
    return "holdout" if str(fold) == "holdout" else "kfold"


def _metric_value(value: Any) -> float:
    return math.nan if value is None else float(value)


def summarise_group(group: pd.DataFrame, confidence: float = 0.95) -> dict[str, Any]:
    """mean, sd, n_folds and CI of each metric for the fold records of one configuration.

    More than one fold: mean ± t(1 - (1 - confidence)/2, n - 1) · sd / sqrt(n), clipped to the
    metric's range (:data:`METRIC_BOUNDS`); n counts the folds where the metric is defined.
    Folds of a repeated k-fold share training data, so this interval is optimistic (it ignores
    the correlation between folds); it is the conventional summary, not an exact interval.
    One fold (hold-out): the bootstrap interval stored in the record.
    """
    n_folds = len(group)
    row: dict[str, Any] = {"n_folds": n_folds}
    for name in (*METRICS, *CALIBRATION_METRICS, *TTA_METRICS):
        values = group[name].to_numpy(dtype=float)
        values = values[np.isfinite(values)]  # e.g. kappa undefined in a fold
        mean = float(values.mean()) if values.size else math.nan
        if n_folds > 1:
            sd = float(values.std(ddof=1)) if values.size > 1 else math.nan
            low = high = math.nan
            if values.size > 1:
                # Imported here: scipy.stats costs a second at import, and every evaluate job
                # imports this module without needing it.
                from scipy import stats

                t_crit = float(stats.t.ppf(1.0 - (1.0 - confidence) / 2.0, values.size - 1))
                half = t_crit * sd / math.sqrt(values.size)
                floor, ceiling = METRIC_BOUNDS[name]
                low, high = max(floor, mean - half), min(ceiling, mean + half)
        else:
            sd = math.nan
            low, high = group[f"{name}__ci"].iloc[0]
        row[f"{name}_mean"] = mean
        row[f"{name}_sd"] = sd
        row[f"{name}_ci_lo"] = _metric_value(low)
        row[f"{name}_ci_hi"] = _metric_value(high)
    row["ci_method"] = "t" if n_folds > 1 else "bootstrap"
    return row


def fold_summary(records: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> pd.DataFrame:
    """One row per (task, strategy, model, scheme): per-metric mean, sd, n_folds and CI.

    ``scheme`` is ``holdout`` or ``kfold`` (from the fold ids) so that a hold-out result is never
    averaged with k-fold results. Columns: ``task, strategy, model, backbone, layer, scheme,
    n_classes, n_test, folds, n_folds, ci_method`` and ``{metric}_{mean,sd,ci_lo,ci_hi}`` for
    every metric in :data:`METRICS` (sd has ddof=1 and is NaN for a single fold).
    """
    if not records:
        raise LeukotypeError("fold_summary needs at least one metrics record")
    rows = []
    for record in records:
        missing = [key for key in ("task", "strategy", "fold", "metrics") if key not in record]
        if not record.get("model") and not record.get("backbone"):
            missing.append("model (or backbone)")
        if missing:
            raise LeukotypeError(f"metrics record lacks {missing}; got keys {sorted(record)}")
        row = {key: str(record[key]) for key in ("task", "strategy")}
        row["model"] = str(record.get("model") or model_id(record["backbone"], record.get("layer")))
        row["fold"] = str(record["fold"])
        row["scheme"] = _scheme(record["fold"])
        row["backbone"] = str(record.get("backbone") or "")
        row["layer"] = str(record.get("layer") or "")
        row["prep"] = str(record.get("prep") or "none")  # preprocessing variant
        row["n_classes"] = len(record.get("classes", []))
        row["n_test"] = int(record.get("n_test", 0))
        row["precision"] = str(record.get("precision") or "")
        ci = record.get("ci", {})
        for name in (*METRICS, *CALIBRATION_METRICS, *TTA_METRICS):
            row[name] = _metric_value(record["metrics"].get(name))
            low, high = ci.get(name, [None, None])
            row[f"{name}__ci"] = (_metric_value(low), _metric_value(high))
        rows.append(row)
    table = pd.DataFrame(rows)

    keys = [*RECORD_KEYS, "scheme"]
    summaries = []
    for key_values, group in table.groupby(keys, sort=True):
        repeated = group["fold"][group["fold"].duplicated()].unique().tolist()
        if repeated:
            raise LeukotypeError(
                f"folds {repeated} appear more than once for {dict(zip(keys, key_values))}; "
                "each fold must be summarised once"
            )
        row = dict(zip(keys, key_values))
        row["backbone"] = group["backbone"].iloc[0]
        row["layer"] = group["layer"].iloc[0]
        row["prep"] = group["prep"].iloc[0]
        row["n_classes"] = int(group["n_classes"].max())
        row["n_test"] = int(group["n_test"].sum())
        row["folds"] = ",".join(sorted(group["fold"]))
        row["precision"] = ", ".join(sorted({p for p in group["precision"] if p}))
        row.update(summarise_group(group, confidence))
        summaries.append(row)
    return pd.DataFrame(summaries).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# files


def confusion_frame(record: Mapping[str, Any]) -> pd.DataFrame:
    """The record's confusion matrix with class labels (index = true, columns = predicted)."""
    classes = [str(c) for c in record["classes"]]
    matrix = np.asarray(record["confusion"], dtype=int)
    if matrix.shape != (len(classes), len(classes)):
        raise LeukotypeError(
            f"confusion matrix has shape {matrix.shape} but there are {len(classes)} classes"
        )
    frame = pd.DataFrame(matrix, index=classes, columns=classes)
    frame.index.name = "true\\pred"
    return frame


def confusion_csv(record: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write the confusion matrix as CSV: first column the true class, then one per prediction."""
    frame = confusion_frame(record)
    with atomic_write(path, newline="") as handle:
        frame.to_csv(handle)

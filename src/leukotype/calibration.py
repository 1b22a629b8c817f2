"""Calibrated probabilities: temperature scaling fitted on held-out scores, ECE and Brier score.

Temperature scaling (Guo et al. 2017) divides a classifier's scores by one positive number ``T``
before the softmax. It never changes which class scores highest, so the predicted labels stay
those of the classifier; it only makes the stated probabilities match how often the
predictions are right. ``T`` is fitted by minimising the negative log-likelihood of scores the
classifier gave to samples it was NOT trained on: out-of-fold decision scores of the SVM's
grouped inner folds (:func:`out_of_fold_svm_scores`), or a validation part for softmax heads.
The test part is never used to fit anything.

numpy/scipy/scikit-learn only (SVM jobs never import torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from leukotype.errors import LeukotypeError

#: Bins of the expected calibration error and the reliability diagram (equal width in [0, 1]).
ECE_BINS = 15
#: Search interval of the temperature (log scale): far beyond any sensible value on both sides.
_LOG_T_BOUNDS = (np.log(1e-3), np.log(1e3))


def softmax(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``scores / temperature`` (float64, numerically stable)."""
    z = np.asarray(scores, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def negative_log_likelihood(scores: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of integer ``labels`` under ``softmax(scores / temperature)``."""
    z = np.asarray(scores, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), labels]))


def fit_temperature(scores: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """The temperature minimising the NLL of held-out ``scores`` (N, K) with integer ``labels``.

    One-dimensional and convex in ``1/T`` for fixed scores; solved on ``log T`` by bounded
    scalar minimisation.
    """
    from scipy.optimize import minimize_scalar

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or len(scores) != len(labels) or len(scores) == 0:
        raise LeukotypeError(
            f"temperature scaling needs (N, K) scores and N labels; got {scores.shape} and "
            f"{labels.shape}"
        )
    if not np.isfinite(scores).all():
        raise LeukotypeError("temperature scaling: scores contain NaN or infinite values")
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(scores, labels, float(np.exp(log_t))),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(result.x))


def out_of_fold_svm_scores(
    pipeline: Any,
    X: np.ndarray,
    y: Sequence[str],
    groups: Sequence[str],
    classes: Sequence[str],
    cv_folds: int = 3,
    seed: int = 0,
    sample_weight: np.ndarray | None = None,
    lab: np.ndarray | None = None,
) -> np.ndarray:
    """(N, K) decision scores of the training rows, each from a refit that did not see its group.

    The refits clone ``pipeline`` (same kernel, C, gamma) on the grouped, stratified inner folds
    that the grid search uses (``classify.make_inner_cv``), so rotated copies of an image or a
    patient's other cells never score their own group. ``sample_weight``: the rows' SVM weights
    when ``pipeline`` was fitted with them (a few-shot refit's), used by every refit. ``lab``
    (0 the training lab, 1 a new one): ``pipeline`` is a feature-augmented few-shot view, so
    every refit is feature-augmented too (:func:`leukotype.few_shot.fit_lab_views`) and each
    row is scored by its own lab's view.
    """
    from sklearn.base import clone

    from leukotype.classify import decision_scores, make_inner_cv
    from leukotype.few_shot import fit_lab_views

    X = np.asarray(X)
    y = np.asarray(y).astype(str)
    groups = np.asarray(groups).astype(str)
    splitter = make_inner_cv(y, groups, cv_folds=cv_folds, seed=seed)
    scores = np.full((len(X), len(classes)), np.nan)
    for fit_rows, val_rows in splitter.split(X, y, groups):
        if len(np.unique(y[fit_rows])) != len(classes):
            raise LeukotypeError(
                "an inner calibration fold lacks a class; add images from more groups or lower "
                "svm.cv_folds"
            )
        weights = None if sample_weight is None else np.asarray(sample_weight)[fit_rows]
        if lab is None:
            fit_params = {} if weights is None else {"svm__sample_weight": weights}
            model = clone(pipeline).fit(X[fit_rows], y[fit_rows], **fit_params)
            scores[val_rows] = decision_scores(model, X[val_rows], classes)
            continue
        lab = np.asarray(lab).astype(int)
        for code, view in fit_lab_views(pipeline, X[fit_rows], y[fit_rows], lab[fit_rows], weights).items():
            rows = val_rows[lab[val_rows] == code]
            if len(rows):
                scores[rows] = decision_scores(view, X[rows], classes)
    return scores


def fit_svm_calibration(
    pipeline: Any,
    X: np.ndarray,
    y: Sequence[str],
    groups: Sequence[str],
    classes: Sequence[str],
    cv_folds: int = 3,
    seed: int = 0,
    scores: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    lab: np.ndarray | None = None,
) -> dict[str, Any]:
    """Temperature for the SVM's decision scores, fitted on out-of-fold training scores.

    ``scores``: those out-of-fold scores (N, K, columns in ``classes`` order) when the grid
    search already computed them on the same inner folds (``classify.fit_svm(out_of_fold=)``);
    otherwise the selected setting is refitted on the inner folds here.
    Returns the calibration record stored with the run and in model bundles.
    """
    classes = [str(c) for c in classes]
    if scores is None:
        scores = out_of_fold_svm_scores(
            pipeline, X, y, groups, classes, cv_folds=cv_folds, seed=seed,
            sample_weight=sample_weight, lab=lab,
        )
    elif np.shape(scores) != (len(y), len(classes)) or not np.isfinite(scores).all():
        raise LeukotypeError(
            f"out-of-fold scores of shape {np.shape(scores)} (finite: "
            f"{bool(np.isfinite(scores).all())}) do not cover {len(y)} rows x {len(classes)} classes"
        )
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.array([lookup[str(v)] for v in y])
    temperature = fit_temperature(scores, labels)
    probabilities = softmax(scores, temperature)
    return {
        "method": "temperature",
        "temperature": temperature,
        "scores": "svm decision_function (one-vs-rest)",
        "fitted_on": (
            f"out-of-fold decision scores of {len(scores)} training rows "
            "(grouped, stratified inner folds of the training part; test part never used"
            + ("; feature-augmented refits, each row scored by its own lab's view)" if lab is not None else ")")
        ),
        "n": int(len(scores)),
        "nll_before": negative_log_likelihood(scores, labels, 1.0),
        "nll_after": negative_log_likelihood(scores, labels, temperature),
        "ece_out_of_fold": expected_calibration_error(probabilities, labels),
    }


def identity_calibration(reason: str) -> dict[str, Any]:
    """The record of a run whose probabilities are not recalibrated (``T = 1``), with why."""
    return {"method": "none", "temperature": 1.0, "fitted_on": reason, "n": 0}


# --------------------------------------------------------------------------------------------
# calibration metrics


def _check_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or len(p) != len(y):
        raise LeukotypeError(f"probabilities {p.shape} and labels {y.shape} do not align")
    return p, y


def reliability_bins(
    probabilities: np.ndarray, labels: Sequence[int] | np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Per confidence bin (equal width): count, mean confidence and accuracy of the top class."""
    p, y = _check_probabilities(probabilities, np.asarray(labels))
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # bin k holds (k/n, (k+1)/n]; confidence 0 would be bin -1, but a top probability is >= 1/K
    which = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=n_bins) / count
    return {
        "lower": np.arange(n_bins) / n_bins,
        "upper": np.arange(1, n_bins + 1) / n_bins,
        "count": count,
        "confidence": mean_conf,
        "accuracy": accuracy,
    }


def expected_calibration_error(
    probabilities: np.ndarray, labels: Sequence[int] | np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE: count-weighted mean |accuracy - confidence| of the top class over equal-width bins."""
    bins = reliability_bins(probabilities, labels, n_bins)
    used = bins["count"] > 0
    weights = bins["count"][used] / bins["count"].sum()
    return float(np.sum(weights * np.abs(bins["accuracy"][used] - bins["confidence"][used])))


def brier_score(probabilities: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of sum_k (p_k - [y = k])^2 (0 best, 2 worst)."""
    p, y = _check_probabilities(probabilities, np.asarray(labels))
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration_metrics(
    probabilities: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """ECE and Brier score with percentile-bootstrap CIs (resampling ``groups`` when given)."""
    p, y = _check_probabilities(probabilities, np.asarray(labels))
    point = {"ece": expected_calibration_error(p, y), "brier": brier_score(p, y)}
    intervals: dict[str, list[float | None]] = {name: [None, None] for name in point}
    if n_boot > 0 and len(y) > 1:
        rng = np.random.default_rng(seed)
        units = np.arange(len(y)) if groups is None else np.asarray(groups).astype(str)
        names, inverse = np.unique(units, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(len(names))]
        draws = {name: np.empty(n_boot) for name in point}
        for b in range(n_boot):
            rows = np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))])
            draws["ece"][b] = expected_calibration_error(p[rows], y[rows])
            draws["brier"][b] = brier_score(p[rows], y[rows])
        for name, values in draws.items():
            low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
            intervals[name] = [float(low), float(high)]
    return {"metrics": point, "ci": intervals}


def add_probabilities(table: Any, classes: Sequence[str], temperature: float) -> Any:
    """``table`` with ``prob_<class>`` = softmax(``score_<class>`` / temperature) appended."""
    scores = table[[f"score_{c}" for c in classes]].to_numpy(dtype=np.float64)
    probabilities = softmax(scores, temperature)
    table = table.copy()
    for k, name in enumerate(probability_columns(classes)):
        table[name] = probabilities[:, k]
    return table


def probability_columns(classes: Sequence[str]) -> list[str]:
    return [f"prob_{c}" for c in classes]


def probabilities_from_table(
    table: Any, classes: Sequence[str], calibration: Mapping[str, Any] | None = None
) -> np.ndarray | None:
    """(N, K) probabilities of a predictions table: its ``prob_`` columns, else the calibrated
    softmax of its ``score_`` columns; None when it has neither."""
    prob_cols = probability_columns(classes)
    if all(c in table.columns for c in prob_cols):
        return table[prob_cols].to_numpy(dtype=np.float64)
    score_cols = [f"score_{c}" for c in classes]
    if calibration is not None and all(c in table.columns for c in score_cols):
        return softmax(table[score_cols].to_numpy(dtype=np.float64), calibration["temperature"])
    return None

"""Few-shot adaptation of an SVM run to another lab: how its labelled cells join the refit.

``pooled``: the lab's cells are added to the run's training rows and the run's pipeline (its
chosen kernel, C, gamma) is refitted on all of them, as one population.

``augment``: feature augmentation (Daumé III 2007, "Frustratingly easy domain adaptation").
Every row is mapped to ``[x, x, 0]`` (the training lab) or ``[x, 0, x]`` (the new lab), so the
SVM learns a part shared by both labs and a part of each lab's own; a lab's cells are then
scored with their own view. For a kernel ``k`` this is the kernel ``k(x, x') * (1 + [same
lab])``, which is what is fitted here (every kernel, one libsvm fit). A view is the fitted SVM
with each support vector's kernel column scaled by ``1 + [its lab is the view's lab]``: a
plain model file that scores new cells of that lab with no lab column. Nothing is chosen on
the lab's scored cells: the run's own setting is used, as for ``pooled``. An exported view is
calibrated on out-of-fold scores of augmented refits
(:func:`leukotype.calibration.out_of_fold_svm_scores` with ``lab``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.multiclass import OneVsOneClassifier
from sklearn.pipeline import Pipeline

from leukotype.classify import (
    GramSVC,
    ScalableSVC,
    fit_weighted,
    gram_matrix,
    linear_svm,
    decision_scores,
    gram_fits,
    make_inner_cv,
    resolve_gamma,
)
from leukotype.errors import LeukotypeError
from leukotype.external import SHOT_METHODS

__all__ = ["NEW_LAB", "SHOT_METHODS", "TRAINING_LAB", "fit_lab_views"]

#: Domain codes of :func:`fit_lab_views`: the run's own training rows, the new lab's cells.
TRAINING_LAB, NEW_LAB = 0, 1


def fit_lab_views(
    pipeline: Pipeline,
    X: np.ndarray,
    y: Sequence[Any],
    lab: np.ndarray,
    sample_weight: np.ndarray | None = None,
) -> dict[int, Pipeline]:
    """Feature-augmented refit of ``pipeline`` (scaler + :class:`GramSVC` or
    :class:`ScalableSVC`, its setting as chosen) on rows of two labs (``lab``: 0 the training
    lab, 1 the new one). Returns one fitted pipeline per lab, each scoring that lab's cells."""
    lab = np.asarray(lab).astype(int)
    if set(np.unique(lab)) - {TRAINING_LAB, NEW_LAB}:
        raise LeukotypeError(f"fit_lab_views: lab codes must be {TRAINING_LAB} or {NEW_LAB}")
    scaler = clone(pipeline.named_steps["scale"]).fit(X)
    Z = scaler.transform(X)
    y = np.asarray(y)
    svm = clone(pipeline.named_steps["svm"])
    if isinstance(svm, GramSVC):
        views = _gram_views(svm, np.asarray(Z, dtype=np.float64), y, lab, sample_weight)
    elif isinstance(svm, ScalableSVC):
        views = _scalable_views(svm, Z, y, lab, sample_weight)
    else:
        raise LeukotypeError(f"fit_lab_views: no feature augmentation for {type(svm).__name__}")
    return {code: Pipeline([("scale", scaler), ("svm", view)]) for code, view in views.items()}


def _gram_views(
    svm: GramSVC, Z: np.ndarray, y: np.ndarray, lab: np.ndarray, sample_weight: np.ndarray | None
) -> dict[int, GramSVC]:
    if not gram_fits(len(Z), svm.gram_mb):
        raise LeukotypeError(
            f"shot_method augment: {len(Z)} rows need a kernel matrix above the SVM's budget "
            f"({svm.gram_mb} MiB); raise compute.mem_mb_svm or use svm.solver scalable"
        )
    gram, sq, _ = gram_matrix(Z, Z)
    svm.gamma_ = resolve_gamma(svm.gamma, Z)
    same = lab[:, None] == lab[None, :]
    svm._fit_kernel(svm._kernel(gram, sq, sq) * (1.0 + same), Z, y, sample_weight)
    views = {}
    for code in (TRAINING_LAB, NEW_LAB):
        view = copy.deepcopy(svm)
        view.support_scale_ = 1.0 + (lab[svm.support_] == code)
        views[code] = view
    return views


def _scalable_views(
    svm: ScalableSVC, Z: np.ndarray, y: np.ndarray, lab: np.ndarray, sample_weight: np.ndarray | None
) -> dict[int, ScalableSVC]:
    """The linear solver on ``[m, m, 0]`` / ``[m, 0, m]`` of the mapped rows ``m``; a view
    folds the shared and its lab's weights back into one linear model on ``m``."""
    Z = np.asarray(Z, dtype=np.float32)
    feature_map = svm._make_map(Z)
    mapped = svm._apply(feature_map, Z)
    augmented = np.hstack([mapped, mapped * (lab == TRAINING_LAB)[:, None], mapped * (lab == NEW_LAB)[:, None]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        linear = fit_weighted(linear_svm(svm.C, svm.kernel, svm.class_weight, svm.random_state),
                               augmented, y, sample_weight)
    width = mapped.shape[1]
    views = {}
    for code in (TRAINING_LAB, NEW_LAB):
        folded = copy.deepcopy(linear)
        parts = folded.estimators_ if isinstance(folded, OneVsOneClassifier) else [folded]
        for part in parts:
            own = part.coef_[:, width * (1 + code) : width * (2 + code)]
            part.coef_ = np.ascontiguousarray(part.coef_[:, :width] + own)
            part.n_features_in_ = width
        if isinstance(folded, OneVsOneClassifier):
            folded.n_features_in_ = width
        view = copy.deepcopy(svm)
        view.map_, view.linear_, view.classes_ = feature_map, folded, linear.classes_
        view.gamma_ = None if feature_map is None else float(feature_map.gamma)
        view.n_features_in_ = Z.shape[1]
        views[code] = view
    return views

"""Few-shot feature augmentation (leukotype.few_shot): the fitted views are the augmented SVM."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.multiclass import OneVsOneClassifier
from sklearn.svm import SVC, LinearSVC

from leukotype.classify import load_model, make_svm_pipeline, save_model
from leukotype.calibration import out_of_fold_svm_scores
from leukotype.few_shot import NEW_LAB, TRAINING_LAB, fit_lab_views


def _two_labs():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 5))
    y = np.repeat(["a", "b", "c"], [30, 30, 20])
    lab = (np.arange(80) % 4 == 0).astype(int)
    X[lab == NEW_LAB, 0] += 1.5
    return X, y, lab


def _augmented(Z, code):
    zero = np.zeros_like(Z)
    return np.hstack([Z, Z, zero]) if code == TRAINING_LAB else np.hstack([Z, zero, Z])


@pytest.mark.parametrize("kernel,solver", [("linear", "exact"), ("rbf", "exact"), ("linear", "scalable")])
def test_each_labs_view_scores_as_the_svm_fitted_on_augmented_rows(kernel, solver, tmp_path):
    """Daume's map [x, x, 0] / [x, 0, x] fitted explicitly (libsvm on the augmented features or
    kernel; liblinear one-vs-one on the augmented features) gives each view's decision values;
    a view saved and loaded scores the same."""
    X, y, lab = _two_labs()
    views = fit_lab_views(make_svm_pipeline(kernel=kernel, C=0.5, solver=solver), X, y, lab)
    Z = views[TRAINING_LAB].named_steps["scale"].transform(X)
    rows = np.where(lab[:, None] == TRAINING_LAB, _augmented(Z, TRAINING_LAB), _augmented(Z, NEW_LAB))
    for code in (TRAINING_LAB, NEW_LAB):
        if kernel == "rbf":
            gamma = views[code].named_steps["svm"].gamma_
            reference = SVC(kernel="precomputed", C=0.5).fit(rbf_kernel(Z, Z, gamma=gamma) * (1 + (lab[:, None] == lab)), y)
            expected = reference.decision_function(rbf_kernel(Z, Z, gamma=gamma) * (1 + (lab[None, :] == code)))
        elif solver == "exact":
            expected = SVC(kernel="linear", C=0.5).fit(rows, y).decision_function(_augmented(Z, code))
        else:
            reference = OneVsOneClassifier(LinearSVC(C=0.5, loss="hinge", dual=True, random_state=0, max_iter=1000))
            expected = reference.fit(rows.astype(np.float32), y).decision_function(_augmented(Z, code).astype(np.float32))
        np.testing.assert_allclose(views[code].decision_function(X), expected, atol=1e-6)
        save_model(views[code], tmp_path / f"{code}.skops")
        np.testing.assert_array_equal(load_model(tmp_path / f"{code}.skops").decision_function(X),
                                      views[code].decision_function(X))
    assert np.abs(views[NEW_LAB].decision_function(X) - views[TRAINING_LAB].decision_function(X)).max() > 0.1


def test_out_of_fold_scores_of_an_augmented_model_come_from_augmented_refits_without_the_rows_group():
    """Every row gets scores from a refit on the other inner folds, with its own lab's view:
    a row's score changes when its copy joins the fit (so it was held out), and the training
    lab's rows are scored by their view, the new lab's by theirs."""
    X, y, lab = _two_labs()
    groups = np.array([f"g{i}" for i in range(len(X))])
    pipeline = make_svm_pipeline(kernel="linear", C=0.5)
    scores = out_of_fold_svm_scores(pipeline, X, y, groups, ["a", "b", "c"], cv_folds=3, seed=0, lab=lab)
    assert scores.shape == (80, 3) and np.isfinite(scores).all()
    views = fit_lab_views(pipeline, X, y, lab)  # fitted on every row: not out of fold
    in_fold = np.vstack([views[code].decision_function(X[i : i + 1]) for i, code in enumerate(lab)])
    assert np.abs(in_fold - scores).max() > 0.05
    # the first inner fold by hand: its held-out rows, each scored by its lab's view
    from leukotype.classify import make_inner_cv

    fit_rows, val_rows = next(make_inner_cv(y, groups, cv_folds=3, seed=0).split(X, y, groups))
    fold_views = fit_lab_views(pipeline, X[fit_rows], y[fit_rows], lab[fit_rows])
    for code in (TRAINING_LAB, NEW_LAB):
        rows = val_rows[lab[val_rows] == code]
        np.testing.assert_allclose(scores[rows], fold_views[code].decision_function(X[rows]), atol=1e-9)
        other = fold_views[NEW_LAB if code == TRAINING_LAB else TRAINING_LAB]
        assert np.abs(other.decision_function(X[rows]) - scores[rows]).max() > 1e-3

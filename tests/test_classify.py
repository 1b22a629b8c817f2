"""SVM grid search (grouped inner CV), safe model files, prediction tables."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import skops.io
from sklearn.datasets import make_classification
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import FunctionTransformer

import leukotype.classify as classify
from leukotype.classify import (
    build_param_grid,
    choose_cv_folds,
    fit_svm,
    load_model,
    make_svm_pipeline,
    predict_table,
    save_model,
)
from leukotype.errors import LeukotypeError


def _augmented_problem(n_images: int = 60, copies: int = 4, seed: int = 0):
    """Images with ``copies`` near-identical augmented rows each; one group per image."""
    X, y = make_classification(
        n_samples=n_images,
        n_features=20,
        n_informative=3,
        n_redundant=0,
        flip_y=0.0,
        class_sep=1.0,
        random_state=seed,
    )
    rng = np.random.default_rng(seed)
    X_aug = np.repeat(X, copies, axis=0) + 0.05 * rng.normal(size=(n_images * copies, X.shape[1]))
    labels = np.where(np.repeat(y, copies) == 1, "pos", "neg")
    groups = np.repeat([f"g{i:03d}" for i in range(n_images)], copies)
    return X_aug.astype(np.float32), labels, groups


def test_build_param_grid_searches_gamma_only_for_kernels_that_use_it():
    assert build_param_grid(None) == [
        {"svm__kernel": ["linear"], "svm__C": [0.1, 1.0, 10.0]},
        {"svm__kernel": ["rbf"], "svm__C": [0.1, 1.0, 10.0], "svm__gamma": ["scale"]},
    ]
    assert build_param_grid({"kernel": "rbf", "C": [2], "gamma": ["scale", 0.01]}) == [
        {"svm__kernel": ["rbf"], "svm__C": [2.0], "svm__gamma": ["scale", 0.01]}
    ]
    with pytest.raises(LeukotypeError, match="unknown kernels"):
        build_param_grid({"kernel": ["cubic"]})
    with pytest.raises(LeukotypeError, match="positive"):
        build_param_grid({"C": [0]})
    with pytest.raises(LeukotypeError, match="unknown keys"):
        build_param_grid({"degree": [3]})


def test_grid_search_prefers_the_c_that_generalises():
    X, y, groups = _augmented_problem(n_images=200, seed=1)
    image = np.array([int(g[1:]) for g in groups])
    train = image < 120
    test = (image >= 120) & (np.arange(len(X)) % 4 == 0)  # one copy of each held-out image

    pipeline, cv = fit_svm(
        X[train], y[train], groups[train], {"kernel": ["rbf"], "C": [0.001, 10]}, cv_folds=3, seed=0
    )
    # C = 0.001 under-fits (inner CV about 0.54), C = 10 does not (about 0.84)
    assert pipeline.named_steps["svm"].C == 10.0
    assert list(cv["C"]) == [0.001, 10.0]
    assert cv.loc[cv["selected"], "C"].item() == 10.0
    assert cv.loc[1, "mean_test_score"] > cv.loc[0, "mean_test_score"] + 0.2
    assert {"split0_test_score", "split2_test_score", "rank_test_score"} <= set(cv.columns)
    assert (cv["n_splits"] == 3).all()
    # the fitted model is the refit on all training rows
    assert pipeline.named_steps["scale"].n_samples_seen_ == train.sum()
    weak = make_svm_pipeline(C=0.001).fit(X[train], y[train])
    assert pipeline.score(X[test], y[test]) > weak.score(X[test], y[test]) + 0.2


def test_inner_folds_never_split_a_group(monkeypatch):
    recorded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    class RecordingSplitter(StratifiedGroupKFold):
        def split(self, X, y=None, groups=None):
            assert groups is not None, "the grid search must pass groups to the splitter"
            for train, test in super().split(X, y, groups):
                recorded.append((train, test, np.asarray(groups)))
                yield train, test

    monkeypatch.setattr(classify, "StratifiedGroupKFold", RecordingSplitter)
    X, y, groups = _augmented_problem(n_images=30, seed=1)
    fit_svm(X, y, groups, {"kernel": ["linear"], "C": [1, 10]}, cv_folds=3, seed=0)
    assert len(recorded) == 3
    for train, test, seen_groups in recorded:
        assert set(seen_groups[train]).isdisjoint(seen_groups[test])
        assert set(y[test]) == {"neg", "pos"}  # stratified: both classes in every fold
    # every row is validated exactly once
    assert sorted(np.concatenate([test for _, test, _ in recorded])) == list(range(len(X)))


def test_inner_folds_shrink_with_few_groups_and_fail_below_two(caplog):
    y = np.array(["a"] * 8 + ["b"] * 4)
    groups = np.array([f"a{i}" for i in range(8)] + ["b0", "b0", "b1", "b1"])
    with caplog.at_level(logging.WARNING, logger="leukotype.classify"):
        assert choose_cv_folds(y, groups, 3) == 2
    assert "class 'b' has only 2 groups" in caplog.text
    assert choose_cv_folds(y, groups, 2) == 2
    with pytest.raises(LeukotypeError, match="class 'b' has 1 group"):
        choose_cv_folds(y, np.array([f"a{i}" for i in range(8)] + ["b0"] * 4), 3)


def test_fit_svm_rejects_misaligned_or_non_finite_input():
    X, y, groups = _augmented_problem(n_images=12)
    with pytest.raises(LeukotypeError, match="must align"):
        fit_svm(X, y[:-1], groups)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(LeukotypeError, match="NaN"):
        fit_svm(bad, y, groups)


def test_skops_round_trip_gives_identical_predictions(tmp_path):
    X, y, groups = _augmented_problem(n_images=30)
    pipeline = make_svm_pipeline(kernel="rbf", C=3.0, class_weight="balanced").fit(X, y)
    path = tmp_path / "models" / "svm.skops"
    save_model(pipeline, path)
    assert [p.name for p in path.parent.iterdir()] == ["svm.skops"]  # no temp files left
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.decision_function(X), pipeline.decision_function(X))
    np.testing.assert_array_equal(loaded.predict(X), pipeline.predict(X))


def test_an_svm_job_imports_skops_without_torch_and_round_trips_a_model(tmp_path):
    """A fresh interpreter (as a job is): saving and loading a model never imports torch, the
    stub of scikit-learn's torch adapter is gone afterwards, and the real adapter still imports."""
    import subprocess
    import sys

    code = f"""
import sys
import numpy as np
from leukotype.classify import _SKLEARN_TORCH_ADAPTER, load_model, make_svm_pipeline, save_model
X = np.random.default_rng(0).normal(size=(40, 5)); y = np.array(["a", "b"] * 20)
pipeline = make_svm_pipeline(kernel="linear").fit(X, y)
save_model(pipeline, {str(tmp_path / "svm.skops")!r})
loaded = load_model({str(tmp_path / "svm.skops")!r})
assert (loaded.decision_function(X) == pipeline.decision_function(X)).all()
print("torch" in sys.modules, _SKLEARN_TORCH_ADAPTER in sys.modules)
import importlib
print(hasattr(importlib.import_module(_SKLEARN_TORCH_ADAPTER), "asarray"))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "False", "True"]


def test_load_model_refuses_untrusted_types(tmp_path, monkeypatch):
    X, y, _ = _augmented_problem(n_images=12)
    pipeline = make_svm_pipeline(kernel="linear").fit(X, y)
    pipeline.steps.insert(0, ("evil", FunctionTransformer(func=eval)))
    path = tmp_path / "evil.skops"
    skops.io.dump(pipeline, path)

    def fail_if_called(*args, **kwargs):
        raise AssertionError("load must not be attempted for an untrusted file")

    monkeypatch.setattr(skops.io, "load", fail_if_called)
    with pytest.raises(LeukotypeError, match=r"builtins\.eval"):
        load_model(path)
    with pytest.raises(LeukotypeError, match="does not exist"):
        load_model(tmp_path / "missing.skops")
    (tmp_path / "junk.skops").write_bytes(b"not a zip file")
    with pytest.raises(LeukotypeError, match="not a readable skops file"):
        load_model(tmp_path / "junk.skops")


def _samples(labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": [f"img{i:06d}" for i in range(len(labels))],
            "transform": "identity",
            "label": labels,
        }
    )


def test_predict_table_binary_scores_are_signed_decision_values():
    X, y, _ = _augmented_problem(n_images=40, copies=1)
    pipeline = make_svm_pipeline(kernel="linear").fit(X, y)
    assert list(pipeline.classes_) == ["neg", "pos"]
    d = pipeline.decision_function(X)
    assert d.ndim == 1
    # task order deliberately differs from the model's sorted order
    table = predict_table(pipeline, X, _samples(y), ["pos", "neg"])
    assert list(table.columns) == [
        "image_id",
        "transform",
        "true",
        "pred",
        "score_pos",
        "score_neg",
    ]
    np.testing.assert_allclose(table["score_pos"], d)
    np.testing.assert_allclose(table["score_neg"], -d)
    assert (table["pred"] == np.where(d > 0, "pos", "neg")).all()
    assert (table["true"] == y).all()


def test_predict_table_multiclass_scores_follow_task_class_order():
    X, y_int = make_classification(
        n_samples=90,
        n_features=8,
        n_informative=4,
        n_classes=3,
        n_clusters_per_class=1,
        random_state=0,
    )
    y = np.array(["L1", "L2", "M3"])[y_int]
    pipeline = make_svm_pipeline(kernel="linear").fit(X, y)
    classes = ["M3", "L1", "L2"]
    table = predict_table(pipeline, X, _samples(y), classes)
    scores = table[[f"score_{c}" for c in classes]].to_numpy()
    raw = pipeline.decision_function(X)
    np.testing.assert_allclose(scores, raw[:, [2, 0, 1]])
    agree = (np.array(classes)[scores.argmax(axis=1)] == table["pred"]).mean()
    assert agree > 0.95  # ovr scores and ovo votes agree except on near-ties
    with pytest.raises(LeukotypeError, match="trained on classes"):
        predict_table(pipeline, X, _samples(y), ["L1", "L2"])
    with pytest.raises(LeukotypeError, match="feature rows"):
        predict_table(pipeline, X[:-1], _samples(y), classes)


def test_single_setting_is_fitted_without_search_even_with_one_group_per_class(monkeypatch):
    """Nothing to choose: no inner CV, so a class with a single patient does not stop the run."""

    def no_cv(*args, **kwargs):
        raise AssertionError("no cross-validation expected for a single setting")

    monkeypatch.setattr(classify, "make_inner_cv", no_cv)
    X, y, _ = _augmented_problem(n_images=30, seed=2)
    one_group_per_class = np.where(y == "pos", "patient-a", "patient-b")
    pipeline, cv_results = fit_svm(X, y, one_group_per_class, {"kernel": ["linear"], "C": [0.5]}, seed=0)
    assert pipeline.named_steps["svm"].C == 0.5 and pipeline.named_steps["svm"].kernel == "linear"
    assert cv_results[["kernel", "C", "n_splits", "selected"]].values.tolist() == [["linear", 0.5, 0, True]]
    assert pipeline.score(X, y) > 0.9


@pytest.mark.parametrize(
    "params",
    [
        {"kernel": "linear", "C": 0.5},
        {"kernel": "rbf", "C": 2.0, "gamma": "scale"},
        {"kernel": "rbf", "C": 1.0, "gamma": 0.03},
        {"kernel": "poly", "C": 1.0, "gamma": "auto"},
        {"kernel": "sigmoid", "C": 0.3, "gamma": 0.01},
    ],
)
def test_gram_svc_is_libsvm_svc_with_precomputed_kernels(params, monkeypatch):
    """Same support vectors, decision values and predictions as SVC computing its own kernel."""
    from sklearn.svm import SVC

    X, y_int = make_classification(
        n_samples=120, n_features=30, n_informative=6, n_classes=3, n_clusters_per_class=1,
        random_state=3,
    )
    y = np.array(["L1", "L2", "M3"])[y_int]
    X_new = X[:50] + 0.2
    reference = SVC(random_state=0, **params).fit(X, y)
    gram = classify.GramSVC(random_state=0, **params).fit(X, y)
    np.testing.assert_array_equal(gram.support_, reference.support_)
    np.testing.assert_allclose(
        gram.decision_function(X_new), reference.decision_function(X_new), rtol=1e-6, atol=1e-8
    )
    np.testing.assert_array_equal(gram.predict(X_new), reference.predict(X_new))
    # the model keeps only the support vectors, and scores new rows in bounded blocks
    assert gram.support_vectors_.shape == (len(reference.support_), X.shape[1])
    monkeypatch.setattr(classify, "PREDICT_BLOCK_ROWS", 7)
    np.testing.assert_allclose(
        gram.decision_function(X_new), reference.decision_function(X_new), rtol=1e-6, atol=1e-8
    )


def test_every_svm_takes_sample_weights_and_a_weighted_model_saves_as_a_plain_one(tmp_path):
    """Weights (a few-shot refit's ``shot_weight``) reach libsvm and liblinear on every path: the
    exact SVM equals SVC fitted with them; the scalable ones (the linear one-vs-one wrapper
    needs scikit-learn's metadata routing) change their scores, and their model files load
    with the allowed types and score as before saving."""
    from sklearn.svm import SVC

    X, y_int = make_classification(n_samples=120, n_features=10, n_informative=5, n_classes=3,
                                   n_clusters_per_class=1, random_state=3)
    y = np.array(["L1", "L2", "M3"])[y_int]
    weights = np.where(np.arange(120) % 7 == 0, 5.0, 1.0)
    reference = SVC(C=0.5).fit(X, y, sample_weight=weights)
    gram = classify.GramSVC(C=0.5).fit(X, y, sample_weight=weights)
    np.testing.assert_allclose(gram.decision_function(X), reference.decision_function(X), atol=1e-8)
    assert (classify.GramSVC(C=0.5).fit(X, y).predict(X) != gram.predict(X)).any()
    for kernel in ("linear", "rbf"):
        weighted = classify.make_svm_pipeline(kernel=kernel, solver="scalable").fit(X, y, svm__sample_weight=weights)
        plain = classify.make_svm_pipeline(kernel=kernel, solver="scalable").fit(X, y)
        assert np.abs(weighted.decision_function(X) - plain.decision_function(X)).max() > 0.1
        save_model(weighted, tmp_path / f"{kernel}.skops")
        np.testing.assert_array_equal(
            load_model(tmp_path / f"{kernel}.skops").decision_function(X), weighted.decision_function(X)
        )


def test_grid_search_matches_sklearn_gridsearchcv_over_a_pipeline():
    """The shared-Gram search gives GridSearchCV's fold scores, choice and refitted model."""
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    X, y, groups = _augmented_problem(n_images=90, seed=4)
    grid = {"kernel": ["linear", "rbf"], "C": [0.01, 1, 10], "gamma": ["scale", 0.02]}
    pipeline, cv = fit_svm(X, y, groups, grid, cv_folds=3, seed=0)
    reference = GridSearchCV(
        Pipeline([("scale", StandardScaler()), ("svm", SVC(random_state=0))]),
        build_param_grid(grid),
        cv=classify.make_inner_cv(y, groups, 3, seed=0),
        scoring="accuracy",
    ).fit(X, y, groups=groups)
    expected = reference.cv_results_
    np.testing.assert_allclose(cv["mean_test_score"], expected["mean_test_score"])
    for k in range(3):
        np.testing.assert_allclose(cv[f"split{k}_test_score"], expected[f"split{k}_test_score"])
    np.testing.assert_array_equal(cv["rank_test_score"], expected["rank_test_score"])
    assert cv["selected"].to_numpy().argmax() == reference.best_index_
    chosen = pipeline.named_steps["svm"]
    assert chosen.support_vectors_ is not None  # the BLAS kernel path, not libsvm's fallback
    assert {"svm__kernel": chosen.kernel, "svm__C": chosen.C} | (
        {"svm__gamma": chosen.gamma} if chosen.kernel == "rbf" else {}
    ) == reference.best_params_
    # Same optimisation problem; kernel values differ in the last bits (BLAS vs libsvm's loop),
    # so the solver stops at a slightly different point within its tolerance (tol=1e-3).
    np.testing.assert_allclose(
        pipeline.decision_function(X), reference.best_estimator_.decision_function(X), atol=5e-3
    )
    np.testing.assert_array_equal(pipeline.predict(X), reference.best_estimator_.predict(X))


def test_above_the_memory_budget_svc_computes_its_own_kernels_with_the_same_result(caplog):
    X, y, groups = _augmented_problem(n_images=60, seed=5)
    grid = {"kernel": ["linear", "rbf"], "C": [0.1, 10]}
    shared, cv_shared = fit_svm(X, y, groups, grid, cv_folds=3, seed=0)
    tiny = 1e-3  # MiB: no kernel matrix fits
    assert classify.gram_fits(len(X), classify.DEFAULT_GRAM_MB)
    assert not classify.gram_fits(len(X), tiny)
    with caplog.at_level(logging.INFO, logger="leukotype.classify"):
        bounded, cv_bounded = fit_svm(
            X, y, groups, grid, cv_folds=3, seed=0, gram_mb=tiny, solver="exact"
        )
    assert "libsvm computes the kernels itself" in caplog.text
    assert bounded.named_steps["svm"].support_vectors_ is None
    np.testing.assert_allclose(cv_bounded["mean_test_score"], cv_shared["mean_test_score"])
    assert cv_bounded["selected"].tolist() == cv_shared["selected"].tolist()
    np.testing.assert_array_equal(bounded.predict(X), shared.predict(X))
    np.testing.assert_allclose(bounded.decision_function(X), shared.decision_function(X), atol=5e-3)


# ------------------------------------------------------------------ solver by problem size


def test_choose_solver_follows_the_kernel_memory_budget():
    # 1,000 rows: an 8 MB (7.6 MiB) kernel matrix
    assert classify.choose_solver("auto", 1000, 8.0)[0] == "exact"
    solver, reason = classify.choose_solver("auto", 1000, 7.0)
    assert solver == "scalable"
    assert "1000 training rows" in reason and "8 MiB" in reason and "budget 7 MiB" in reason
    assert classify.choose_solver("exact", 10**6, 1.0)[0] == "exact"
    assert classify.choose_solver("scalable", 10, 1e6)[0] == "scalable"
    with pytest.raises(LeukotypeError, match=r"auto.*exact.*scalable"):
        classify.choose_solver("fast", 10, 1.0)
    # the budget is a share of the job's memory; a job without a stated memory gets the default
    assert classify.kernel_budget_mb(8000) == 2000
    assert classify.kernel_budget_mb(16000, 0.5) == 8000
    assert classify.kernel_budget_mb(None) == classify.DEFAULT_GRAM_MB
    with pytest.raises(LeukotypeError, match="kernel_memory_fraction"):
        classify.kernel_budget_mb(8000, 0)


def _four_class_problem(n_images=240, copies=3, seed=0):
    X, y = make_classification(
        n_samples=n_images, n_features=30, n_informative=8, n_redundant=0, n_classes=4,
        n_clusters_per_class=1, class_sep=1.5, random_state=seed,
    )
    rng = np.random.default_rng(seed)
    X_aug = np.repeat(X, copies, axis=0) + 0.05 * rng.normal(size=(n_images * copies, X.shape[1]))
    labels = np.array(["a", "b", "c", "d"])[np.repeat(y, copies)]
    groups = np.repeat([f"g{i:03d}" for i in range(n_images)], copies)
    return X_aug.astype(np.float32), labels, groups


def test_above_the_budget_auto_switches_to_the_scalable_solver_with_grouped_folds(tmp_path):
    X, y, groups = _four_class_problem()
    image = np.array([int(g[1:]) for g in groups])
    train, test = image < 180, (image >= 180) & (np.arange(len(X)) % 3 == 0)
    grid = {"kernel": ["linear", "rbf"], "C": [0.1, 1, 10]}
    exact, cv_exact = fit_svm(X[train], y[train], groups[train], grid, seed=0)
    budget = 0.5  # MiB: 540 rows need 2.2 MiB
    scalable, cv = fit_svm(
        X[train], y[train], groups[train], grid, seed=0, gram_mb=budget, n_components=200
    )
    assert isinstance(exact.named_steps["svm"], classify.GramSVC)
    assert isinstance(scalable.named_steps["svm"], classify.ScalableSVC)
    assert (cv_exact["solver"] == "exact").all() and (cv["solver"] == "scalable").all()
    assert cv["solver_reason"].iloc[0].startswith("auto: 540 training rows")
    assert (cv["kernel_budget_mb"] == budget).all() and (cv["n_components"] == 200).all()
    # the same grouped inner folds (StratifiedGroupKFold on the groups), the same grid
    assert (cv["n_splits"] == 3).all() and cv[["kernel", "C"]].equals(cv_exact[["kernel", "C"]])
    # on this well-separated problem both paths generalise alike
    acc = {name: (model.predict(X[test]) == y[test]).mean() for name, model in
           [("exact", exact), ("scalable", scalable)]}
    assert acc["exact"] > 0.85 and abs(acc["scalable"] - acc["exact"]) <= 0.05
    # the workflow's API works unchanged: one-vs-rest scores in class order, predict agrees
    classes = ["d", "c", "b", "a"]
    samples = pd.DataFrame({"image_id": groups[test], "transform": "identity", "label": y[test]})
    table = predict_table(scalable, X[test], samples, classes)
    scores = table[[f"score_{c}" for c in classes]].to_numpy()
    assert (np.array(classes)[scores.argmax(axis=1)] == table["pred"]).all()
    # skops round trip without untrusted types beyond the allowed ones, identical scores
    path = tmp_path / "svm.skops"
    save_model(scalable, path)
    assert set(skops.io.get_untrusted_types(file=path)) <= classify.ALLOWED_MODEL_TYPES
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.decision_function(X[test]),
                                  scalable.decision_function(X[test]))



def test_scalable_search_in_two_processes_chooses_the_same_model_as_one():
    """The scalable grid search's (fold, feature map) units run in n_jobs processes (issue 12:
    the default grid at 24,000 rows); liblinear's process-global random generator, reseeded
    per fit, must not make the processes' models differ from the one-process search's, on
    the linear and the Nystroem-rbf path alike (every candidate's fold scores compared)."""
    X, y, groups = _four_class_problem(n_images=90, copies=3, seed=11)
    results = {}
    for n_jobs in (1, 2):
        for kernel in ("linear", "rbf"):
            out_of_fold: dict = {}
            pipeline, cv = fit_svm(X, y, groups, {"kernel": [kernel, "linear"], "C": [0.1, 10.0]},
                                   seed=4, solver="scalable", n_components=40, n_jobs=n_jobs,
                                   out_of_fold=out_of_fold)
            results[n_jobs, kernel] = pipeline, cv, out_of_fold["scores"]
    for kernel in ("linear", "rbf"):
        (one, cv_one, oof_one), (two, cv_two, oof_two) = results[1, kernel], results[2, kernel]
        assert (cv_one["n_jobs"] == 1).all() and (cv_two["n_jobs"] == 2).all()
        assert set(cv_one["kernel"]) == {kernel, "linear"} and cv_one["selected"].sum() == 1
        scores = [f"split{k}_test_score" for k in range(3)] + ["mean_test_score", "selected"]
        pd.testing.assert_frame_equal(cv_one[scores], cv_two[scores], check_exact=True)
        assert np.isfinite(oof_one).all()
        np.testing.assert_allclose(oof_two, oof_one, rtol=0, atol=1e-12)
        np.testing.assert_allclose(two.decision_function(X), one.decision_function(X),
                                   rtol=0, atol=1e-12)

def test_scalable_rbf_uses_a_nystroem_map_shared_by_the_c_values():
    X, y, groups = _four_class_problem(n_images=120, seed=3)
    pipeline, cv = fit_svm(X, y, groups, {"kernel": ["rbf"], "C": [1.0]}, solver="scalable",
                           n_components=64, seed=0)
    svm = pipeline.named_steps["svm"]
    assert svm.map_.n_components == 64 and svm.map_.components_.shape == (64, X.shape[1])
    # gamma "scale" resolves as SVC resolves it, on the scaled training rows
    scaled = pipeline.named_steps["scale"].transform(X)
    assert svm.gamma_ == pytest.approx(1.0 / (X.shape[1] * scaled.var()), rel=1e-5)
    assert cv[["n_splits", "solver"]].values.tolist() == [[0, "scalable"]]
    # binary problems: one score column, decision_scores makes it two (-d, d)
    binary = y != "a"
    two, _ = fit_svm(X[binary], np.where(y[binary] == "b", "b", "other"), groups[binary],
                     {"kernel": ["linear"], "C": [1.0]}, solver="scalable")
    scores = classify.decision_scores(two, X[binary], ["b", "other"])
    np.testing.assert_allclose(scores[:, 0], -scores[:, 1])


def test_the_scalable_solver_refuses_kernels_it_cannot_approximate():
    X, y, groups = _four_class_problem(n_images=60)
    with pytest.raises(LeukotypeError, match=r"supports kernels \['linear', 'rbf'\].*svm.solver: exact"):
        fit_svm(X, y, groups, {"kernel": ["poly"], "C": [1.0]}, solver="scalable")


def _svm_stage_inputs(tmp_path):
    """A train_svm job's inputs in ``tmp_path``: features of 80 images x (identity, rot90) and
    the sample table as augment writes it without evaluation.tta (test images under the
    identity view only). Returns the features, labels, groups and the sample table."""
    from leukotype.feature_store import write_feature_matrix
    from leukotype.io import write_tsv

    X, y, groups = _four_class_problem(n_images=80, copies=2, seed=4)
    index = pd.DataFrame({"image_id": groups, "transform": np.tile(["identity", "rot90"], 80)})
    write_feature_matrix(tmp_path / "features", "pool", index, X)
    test_image = np.array([int(g[1:]) % 4 == 0 for g in groups])
    samples = index.assign(label=y, group=groups, fold="holdout",
                           part=np.where(test_image, "test", "train"))
    samples = samples[(samples["part"] == "train") | (samples["transform"] == "identity")]
    write_tsv(samples, tmp_path / "samples.tsv")
    return X, y, groups, samples


def test_train_svm_stage_takes_its_kernel_budget_from_the_jobs_memory(tmp_path):
    """run_svm (the train_svm job): the budget is svm.kernel_memory_fraction of the job's
    mem_mb, the solver follows it, and evaluate records the choice for metrics.json."""
    from leukotype.io import read_tsv
    from leukotype.stages import run_svm, svm_choice

    X, y, groups, samples = _svm_stage_inputs(tmp_path)
    task = {"name": "t", "column": "label", "classes": ["a", "b", "c", "d"]}
    svm_cfg = {"C": [1.0], "kernel": ["linear", "rbf"], "gamma": ["scale"], "cv_folds": 2,
               "class_weight": None, "solver": "auto", "kernel_memory_fraction": 2e-5,
               "n_components": 32}
    chosen = {}
    # 120 training rows: a 0.11 MiB kernel matrix; budgets 0.16 MiB (8000 MB) and 0.04 MiB
    for memory_mb in (8000, 2000):
        out = tmp_path / str(memory_mb)
        predictions = run_svm(tmp_path / "samples.tsv", task, "holdout", [tmp_path / "features"],
                              "pool", svm_cfg, out / "svm.skops", out / "predictions.tsv",
                              out / "cv.tsv", memory_mb=memory_mb)
        assert len(predictions) == (samples["part"] == "test").sum()  # identity rows of the test images
        chosen[memory_mb] = svm_choice(read_tsv(out / "cv.tsv"))
    assert chosen[8000]["solver"] == "exact" and chosen[8000]["kernel_budget_mb"] == 0.2
    assert chosen[2000]["solver"] == "scalable" and chosen[2000]["kernel_budget_mb"] == 0.0
    assert "budget 0 MiB" in chosen[2000]["solver_reason"]
    assert chosen[2000]["n_components"] == 32 and chosen[2000]["kernel"] in ("linear", "rbf")
    # evaluate writes the choice into metrics.json
    import json

    from leukotype.stages import run_evaluate

    out = tmp_path / "2000"
    run_evaluate(out / "predictions.tsv", tmp_path / "samples.tsv", task,
                 {"task": "t", "strategy": "features_svm", "backbone": "b", "layer": "pool",
                  "fold": "holdout"}, {"n_bootstrap": 20, "seed": 0}, out / "metrics.json",
                 out / "confusion.csv", out / "confusion.png", cv_results=out / "cv.tsv")
    record = json.loads((out / "metrics.json").read_text())
    assert record["classifier"]["solver"] == "scalable"
    assert record["classifier"]["solver_reason"] == chosen[2000]["solver_reason"]


@pytest.mark.parametrize("solver", ["exact", "scalable"])
def test_search_hands_the_calibration_the_out_of_fold_scores_it_would_refit(solver, monkeypatch):
    """The grid search already fitted the selected setting on the calibration's inner folds:
    its out-of-fold decision scores equal what calibration.out_of_fold_svm_scores refits, and
    run_svm's calibration uses them without refitting (issue 12: 3 fewer fits per SVM job)."""
    from leukotype.calibration import fit_svm_calibration, out_of_fold_svm_scores

    X, y, groups = _four_class_problem(n_images=90, copies=3, seed=5)
    grid = {"kernel": ["linear", "rbf"], "C": [0.1, 1.0]}
    out_of_fold: dict = {}
    pipeline, cv = fit_svm(X, y, groups, grid, cv_folds=3, seed=7, solver=solver,
                           n_components=48, out_of_fold=out_of_fold)
    classes = ["d", "b", "a", "c"]  # a task's order, not the sorted one
    assert out_of_fold["classes"] == ["a", "b", "c", "d"]
    assert (out_of_fold["cv_folds"], out_of_fold["seed"]) == (3, 7)
    order = [out_of_fold["classes"].index(c) for c in classes]
    reused = out_of_fold["scores"][:, order]
    refitted = out_of_fold_svm_scores(pipeline, X, y, groups, classes, cv_folds=3, seed=7)
    assert reused.shape == (len(X), 4) and np.isfinite(reused).all()
    np.testing.assert_allclose(reused, refitted, rtol=1e-6, atol=1e-8)
    # the calibration given those scores refits nothing and records the same temperature
    expected = fit_svm_calibration(pipeline, X, y, groups, classes, cv_folds=3, seed=7)
    monkeypatch.setattr("leukotype.calibration.out_of_fold_svm_scores",
                        lambda *a, **k: pytest.fail("refitted the inner folds"))
    record = fit_svm_calibration(pipeline, X, y, groups, classes, cv_folds=3, seed=7,
                                 scores=reused)
    assert record["temperature"] == pytest.approx(expected["temperature"], rel=1e-6)
    with pytest.raises(LeukotypeError, match="do not cover"):
        fit_svm_calibration(pipeline, X, y, groups, classes, scores=reused[:-1])


def test_train_svm_stage_calibrates_on_the_searchs_scores_without_refitting(tmp_path, monkeypatch):
    from leukotype.io import read_json
    from leukotype.stages import run_svm

    X, y, groups, samples = _svm_stage_inputs(tmp_path)
    task = {"name": "t", "column": "label", "classes": ["d", "c", "b", "a"]}
    svm_cfg = {"C": [0.1, 1.0], "kernel": ["linear"], "gamma": ["scale"], "cv_folds": 2,
               "class_weight": None, "solver": "auto"}
    args = (tmp_path / "samples.tsv", task, "holdout", [tmp_path / "features"], "pool", svm_cfg)
    search = classify.fit_svm
    # as before: a search that hands nothing on, so the calibration refits the inner folds
    monkeypatch.setattr(classify, "fit_svm", lambda *a, out_of_fold=None, **k: search(*a, **k))
    run_svm(*args, tmp_path / "a.skops", tmp_path / "a.tsv", tmp_path / "a_cv.tsv",
            out_calibration=tmp_path / "a.json")
    monkeypatch.setattr(classify, "fit_svm", search)
    monkeypatch.setattr("leukotype.calibration.out_of_fold_svm_scores",
                        lambda *a, **k: pytest.fail("refitted the inner folds"))
    # a search: the calibration takes the search's scores, the same temperature as refitting
    run_svm(*args, tmp_path / "b.skops", tmp_path / "b.tsv", tmp_path / "b_cv.tsv",
            out_calibration=tmp_path / "b.json")
    before, after = read_json(tmp_path / "a.json"), read_json(tmp_path / "b.json")
    assert after["temperature"] == pytest.approx(before["temperature"], rel=1e-6)
    assert after["n"] == before["n"] == 120
    a, b = pd.read_csv(tmp_path / "a.tsv", sep="\t"), pd.read_csv(tmp_path / "b.tsv", sep="\t")
    prob = [f"prob_{c}" for c in task["classes"]]
    np.testing.assert_allclose(b[prob].to_numpy(), a[prob].to_numpy(), rtol=1e-6)

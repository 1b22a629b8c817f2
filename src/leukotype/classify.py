"""SVM on CNN features: grouped grid search, safe model files and prediction tables."""

from __future__ import annotations

import logging
import numbers
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import ParameterGrid, GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from leukotype.errors import LeukotypeError
from leukotype.io import atomic_path

LOGGER = logging.getLogger(__name__)

#: Search space used when the configuration gives none.
DEFAULT_PARAM_GRID: dict[str, list[Any]] = {
    "kernel": ["linear", "rbf"],
    "C": [0.1, 1, 10],
    "gamma": ["scale"],
}

#: SVC kernels that may be searched, and the ones that use ``gamma``.
KERNELS = ("linear", "rbf", "poly", "sigmoid")
GAMMA_KERNELS = frozenset({"rbf", "poly", "sigmoid"})

#: Types a model file may contain beyond those skops trusts by default. Anything else found by
#: ``skops.io.get_untrusted_types`` makes ``load_model`` refuse the file: loading never runs
#: code named by the file.
ALLOWED_MODEL_TYPES = frozenset(
    {
        "sklearn.pipeline.Pipeline",
        "sklearn.preprocessing._data.StandardScaler",
        "sklearn.svm._classes.SVC",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.float64",
        "numpy.float32",
        "numpy.int64",
        "numpy.int32",
        "numpy.str_",
        "numpy.bool_",
    }
)


# --------------------------------------------------------------------------------------------
# pipeline and search space


def make_svm_pipeline(
    kernel: str = "rbf",
    C: float = 1.0,
    gamma: str | float = "scale",
    class_weight: str | Mapping[str, float] | None = None,
    seed: int = 0,
) -> Pipeline:
    """StandardScaler followed by an SVC (one-vs-one training, decision scores, no Platt scaling).

    Scaling matters: CNN activations have very different ranges per unit, and both the RBF
    kernel and the C penalty assume comparable feature scales.
    """
    return Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "svm",
                SVC(
                    kernel=kernel,
                    C=C,
                    gamma=gamma,
                    class_weight=class_weight,
                    random_state=seed,
                ),
            ),
        ]
    )


def _as_list(name: str, values: Any) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        values = [values]
    values = list(values)
    if not values:
        raise LeukotypeError(f"SVM parameter grid: {name!r} must list at least one value")
    return values


def _check_c(values: list[Any]) -> list[float]:
    checked = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise LeukotypeError(
                f"SVM parameter grid: C values must be positive numbers, got {value!r} "
                "(YAML reads 1e-3 as text: write 1.0e-3)"
            )
        checked.append(float(value))
    return checked


def _check_gamma(values: list[Any]) -> list[str | float]:
    checked: list[str | float] = []
    for value in values:
        if isinstance(value, str) and value in ("scale", "auto"):
            checked.append(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0:
            checked.append(float(value))
        else:
            raise LeukotypeError(
                f"SVM parameter grid: gamma must be 'scale', 'auto' or a positive number, got {value!r}"
            )
    return checked


def build_param_grid(config: Mapping[str, Any] | None = None) -> list[dict[str, list[Any]]]:
    """Turn ``{C: [...], kernel: [...], gamma: [...]}`` into GridSearchCV grids for the pipeline.

    One grid per kernel so that ``gamma`` is searched only for kernels that use it (a linear SVM
    would otherwise be fitted once per gamma value for identical results). Missing keys take
    :data:`DEFAULT_PARAM_GRID` values.
    """
    config = dict(DEFAULT_PARAM_GRID if config is None else config)
    unknown = sorted(set(config) - set(DEFAULT_PARAM_GRID))
    if unknown:
        raise LeukotypeError(
            f"SVM parameter grid: unknown keys {unknown}; valid keys are {sorted(DEFAULT_PARAM_GRID)}"
        )
    kernels = _as_list("kernel", config.get("kernel", DEFAULT_PARAM_GRID["kernel"]))
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        raise LeukotypeError(
            f"SVM parameter grid: unknown kernels {bad}; choose from {list(KERNELS)}"
        )
    c_values = _check_c(_as_list("C", config.get("C", DEFAULT_PARAM_GRID["C"])))
    gammas = _check_gamma(_as_list("gamma", config.get("gamma", DEFAULT_PARAM_GRID["gamma"])))

    grids = []
    for kernel in dict.fromkeys(kernels):  # keep order, drop repeats
        grid: dict[str, list[Any]] = {"svm__kernel": [kernel], "svm__C": c_values}
        if kernel in GAMMA_KERNELS:
            grid["svm__gamma"] = gammas
        grids.append(grid)
    return grids


# --------------------------------------------------------------------------------------------
# grouped cross-validation


def groups_per_class(y: Sequence[Any], groups: Sequence[Any]) -> dict[str, int]:
    """Number of distinct groups holding at least one sample of each class."""
    frame = pd.DataFrame({"y": np.asarray(y).astype(str), "group": np.asarray(groups).astype(str)})
    return frame.groupby("y")["group"].nunique().to_dict()


def choose_cv_folds(y: Sequence[Any], groups: Sequence[Any], cv_folds: int) -> int:
    """Number of inner folds: ``cv_folds``, or fewer (at least 2) if a class has too few groups.

    Stratification needs every class in every validation fold, which takes at least one group
    of that class per fold.
    """
    if cv_folds < 2:
        raise LeukotypeError(f"cv_folds must be at least 2, got {cv_folds}")
    counts = groups_per_class(y, groups)
    scarce_class, fewest = min(counts.items(), key=lambda item: item[1])
    if fewest >= cv_folds:
        return cv_folds
    if fewest >= 2:
        LOGGER.warning(
            "class %r has only %d groups in the training data; using %d inner CV folds instead of %d",
            scarce_class,
            fewest,
            fewest,
            cv_folds,
        )
        return fewest
    raise LeukotypeError(
        f"class {scarce_class!r} has {fewest} group(s) in the training data; grouped inner "
        f"cross-validation needs at least 2 groups per class (counts: {counts}). Add images from "
        "more patients, merge the class, or drop it from the task"
    )


def make_inner_cv(
    y: Sequence[Any], groups: Sequence[Any], cv_folds: int = 3, seed: int = 0
) -> StratifiedGroupKFold:
    """The splitter for hyper-parameter search: stratified by class, grouped by ``groups``."""
    n_splits = choose_cv_folds(y, groups, cv_folds)
    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def _cv_results_frame(search: GridSearchCV) -> pd.DataFrame:
    """The useful part of ``cv_results_`` as a flat table (one row per candidate)."""
    results = search.cv_results_
    frame = pd.DataFrame(
        {
            "kernel": [p["svm__kernel"] for p in results["params"]],
            "C": [p["svm__C"] for p in results["params"]],
            "gamma": [p.get("svm__gamma", "") for p in results["params"]],
            "mean_test_score": results["mean_test_score"],
            "std_test_score": results["std_test_score"],
            "rank_test_score": results["rank_test_score"],
            "mean_fit_time": results["mean_fit_time"],
        }
    )
    for k in range(search.n_splits_):
        frame[f"split{k}_test_score"] = results[f"split{k}_test_score"]
    frame["n_splits"] = search.n_splits_
    frame["scoring"] = search.scoring
    frame["selected"] = np.arange(len(frame)) == search.best_index_
    return frame


def fit_svm(
    X: np.ndarray,
    y: Sequence[Any],
    groups: Sequence[Any],
    param_grid: Mapping[str, Any] | None = None,
    cv_folds: int = 3,
    class_weight: str | Mapping[str, float] | None = None,
    seed: int = 0,
    n_jobs: int = 1,
    scoring: str = "accuracy",
) -> tuple[Pipeline, pd.DataFrame]:
    """Choose kernel, C (and gamma) by grouped grid search on the training rows, then refit.

    ``X, y, groups`` are the TRAINING part only (test rows never take part in model selection).
    Training rows include rotated copies of each image; inner folds are split by ``groups``
    (patient / duplicate group, so also by image) because a rotated copy of a validation image
    in the inner training fold would let the search reward memorisation and pick an overfitting
    C/gamma. ``StratifiedGroupKFold`` keeps class proportions as far as groups allow. The best
    setting is refitted on all training rows. Returns the fitted pipeline and one row per
    candidate setting with its fold scores (``selected`` marks the chosen one).
    """
    X = np.asarray(X)
    y = np.asarray(y).astype(str)
    groups = np.asarray(groups).astype(str)
    if X.ndim != 2:
        raise LeukotypeError(
            f"features must be a 2-D (samples x features) array, got shape {X.shape}"
        )
    if not len(X) == len(y) == len(groups):
        raise LeukotypeError(
            f"features ({len(X)} rows), labels ({len(y)}) and groups ({len(groups)}) must align"
        )
    if not np.isfinite(X).all():
        raise LeukotypeError("features contain NaN or infinite values; re-extract the features")
    if len(np.unique(y)) < 2:
        raise LeukotypeError(
            f"training data has a single class {np.unique(y).tolist()}; need at least 2"
        )

    grids = build_param_grid(param_grid)
    candidates = list(ParameterGrid(grids))
    if len(candidates) == 1:
        # Nothing to choose: no inner cross-validation, so no minimum number of groups either.
        pipeline = make_svm_pipeline(class_weight=class_weight, seed=seed).set_params(**candidates[0])
        pipeline.fit(X, y)
        LOGGER.info("SVM with the single configured setting %s (no search)", candidates[0])
        only = {k.removeprefix("svm__"): v for k, v in candidates[0].items()}
        frame = pd.DataFrame([{"kernel": only["kernel"], "C": only["C"], "gamma": only.get("gamma", ""),
                               "n_splits": 0, "scoring": scoring, "selected": True}])
        return pipeline, frame
    splitter = make_inner_cv(y, groups, cv_folds=cv_folds, seed=seed)
    search = GridSearchCV(
        make_svm_pipeline(class_weight=class_weight, seed=seed),
        grids,
        scoring=scoring,
        cv=splitter,
        refit=True,
        n_jobs=n_jobs,
        error_score="raise",
    )
    search.fit(X, y, groups=groups)
    LOGGER.info(
        "SVM grid search selected %s (%s %.4f)", search.best_params_, scoring, search.best_score_
    )
    return search.best_estimator_, _cv_results_frame(search)


# --------------------------------------------------------------------------------------------
# model files


def save_model(pipeline: Pipeline, path: str | os.PathLike) -> None:
    """Write a fitted pipeline with skops (no pickle), atomically."""
    with atomic_path(path) as tmp:
        import skops.io  # lazily: importing it walks all of scikit-learn (seconds)

        skops.io.dump(pipeline, tmp)


def load_model(
    path: str | os.PathLike, allowed_types: frozenset[str] = ALLOWED_MODEL_TYPES
) -> Pipeline:
    """Load a pipeline written by :func:`save_model`, refusing files that name unexpected types.

    skops lists the types in the file it does not trust by default; each must be in
    ``allowed_types`` or the file is rejected before anything in it is constructed.
    """
    import skops.io

    path = Path(path)
    if not path.is_file():
        raise LeukotypeError(f"model file {path} does not exist; run the SVM training step first")
    try:
        untrusted = skops.io.get_untrusted_types(file=path)
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise LeukotypeError(
            f"model file {path} is not a readable skops file ({error}); delete it and rerun the "
            "SVM training step"
        ) from error
    refused = sorted(set(untrusted) - set(allowed_types))
    if refused:
        raise LeukotypeError(
            f"model file {path} contains types that are not allowed: {refused}. It was not written "
            "by leukotype.classify.save_model (or was tampered with); refusing to load it"
        )
    return skops.io.load(path, trusted=list(untrusted))


# --------------------------------------------------------------------------------------------
# predictions


def decision_scores(pipeline: Pipeline, X: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """(N, K) one-vs-rest decision scores with columns in ``classes`` order.

    For two classes SVC returns one score d per sample, positive towards ``classes_[1]``: the
    scores are ``-d`` for ``classes_[0]`` and ``d`` for ``classes_[1]``.
    """
    classes = [str(c) for c in classes]
    fitted = [str(c) for c in pipeline.classes_]
    if sorted(fitted) != sorted(classes):
        raise LeukotypeError(
            f"the model was trained on classes {fitted} but the task has classes {classes}; "
            "every class must be present in each training fold"
        )
    raw = np.asarray(pipeline.decision_function(X), dtype=float)
    if raw.ndim == 1:
        raw = np.column_stack([-raw, raw])
    if raw.shape != (len(X), len(fitted)):
        raise LeukotypeError(
            f"unexpected decision_function shape {raw.shape} for {len(fitted)} classes"
        )
    order = [fitted.index(c) for c in classes]
    return raw[:, order]


def predict_table(
    pipeline: Pipeline,
    X: np.ndarray,
    samples_df: pd.DataFrame,
    classes: Sequence[str],
    label_column: str = "label",
) -> pd.DataFrame:
    """Predictions of ``pipeline`` for ``X`` (rows aligned with ``samples_df``).

    Columns: ``image_id, transform, true, pred, score_<class>...`` (decision scores, not
    probabilities). ``true`` comes from ``samples_df[label_column]``.
    """
    missing = sorted({"image_id", "transform", label_column} - set(samples_df.columns))
    if missing:
        raise LeukotypeError(f"sample table lacks columns {missing}")
    if len(X) != len(samples_df):
        raise LeukotypeError(
            f"{len(X)} feature rows but {len(samples_df)} samples; features must be selected "
            "for exactly these samples, in order"
        )
    classes = [str(c) for c in classes]
    scores = decision_scores(pipeline, X, classes)
    table = pd.DataFrame(
        {
            "image_id": samples_df["image_id"].astype(str).to_numpy(),
            "transform": samples_df["transform"].astype(str).to_numpy(),
            "true": samples_df[label_column].astype(str).to_numpy(),
            "pred": np.asarray(pipeline.predict(X)).astype(str),
        }
    )
    for k, cls in enumerate(classes):
        table[f"score_{cls}"] = scores[:, k]
    return table

"""SVM on CNN features: grouped grid search, safe model files and prediction tables."""

from __future__ import annotations

import logging
import numbers
import os
import sys
import time
import types
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.kernel_approximation import Nystroem
from sklearn.metrics import get_scorer
from sklearn.model_selection import ParameterGrid, StratifiedGroupKFold
from sklearn.multiclass import OneVsOneClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

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
        "leukotype.classify.GramSVC",
        "leukotype.classify.ScalableSVC",
        "sklearn.kernel_approximation.Nystroem",
        "sklearn.svm._classes.LinearSVC",
        "sklearn.multiclass.OneVsOneClassifier",
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


#: Test rows per block when a model scores new samples: bounds the (rows x training samples)
#: kernel block held in memory.
PREDICT_BLOCK_ROWS = 2048
#: Default memory for one (training x training) kernel matrix. Above it the SVC computes its own
#: kernel values (libsvm's row cache): same model, slower, memory bounded. The workflow sets it
#: from the job's ``mem_mb``.
DEFAULT_GRAM_MB = 1024


def gram_fits(n_samples: int, gram_mb: float) -> bool:
    """Whether an (n x n) float64 kernel matrix fits in ``gram_mb`` MiB."""
    return n_samples * n_samples * 8 <= gram_mb * 2**20


#: ``svm.solver`` values. ``exact``: libsvm's kernel SVM (:class:`GramSVC`); ``scalable``:
#: liblinear's linear SVMs on the features (linear kernel) or on a Nystroem approximation of
#: the kernel (rbf) (:class:`ScalableSVC`), memory linear in the rows; ``auto``: exact while the
#: training kernel matrix fits the kernel-memory budget, scalable above it.
SOLVERS = ("auto", "exact", "scalable")
#: Share of the job's memory one (training x training) kernel matrix may take. The exact search
#: holds about two of them (the linear Gram matrix and one candidate's kernel) next to the
#: features, so a quarter leaves room for the rest.
DEFAULT_KERNEL_MEMORY_FRACTION = 0.25
#: Rank of the scalable path's Nystroem kernel approximation (landmark rows).
DEFAULT_N_COMPONENTS = 1024
#: Kernels the scalable path supports (Nystroem approximates rbf; linear needs no map).
SCALABLE_KERNELS = ("linear", "rbf")


def kernel_budget_mb(
    memory_mb: float | None, fraction: float = DEFAULT_KERNEL_MEMORY_FRACTION
) -> float:
    """MiB one training kernel matrix may take: ``fraction`` of the job's ``memory_mb``
    (:data:`DEFAULT_GRAM_MB` when the job states no memory)."""
    if not memory_mb:
        return float(DEFAULT_GRAM_MB)
    if not 0 < fraction <= 1:
        raise LeukotypeError(f"svm.kernel_memory_fraction must be in (0, 1], got {fraction}")
    return float(memory_mb) * fraction


def choose_solver(solver: str, n_rows: int, gram_mb: float) -> tuple[str, str]:
    """``(exact|scalable, reason)`` for ``n_rows`` training rows under ``gram_mb`` MiB.

    ``auto`` picks ``exact`` exactly when the (n_rows x n_rows) float64 kernel matrix fits.
    The reason is recorded with the run, so a table says why its SVM is the one it is.
    """
    if solver not in SOLVERS:
        raise LeukotypeError(f"unknown svm.solver {solver!r}; choose from {list(SOLVERS)}")
    need_mb = n_rows * n_rows * 8 / 2**20
    sizes = f"{n_rows} training rows: kernel matrix {need_mb:.0f} MiB, budget {gram_mb:.0f} MiB"
    if solver != "auto":
        return solver, f"svm.solver: {solver} ({sizes})"
    if gram_fits(n_rows, gram_mb):
        return "exact", f"auto: {sizes}, fits -> exact kernel SVM"
    return "scalable", f"auto: {sizes}, above it -> scalable (liblinear / Nystroem)"


def resolve_gamma(gamma: str | float, X: np.ndarray) -> float:
    """The number SVC uses for ``gamma``: ``scale`` = 1 / (n_features * X.var()), ``auto`` = 1 / n_features."""
    if gamma == "scale":
        variance = float(np.var(X))
        return 1.0 / (X.shape[1] * variance) if variance > 0 else 1.0
    if gamma == "auto":
        return 1.0 / X.shape[1]
    return float(gamma)


def kernel_from_gram(
    gram: np.ndarray,
    kernel: str,
    gamma: float,
    sq_rows: np.ndarray | None = None,
    sq_cols: np.ndarray | None = None,
    degree: int = 3,
    coef0: float = 0.0,
) -> np.ndarray:
    """SVC's kernel values from the linear Gram matrix ``A @ B.T`` (a new array).

    ``sq_rows`` / ``sq_cols`` are the squared norms of the rows of A and B (needed by ``rbf``:
    ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b``). The formulas are libsvm's, so a precomputed-kernel
    SVC fitted on these values is the SVC that would compute them itself.
    """
    if kernel == "linear":
        return gram.copy()
    if kernel == "rbf":
        if sq_rows is None or sq_cols is None:
            raise ValueError("the rbf kernel needs the squared row norms")
        distances = sq_rows[:, None] + sq_cols[None, :] - 2.0 * gram
        np.maximum(distances, 0.0, out=distances)  # rounding can make |a-a|^2 slightly negative
        distances *= -gamma
        return np.exp(distances, out=distances)
    if kernel == "poly":
        return (gamma * gram + coef0) ** degree
    if kernel == "sigmoid":
        return np.tanh(gamma * gram + coef0)
    raise ValueError(f"unknown kernel {kernel!r}")


def gram_matrix(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``A @ B.T`` in float64 (one BLAS call) and the squared row norms of A and B (for rbf;
    O(n d), negligible next to the product)."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    return A @ B.T, np.einsum("ij,ij->i", A, A), np.einsum("ij,ij->i", B, B)


class GramSVC(ClassifierMixin, BaseEstimator):
    """``sklearn.svm.SVC`` whose kernel matrix is computed by one BLAS matrix product.

    libsvm evaluates kernels one pair of samples at a time with a plain loop; on CNN features
    (thousands of dimensions) that loop dominates training. This estimator computes the same
    kernel values with a matrix product and hands them to ``SVC(kernel="precomputed")``: same
    optimisation problem, same solution up to float rounding, several times faster. It keeps
    only the support vectors, so a saved model stays small and scores new feature rows like any
    SVC (``predict``, ``decision_function``, ``score``). Above ``gram_mb`` MiB for the training
    kernel matrix it falls back to SVC computing its own kernels (same model, bounded memory).
    """

    def __init__(
        self,
        kernel: str = "rbf",
        C: float = 1.0,
        gamma: str | float = "scale",
        degree: int = 3,
        coef0: float = 0.0,
        class_weight: str | Mapping[str, float] | None = None,
        random_state: int | None = None,
        gram_mb: float = DEFAULT_GRAM_MB,
    ) -> None:
        self.kernel = kernel
        self.C = C
        self.gamma = gamma
        self.degree = degree
        self.coef0 = coef0
        self.class_weight = class_weight
        self.random_state = random_state
        self.gram_mb = gram_mb

    def _svc(self, kernel: str = "precomputed") -> SVC:
        return SVC(
            kernel=kernel,
            gamma=getattr(self, "gamma_", "scale"),
            degree=self.degree,
            coef0=self.coef0,
            C=self.C,
            class_weight=self.class_weight,
            random_state=self.random_state,
        )

    def _kernel(self, gram, sq_rows=None, sq_cols=None) -> np.ndarray:
        return kernel_from_gram(
            gram, self.kernel, self.gamma_, sq_rows, sq_cols, degree=self.degree, coef0=self.coef0
        )

    def fit(
        self, X: np.ndarray, y: Sequence[Any], sample_weight: np.ndarray | None = None
    ) -> GramSVC:
        """``sample_weight``: per-row multipliers of ``C``, as in ``SVC.fit``."""
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; choose from {list(KERNELS)}")
        X = np.asarray(X, dtype=np.float64)
        self.gamma_ = resolve_gamma(self.gamma, X)
        if not gram_fits(len(X), self.gram_mb):
            LOGGER.info(
                "%d training rows: kernel matrix above %s MiB, libsvm computes the kernels itself",
                len(X),
                self.gram_mb,
            )
            self.svc_ = self._svc(self.kernel).fit(X, np.asarray(y), sample_weight=sample_weight)
            self.support_, self.classes_ = self.svc_.support_, self.svc_.classes_
            self.n_features_in_, self.n_fit_ = X.shape[1], len(X)
            self.support_vectors_ = None  # kept by the SVC itself
            return self
        gram, sq, _ = gram_matrix(X, X)
        return self._fit_gram(gram, sq, X, y, sample_weight)

    def _fit_gram(
        self,
        gram: np.ndarray,
        sq: np.ndarray,
        X: np.ndarray,
        y: Sequence[Any],
        sample_weight: np.ndarray | None = None,
    ) -> GramSVC:
        """Fit on ``gram = X @ X.T`` and ``sq`` = squared row norms of X (shared by a search)."""
        self.gamma_ = resolve_gamma(self.gamma, X)
        return self._fit_kernel(self._kernel(gram, sq, sq), X, y, sample_weight)

    def _fit_kernel(
        self,
        kernel: np.ndarray,
        X: np.ndarray,
        y: Sequence[Any],
        sample_weight: np.ndarray | None = None,
    ) -> GramSVC:
        """Fit on the training kernel matrix of ``X`` (``gamma_`` already resolved): the
        search's shared Gram path, and a few-shot refit's domain-augmented kernel
        (:mod:`leukotype.few_shot`)."""
        svc = self._svc().fit(kernel, np.asarray(y), sample_weight=sample_weight)
        self.support_scale_ = None
        self.n_fit_ = len(X)
        self.support_vectors_ = np.asarray(X, dtype=np.float64)[svc.support_]
        self.support_ = svc.support_
        self.n_features_in_ = X.shape[1]
        self.classes_ = svc.classes_
        self.svc_ = svc
        return self

    def _test_kernel(self, X: np.ndarray) -> np.ndarray:
        """(rows, n_fit) kernel block: values in the support-vector columns, zeros elsewhere.

        libsvm reads only the support-vector columns of a precomputed kernel, so the others
        need not be computed.
        """
        gram, sq_rows, sq_sv = gram_matrix(X, self.support_vectors_)
        block = np.zeros((len(X), self.n_fit_))
        block[:, self.support_] = self._kernel(gram, sq_rows, sq_sv)
        # a view of a domain-augmented fit scales each support vector's kernel column
        # (leukotype.few_shot); models saved before it existed have no such attribute
        scale = getattr(self, "support_scale_", None)
        if scale is not None:
            block[:, self.support_] *= scale
        return block

    def _blocks(self, X: np.ndarray, method: str) -> np.ndarray:
        check_is_fitted(self, "svc_")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"expected {self.n_features_in_} features per row, got array of shape {X.shape}"
            )
        score = getattr(self.svc_, method)
        if self.support_vectors_ is None:  # fitted without a kernel matrix (see fit)
            return score(X)
        parts = [
            score(self._test_kernel(X[start : start + PREDICT_BLOCK_ROWS]))
            for start in range(0, len(X), PREDICT_BLOCK_ROWS)
        ]
        return np.concatenate(parts)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self._blocks(X, "decision_function")

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._blocks(X, "predict")


def linear_svm(C: float, kernel: str, class_weight, random_state) -> BaseEstimator:
    """The scalable path's linear solver (liblinear), chosen by what converged fast and came
    closest to the exact SVM on real CNN features (``bench/svm_scaling.py``):

    - on the features themselves (``linear``): one-vs-one, like SVC, of L1-loss (hinge) SVMs
      solved by dual coordinate descent -- SVC's own objective per pair of classes, with
      liblinear's regularised bias; each pair's problem has as many rows as its two classes;
    - on the Nystroem map (``rbf``, rows >> components): one-vs-rest L2-loss SVMs solved in
      the primal (trust-region Newton), which converges in a few dozen iterations there.
    """
    if kernel == "linear":
        return OneVsOneClassifier(
            LinearSVC(C=C, loss="hinge", dual=True, class_weight=class_weight,
                      random_state=random_state, max_iter=1000)
        )
    return LinearSVC(
        C=C, class_weight=class_weight, random_state=random_state, dual=False, max_iter=200
    )


def fit_weighted(
    estimator: BaseEstimator, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None
) -> BaseEstimator:
    """``estimator.fit(X, y, sample_weight=...)``, also for the one-vs-one wrapper.

    ``OneVsOneClassifier`` passes weights to its binary SVMs only through scikit-learn's
    metadata routing. It is switched on for this one call (not globally), and the routing
    requests are removed again afterwards, so the saved model holds no routing objects (a
    model file may hold only ``ALLOWED_MODEL_TYPES``).
    """
    if sample_weight is None:
        return estimator.fit(X, y)
    if not isinstance(estimator, OneVsOneClassifier):
        return estimator.fit(X, y, sample_weight=sample_weight)
    import sklearn

    with sklearn.config_context(enable_metadata_routing=True):
        estimator.estimator.set_fit_request(sample_weight=True)
        estimator.fit(X, y, sample_weight=sample_weight)
    for part in (estimator.estimator, *estimator.estimators_):
        part.__dict__.pop("_metadata_request", None)
    return estimator


class ScalableSVC(ClassifierMixin, BaseEstimator):
    """A linear SVM in the features (``kernel="linear"``) or in a Nystroem feature map that
    approximates the RBF kernel (``kernel="rbf"``), for training sets whose kernel matrix does
    not fit in memory.

    Memory is linear in the number of rows: the map is an (n x n_components) product with
    ``n_components`` landmark rows drawn with ``random_state``; the solver is liblinear's
    (:func:`linear_svm`). Memory is O(n * max(d, n_components)) instead of O(n^2). ``gamma``
    follows SVC's conventions (``scale``, ``auto`` or a number), so the grid means the same on
    both paths. Scores with ``decision_function`` / ``predict`` like an SVC (one column per
    class; one column for two classes).
    """

    def __init__(
        self,
        kernel: str = "rbf",
        C: float = 1.0,
        gamma: str | float = "scale",
        class_weight: str | Mapping[str, float] | None = None,
        random_state: int | None = None,
        n_components: int = DEFAULT_N_COMPONENTS,
    ) -> None:
        self.kernel = kernel
        self.C = C
        self.gamma = gamma
        self.class_weight = class_weight
        self.random_state = random_state
        self.n_components = n_components

    def _make_map(self, X: np.ndarray) -> Nystroem | None:
        """The fitted feature map for ``X`` (None for the linear kernel)."""
        if self.kernel not in SCALABLE_KERNELS:
            raise ValueError(
                f"the scalable SVM supports kernels {list(SCALABLE_KERNELS)}, got {self.kernel!r}"
            )
        if self.kernel == "linear":
            return None
        n_components = int(min(self.n_components, len(X)))
        return Nystroem(
            kernel="rbf",
            gamma=resolve_gamma(self.gamma, X),
            n_components=n_components,
            random_state=self.random_state,
        ).fit(X)

    def fit(
        self, X: np.ndarray, y: Sequence[Any], sample_weight: np.ndarray | None = None
    ) -> ScalableSVC:
        """``sample_weight``: per-row multipliers of ``C``, as in ``LinearSVC.fit``."""
        X = np.asarray(X, dtype=np.float32)
        feature_map = self._make_map(X)
        return self._fit_mapped(
            self._apply(feature_map, X), y, feature_map, X.shape[1], sample_weight
        )

    def _fit_mapped(
        self,
        Z: np.ndarray,
        y: Sequence[Any],
        feature_map: Nystroem | None,
        n_features: int,
        sample_weight: np.ndarray | None = None,
    ) -> ScalableSVC:
        """Fit the linear solver on already mapped rows ``Z`` (shared by a search's C values)."""
        self.map_ = feature_map
        self.gamma_ = None if feature_map is None else float(feature_map.gamma)
        with warnings.catch_warnings():
            # liblinear stopping at max_iter is reported as the fit's n_iter_, not per warning
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.linear_ = fit_weighted(
                linear_svm(self.C, self.kernel, self.class_weight, self.random_state),
                Z,
                np.asarray(y),
                sample_weight,
            )
        self.classes_ = self.linear_.classes_
        self.n_features_in_ = n_features
        return self

    @staticmethod
    def _apply(feature_map: Nystroem | None, X: np.ndarray) -> np.ndarray:
        if feature_map is None:
            return X
        parts = [
            feature_map.transform(X[start : start + PREDICT_BLOCK_ROWS * 4])
            for start in range(0, len(X), PREDICT_BLOCK_ROWS * 4)
        ]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _mapped(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "linear_")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"expected {self.n_features_in_} features per row, got array of shape {X.shape}"
            )
        return self._apply(self.map_, X)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.linear_.decision_function(self._mapped(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.linear_.predict(self._mapped(X))


def make_svm_pipeline(
    kernel: str = "rbf",
    C: float = 1.0,
    gamma: str | float = "scale",
    class_weight: str | Mapping[str, float] | None = None,
    seed: int = 0,
    gram_mb: float = DEFAULT_GRAM_MB,
    solver: str = "exact",
    n_components: int = DEFAULT_N_COMPONENTS,
) -> Pipeline:
    """StandardScaler followed by an SVM (decision scores, no Platt scaling).

    Scaling matters: CNN activations have very different ranges per unit, and both the RBF
    kernel and the C penalty assume comparable feature scales. ``solver="exact"``: the SVM is
    :class:`GramSVC` (libsvm's SVC with BLAS-computed kernels, one-vs-one); ``"scalable"``:
    :class:`ScalableSVC` (primal linear SVM, Nystroem map for rbf, one-vs-rest). Either way the
    step is named ``svm`` and takes ``kernel``, ``C``, ``gamma``.
    """
    if solver == "exact":
        svm: BaseEstimator = GramSVC(
            kernel=kernel, C=C, gamma=gamma, class_weight=class_weight, random_state=seed,
            gram_mb=gram_mb,
        )
    elif solver == "scalable":
        svm = ScalableSVC(
            kernel=kernel, C=C, gamma=gamma, class_weight=class_weight, random_state=seed,
            n_components=n_components,
        )
    else:
        raise LeukotypeError(
            f"make_svm_pipeline needs a resolved solver (exact or scalable), got {solver!r}; "
            "choose_solver resolves 'auto'"
        )
    # The scaler keeps float32 input float32: the scalable path's copies stay half the size.
    return Pipeline([("scale", StandardScaler()), ("svm", svm)])


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


def _candidate_estimator(
    candidate: Mapping[str, Any], class_weight, seed: int, gram_mb: float
) -> GramSVC:
    params = {k.removeprefix("svm__"): v for k, v in candidate.items()}
    return GramSVC(class_weight=class_weight, random_state=seed, gram_mb=gram_mb, **params)


def _score_fold(
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    candidates: Sequence[Mapping[str, Any]],
    class_weight,
    seed: int,
    scorer,
    gram_mb: float = DEFAULT_GRAM_MB,
    classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validation score and fit seconds of every candidate on one inner fold, and (with
    ``classes``) each candidate's decision scores of the validation rows (:func:`_fold_decisions`).

    The fold's scaler is fitted on its training rows only (as a Pipeline would); the linear Gram
    matrices are computed once and shared by all candidates, which is what makes the search
    cheap: each candidate only transforms them elementwise and runs libsvm's solver.
    """
    scaler = StandardScaler().fit(X_fit)
    A = scaler.transform(X_fit).astype(np.float64)
    B = scaler.transform(X_val).astype(np.float64)
    scores = np.empty(len(candidates))
    seconds = np.empty(len(candidates))
    decisions = _fold_decisions(len(candidates), len(B), classes, y_fit)
    if not gram_fits(len(A), gram_mb):  # too big to share: each SVC computes its own kernels
        for i, candidate in enumerate(candidates):
            started = time.perf_counter()
            model = _candidate_estimator(candidate, class_weight, seed, gram_mb).fit(A, y_fit)
            seconds[i] = time.perf_counter() - started
            scores[i] = scorer(model, B, y_val)
            if decisions is not None:
                decisions[i] = decision_scores(model, B, classes)
        return scores, seconds, decisions
    gram_fit, sq_fit, _ = gram_matrix(A, A)
    gram_val, sq_val, _ = gram_matrix(B, A)
    for i, candidate in enumerate(candidates):
        started = time.perf_counter()
        model = _candidate_estimator(candidate, class_weight, seed, gram_mb)
        model._fit_gram(gram_fit, sq_fit, A, y_fit)
        seconds[i] = time.perf_counter() - started
        K_val = model._kernel(gram_val, sq_val, sq_fit)
        scores[i] = scorer(model.svc_, K_val, y_val)
        if decisions is not None:
            decisions[i] = decision_scores(model.svc_, K_val, classes)
    return scores, seconds, decisions


def _fold_decisions(
    n_candidates: int, n_val: int, classes: Sequence[str] | None, y_fit: np.ndarray
) -> np.ndarray | None:
    """Room for every candidate's (n_val, K) validation decision scores, columns in
    ``classes`` order; None when not asked for or when the fold's training rows lack a class
    (its models could not score every class)."""
    if classes is None or len(np.unique(y_fit)) != len(classes):
        return None
    return np.empty((n_candidates, n_val, len(classes)))


def _score_fold_scalable(
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    candidates: Sequence[Mapping[str, Any]],
    class_weight,
    seed: int,
    scorer,
    n_components: int = DEFAULT_N_COMPONENTS,
    classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`_score_fold` for the scalable path: the fold's scaler and each (kernel, gamma)'s
    feature map (Nystroem, or none for linear) are fitted once on the fold's training rows and
    shared by every C; ``seconds`` of a candidate = its share of the map plus its solver."""
    scaler = StandardScaler().fit(X_fit)
    A = scaler.transform(X_fit).astype(np.float32, copy=False)
    B = scaler.transform(X_val).astype(np.float32, copy=False)
    scores = np.empty(len(candidates))
    seconds = np.empty(len(candidates))
    decisions = _fold_decisions(len(candidates), len(B), classes, y_fit)
    by_map: dict[tuple[str, Any], list[int]] = {}
    for i, candidate in enumerate(candidates):
        gamma = candidate.get("svm__gamma", "") if candidate["svm__kernel"] != "linear" else ""
        by_map.setdefault((candidate["svm__kernel"], gamma), []).append(i)
    for (kernel, gamma), members in by_map.items():
        started = time.perf_counter()
        template = ScalableSVC(
            kernel=kernel, gamma=gamma or "scale", class_weight=class_weight, random_state=seed,
            n_components=n_components,
        )
        feature_map = template._make_map(A)
        Z_fit, Z_val = ScalableSVC._apply(feature_map, A), ScalableSVC._apply(feature_map, B)
        map_seconds = (time.perf_counter() - started) / len(members)
        for i in members:
            started = time.perf_counter()
            model = template.set_params(C=candidates[i]["svm__C"])
            model._fit_mapped(Z_fit, y_fit, feature_map, A.shape[1])
            seconds[i] = time.perf_counter() - started + map_seconds
            scores[i] = scorer(model.linear_, Z_val, y_val)
            if decisions is not None:
                decisions[i] = decision_scores(model.linear_, Z_val, classes)
        del Z_fit, Z_val
    return scores, seconds, decisions


def _score_task(
    X: np.ndarray,
    y: np.ndarray,
    fit_rows: np.ndarray,
    val_rows: np.ndarray,
    candidates: Sequence[Mapping[str, Any]],
    class_weight,
    seed: int,
    scorer,
    n_components: int,
    classes: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One unit of the scalable search: the candidates of one feature map on one inner fold
    (:func:`_score_fold_scalable`), with one BLAS thread (the search's processes are its
    parallelism)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _score_fold_scalable(
            X[fit_rows], y[fit_rows], X[val_rows], y[val_rows],
            candidates, class_weight, seed, scorer, n_components, classes,
        )


def _score_scalable_search(
    X: np.ndarray,
    y: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    candidates: Sequence[Mapping[str, Any]],
    class_weight,
    seed: int,
    scorer,
    n_components: int,
    classes: Sequence[str] | None,
    n_jobs: int,
    scores: np.ndarray,
    seconds: np.ndarray,
    decisions: np.ndarray | None,
) -> tuple[int, bool]:
    """Score every candidate on every inner fold of the scalable path, filling ``scores``,
    ``seconds`` (candidates x folds) and ``decisions`` in place; returns the processes used
    and whether every fold's models scored every class (else ``decisions`` is incomplete).

    The units are (inner fold, feature map): a map (Nystroem per gamma, none for linear) is
    shared by its C values, as in the one-process search. With ``n_jobs`` > 1 they run in
    ``n_jobs`` separate processes (joblib's loky), rbf maps first as they cost most. Processes,
    not threads: liblinear draws from one process-global random generator that every fit
    reseeds from its ``random_state`` (scikit-learn's ``_fit_liblinear``), so fits running
    side by side in one process would interleave their draws; in separate processes each fit
    sees only its own sequence and the search chooses the same model with the same scores.
    """
    groups: dict[tuple[str, Any], list[int]] = {}
    for i, candidate in enumerate(candidates):
        kernel = candidate["svm__kernel"]
        groups.setdefault((kernel, candidate.get("svm__gamma", "") if kernel != "linear" else ""),
                          []).append(i)
    units = [(k, members) for (kernel, _), members in sorted(
        groups.items(), key=lambda item: item[0][0] == "linear") for k in range(len(folds))]
    workers = max(1, min(int(n_jobs), len(units)))
    jobs = (
        delayed(_score_task)(
            X, y, folds[k][0], folds[k][1], [candidates[i] for i in members],
            class_weight, seed, scorer, n_components, classes,
        )
        for k, members in units
    )
    if workers == 1:
        results = [job[0](*job[1], **job[2]) for job in jobs]
    else:
        results = Parallel(n_jobs=workers, backend="loky", batch_size=1)(jobs)
    decided = True
    for (k, members), (unit_scores, unit_seconds, unit_decisions) in zip(units, results):
        scores[members, k] = unit_scores
        seconds[members, k] = unit_seconds
        decided = decided and unit_decisions is not None
        if decisions is not None and unit_decisions is not None:
            decisions[np.ix_(members, folds[k][1])] = unit_decisions
    return workers, decided


def _cv_results_frame(
    candidates: Sequence[Mapping[str, Any]], scores: np.ndarray, seconds: np.ndarray, scoring: str
) -> pd.DataFrame:
    """One row per candidate: its fold scores, mean, std and rank (GridSearchCV's conventions:
    rank 1 is best, ties share the lower rank, the first best candidate is selected)."""
    mean = scores.mean(axis=1)
    rank = rankdata(-np.round(mean, 12), method="min").astype(int)
    frame = pd.DataFrame(
        {
            "kernel": [c["svm__kernel"] for c in candidates],
            "C": [c["svm__C"] for c in candidates],
            "gamma": [c.get("svm__gamma", "") for c in candidates],
            "mean_test_score": mean,
            "std_test_score": scores.std(axis=1),
            "rank_test_score": rank,
            "mean_fit_time": seconds.mean(axis=1),
        }
    )
    for k in range(scores.shape[1]):
        frame[f"split{k}_test_score"] = scores[:, k]
    frame["n_splits"] = scores.shape[1]
    frame["scoring"] = scoring
    frame["selected"] = np.arange(len(frame)) == int(np.argmin(rank))
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
    gram_mb: float = DEFAULT_GRAM_MB,
    solver: str = "auto",
    n_components: int = DEFAULT_N_COMPONENTS,
    out_of_fold: dict[str, Any] | None = None,
) -> tuple[Pipeline, pd.DataFrame]:
    """Choose kernel, C (and gamma) by grouped grid search on the training rows, then refit.

    ``X, y, groups`` are the TRAINING part only (test rows never take part in model selection).
    Training rows include rotated copies of each image; inner folds are split by ``groups``
    (patient / duplicate group, so also by image) because a rotated copy of a validation image
    in the inner training fold would let the search reward memorisation and pick an overfitting
    C/gamma. ``StratifiedGroupKFold`` keeps class proportions as far as groups allow. The best
    setting is refitted on all training rows. Returns the fitted pipeline and one row per
    candidate setting with its fold scores (``selected`` marks the chosen one).

    Each inner fold's kernel matrix is computed once (BLAS) and shared by all candidates while
    it fits in ``gram_mb`` MiB (the search holds about two such matrices); above that every
    candidate's SVC computes its own kernels. ``n_jobs`` = BLAS threads.

    ``solver`` (:data:`SOLVERS`) picks the SVM by problem size (:func:`choose_solver` on the
    training rows and ``gram_mb``): ``exact`` as above; ``scalable`` = :class:`ScalableSVC`
    (primal linear SVM; rbf through a Nystroem map of ``n_components`` landmarks), searched on
    the same grouped inner folds with each fold's map shared by every C. The returned frame
    records ``solver``, ``solver_reason``, ``kernel_budget_mb`` and ``n_components``.

    ``out_of_fold``: a dict that, after a search, receives ``scores`` (N, K): the selected
    setting's decision scores of every training row from the inner fold's model that did not
    see its group, columns in ``classes`` (sorted labels) order, and ``cv_folds``/``seed`` of
    those folds. They are exactly what refitting the selected setting on the same inner folds
    gives (``calibration.out_of_fold_svm_scores``), which the SVM's calibration then need not
    redo. Left empty when nothing was searched or an inner fold lacked a class.
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
    resolved, reason = choose_solver(solver, len(X), gram_mb)
    if resolved == "scalable":
        unsupported = sorted({c["svm__kernel"] for c in candidates} - set(SCALABLE_KERNELS))
        if unsupported:
            raise LeukotypeError(
                f"the scalable SVM solver supports kernels {list(SCALABLE_KERNELS)}, the grid "
                f"has {unsupported} ({reason}); drop them or set svm.solver: exact"
            )
    LOGGER.info("SVM solver: %s (%s)", resolved, reason)
    solver_columns = {
        "solver": resolved,
        "solver_reason": reason,
        "kernel_budget_mb": round(float(gram_mb), 1),
        "n_components": int(n_components) if resolved == "scalable" else 0,
    }

    def new_pipeline() -> Pipeline:
        return make_svm_pipeline(
            class_weight=class_weight, seed=seed, gram_mb=gram_mb, solver=resolved,
            n_components=n_components,
        )

    if len(candidates) == 1:
        # Nothing to choose: no inner cross-validation, so no minimum number of groups either.
        pipeline = new_pipeline()
        pipeline.set_params(**candidates[0])
        with threadpool_limits(limits=max(1, int(n_jobs)), user_api="blas"):
            pipeline.fit(X, y)
        LOGGER.info("SVM with the single configured setting %s (no search)", candidates[0])
        only = {k.removeprefix("svm__"): v for k, v in candidates[0].items()}
        frame = pd.DataFrame([{"kernel": only["kernel"], "C": only["C"], "gamma": only.get("gamma", ""),
                               "n_splits": 0, "scoring": scoring, "selected": True,
                               "n_jobs": 1, **solver_columns}])
        return pipeline, frame
    splitter = make_inner_cv(y, groups, cv_folds=cv_folds, seed=seed)
    scorer = get_scorer(scoring)
    folds = list(splitter.split(X, y, groups))
    scores = np.empty((len(candidates), len(folds)))
    seconds = np.empty_like(scores)
    classes = [str(c) for c in np.unique(y)] if out_of_fold is not None else None
    decisions = (
        np.full((len(candidates), len(X), len(classes)), np.nan) if classes else None
    )
    if resolved == "scalable":
        workers, decided = _score_scalable_search(
            X, y, folds, candidates, class_weight, seed, scorer, n_components, classes,
            n_jobs, scores, seconds, decisions,
        )
        if not decided:
            decisions = None  # an inner fold's models could not score every class
    else:
        workers = 1
    with threadpool_limits(limits=max(1, int(n_jobs)), user_api="blas"):
        for k, (fit_rows, val_rows) in enumerate(folds if resolved == "exact" else []):
            scores[:, k], seconds[:, k], fold_decisions = _score_fold(
                X[fit_rows], y[fit_rows], X[val_rows], y[val_rows],
                candidates, class_weight, seed, scorer, gram_mb, classes,
            )
            if decisions is not None and fold_decisions is None:
                decisions = None  # a fold's models could not score every class
            if decisions is not None:
                decisions[:, val_rows] = fold_decisions
        frame = _cv_results_frame(candidates, scores, seconds, scoring)
        for column, value in solver_columns.items():
            frame[column] = value
        frame["n_jobs"] = int(workers)
        selected = int(np.flatnonzero(frame["selected"])[0])
        best = candidates[selected]
        if out_of_fold is not None and decisions is not None:
            out_of_fold.update(scores=decisions[selected], classes=classes,
                               cv_folds=int(cv_folds), seed=int(seed))
        pipeline = new_pipeline()
        pipeline.set_params(**best)
        pipeline.fit(X, y)
    LOGGER.info(
        "SVM grid search selected %s (%s %.4f)",
        best,
        scoring,
        frame.loc[frame["selected"], "mean_test_score"].item(),
    )
    return pipeline, frame


# --------------------------------------------------------------------------------------------
# model files


#: scikit-learn's torch adapter for its array-API dispatch; importing it imports torch.
_SKLEARN_TORCH_ADAPTER = "sklearn.externals.array_api_compat.torch"


def _skops_io() -> types.ModuleType:
    """``skops.io``, imported without importing torch.

    Importing ``skops.io`` lists scikit-learn's estimators (``sklearn.utils.all_estimators``),
    whose ``pkgutil.walk_packages`` imports every subpackage of scikit-learn, its torch adapter
    too, and so torch: 2.5 s in every job that saves or loads an SVM and needs no torch
    (bench/results/job_imports.csv: 3.58 s plainly, 1.04 s so, beyond ``leukotype.classify``). While ``skops.io`` is imported the adapter is a stub without
    ``__path__`` (so the walk neither imports torch nor descends into it; it lists no
    estimators); the stub is removed afterwards, so a later import of the adapter is the real one.
    """
    if "skops.io" not in sys.modules and _SKLEARN_TORCH_ADAPTER not in sys.modules and "torch" not in sys.modules:
        stub = types.ModuleType(_SKLEARN_TORCH_ADAPTER)
        sys.modules[_SKLEARN_TORCH_ADAPTER] = stub
        try:
            import skops.io
        finally:
            if sys.modules.get(_SKLEARN_TORCH_ADAPTER) is stub:
                del sys.modules[_SKLEARN_TORCH_ADAPTER]
    import skops.io

    return skops.io


def save_model(pipeline: Pipeline, path: str | os.PathLike) -> None:
    """Write a fitted pipeline with skops (no pickle), atomically."""
    skops_io = _skops_io()  # lazily: importing it walks all of scikit-learn (seconds)
    with atomic_path(path) as tmp:
        skops_io.dump(pipeline, tmp)


def load_model(
    path: str | os.PathLike, allowed_types: frozenset[str] = ALLOWED_MODEL_TYPES
) -> Pipeline:
    """Load a pipeline written by :func:`save_model`, refusing files that name unexpected types.

    skops lists the types in the file it does not trust by default; each must be in
    ``allowed_types`` or the file is rejected before anything in it is constructed.
    """
    skops_io = _skops_io()
    path = Path(path)
    if not path.is_file():
        raise LeukotypeError(f"model file {path} does not exist; run the SVM training step first")
    try:
        untrusted = skops_io.get_untrusted_types(file=path)
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
    return skops_io.load(path, trusted=list(untrusted))


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

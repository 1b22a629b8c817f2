"""SVM grid search: leukotype's shared-Gram search vs scikit-learn's GridSearchCV over an SVC.

Same data, same grid (kernel linear/rbf x C 0.1/1/10, gamma ``scale``), same grouped inner
folds (3), in one process: the baseline is ``GridSearchCV(Pipeline([StandardScaler, SVC]))``,
which refits the scaler per fold and lets libsvm evaluate every kernel value itself; the
project's :func:`leukotype.classify.fit_svm` computes each fold's Gram matrix once with BLAS and
shares it across candidates. Rows record both times, the speed-up, whether the two chose the
same setting, the largest difference of their inner-CV scores, and the share of test
predictions on which the refitted models agree.

The features are synthetic (class-structured, non-negative like ReLU outputs, 4 correlated rows
per image as with rotations) at the paper's scale: 633 images -> 475 training images x 4
transforms = 1900 training rows.

    python bench/svm_search.py                   # 1900 rows, dims 2048 and 4096
    python bench/svm_search.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "svm_search"
GRID = {"kernel": ["linear", "rbf"], "C": [0.1, 1, 10], "gamma": ["scale"]}


def features(n_rows: int, dim: int, n_classes: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_images = n_rows // 4
    labels = rng.integers(0, n_classes, n_images)
    centres = rng.normal(size=(n_classes, dim))
    images = centres[labels] * 0.15 + rng.normal(size=(n_images, dim))
    rows = np.repeat(images, 4, axis=0) + 0.3 * rng.normal(size=(n_images * 4, dim))
    y = np.repeat(np.array([f"c{k}" for k in range(n_classes)])[labels], 4)
    groups = np.repeat(np.arange(n_images).astype(str), 4)
    return np.maximum(rows, 0).astype(np.float32), y, groups


def main(argv: list[str] | None = None):
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    from threadpoolctl import threadpool_limits

    from leukotype.classify import build_param_grid, fit_svm, make_inner_cv

    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1900)
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 4096])
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.dims = 200, [256]
    rows = []
    for dim in args.dims:
        X, y, groups = features(args.rows, dim)
        test = features(400 if not args.quick else 40, dim, seed=1)[0]
        with threadpool_limits(limits=args.threads, user_api="blas"):
            ours = {}
            seconds_ours = common.timed(
                lambda: ours.update(zip(("model", "cv"), fit_svm(
                    X, y, groups, GRID, cv_folds=3, seed=0, n_jobs=args.threads))))
            search = GridSearchCV(
                Pipeline([("scale", StandardScaler()), ("svm", SVC(random_state=0))]),
                build_param_grid(GRID), cv=make_inner_cv(y, groups, 3, seed=0),
                scoring="accuracy", n_jobs=1,
            )
            seconds_sklearn = common.timed(lambda: search.fit(X, y, groups=groups))
        cv = ours["cv"]
        chosen = cv.loc[cv["selected"], ["kernel", "C"]].iloc[0].to_dict()
        base = {k.removeprefix("svm__"): v for k, v in search.best_params_.items()}
        rows.append({
            "benchmark": NAME, "measurement": "grid_search", "rows": args.rows, "dim": dim,
            "candidates": len(cv), "inner_folds": 3, "threads": args.threads,
            "seconds": seconds_ours, "seconds_baseline": seconds_sklearn,
            "speedup": seconds_sklearn / seconds_ours,
            "same_choice": chosen["kernel"] == base["kernel"] and chosen["C"] == base["C"],
            "max_cv_score_diff": float(np.abs(cv["mean_test_score"].to_numpy()
                                              - search.cv_results_["mean_test_score"]).max()),
            "prediction_agreement": float((ours["model"].predict(test)
                                           == search.best_estimator_.predict(test)).mean()),
            "load_avg_1m": common.load_avg(),
        })
        print(f"[{NAME}] dim {dim}: {seconds_ours:.1f} s vs {seconds_sklearn:.1f} s", flush=True)
    path = common.write_results(rows, NAME, args.out)
    common.print_table(rows, ["rows", "dim", "seconds", "seconds_baseline", "speedup",
                              "same_choice", "max_cv_score_diff", "prediction_agreement"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()

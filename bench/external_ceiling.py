"""What limits the PBC -> JTSC accuracy: how well the same features do when JTSC's own cells train.

The goal of issue 10 asks a PBC-trained model to score on JTSC within 10 points of its PBC
accuracy (about 91 % -> at least ~81 %). This script measures, with the same images, recipes,
ImageNet features (EfficientNet-Lite0) and SVM (the workflow's grouped grid search) as
``bench/external_recipes.py`` / ``bench/external_adaptation.py``, how far JTSC's *own labels*
take those features -- a diagnostic of the target, never a recipe: the workflow never trains on
an external set.

Experiments (rows of ``bench/results/external_ceiling.csv``), per recipe:

- ``in_domain_cv``: JTSC alone, 5-fold stratified cross-validation repeated with 5 seeds (each
  image a test image once per repeat; its duplicate pair kept in one fold). The accuracy that
  these features reach on JTSC's labels with 239 training cells: if it is below the goal, no
  adaptation of a PBC-trained model can be expected to reach the goal, and the gap is in the
  labels and images, not in the lab shift.
- ``pbc_plus_k``: the PBC training part plus ``k`` labelled JTSC cells per class drawn from the
  ``select`` half (the halves of ``external_adaptation.py``: seed 0, stratified), scored on the
  ``report`` half. ``k = 0`` is the PBC-only model; the curve says how many of its own cells a
  lab would need to label.
- ``jtsc_half``: the ``select`` half alone (no PBC), scored on the ``report`` half: in-domain
  on the same test cells as ``pbc_plus_k``.

    .venv/bin/python bench/external_ceiling.py                 # ~5 min on 2 cores (features cached)
    .venv/bin/python bench/external_ceiling.py --recipes crop15_wb_grey
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

sys.path.insert(0, str(Path(__file__).resolve().parent))
import external_adaptation as ea  # noqa: E402
import external_recipes as er  # noqa: E402
from common import machine_info  # noqa: E402

from leukotype.split import merge_duplicate_groups  # noqa: E402

RECIPES = ("none", "crop15_wb", "crop15_wb_grey", "crop15_wb_grey_stretch")
SHOTS = (0, 5, 10, 20)
FOLDS, REPEATS = 5, 5
SEED = er.SEED


def recalls(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {c: round(float(np.mean(p[y == c] == c)), 3) for c in er.EXTERNAL_CLASSES}


def row(experiment: str, recipe: str, y: np.ndarray, p: np.ndarray, n_boot: int, **extra: Any) -> dict[str, Any]:
    return {"experiment": experiment, "recipe": recipe, **extra, "n_test": len(y),
            **ea.scores(y, p, n_boot), "recall": json.dumps(recalls(y, p))}


def fit(X_train, y_train, g_train) -> tuple[Any, str]:
    """:func:`external_recipes.fit_search_svm`, its setting named as the other rows name it."""
    pipeline, setting = er.fit_search_svm(X_train, y_train, g_train)
    return pipeline, f"svm {setting}"


def in_domain_cv(recipe: str, X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_boot: int) -> dict[str, Any]:
    """JTSC alone, repeated grouped stratified k-fold; scores of the first repeat's out-of-fold
    predictions with bootstrap CIs, and the spread of accuracy over the repeats."""
    per_repeat, first = [], None
    for repeat in range(REPEATS):
        pred = np.empty(len(y), dtype=object)
        folds = StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=repeat)
        for train, test in folds.split(X, y, groups):
            pred[test] = fit(X[train], y[train], groups[train])[0].predict(X[test])
        per_repeat.append((float(np.mean(pred == y)), ea.balanced_accuracy(y, pred)))
        first = pred if first is None else first
    accs, bals = np.array(per_repeat).T
    return row("in_domain_cv", recipe, y, first.astype(str), n_boot, train="JTSC (other folds)",
               k_per_class="", n_train_rows=int(round(len(y) * (FOLDS - 1) / FOLDS)),
               classifier=f"{FOLDS}-fold x {REPEATS} repeats",
               repeats_accuracy_mean=float(accs.mean()), repeats_accuracy_min=float(accs.min()),
               repeats_accuracy_max=float(accs.max()), repeats_balanced_accuracy_mean=float(bals.mean()))


def shots(select_rows: np.ndarray, y: np.ndarray, k: int, seed: int = SEED) -> np.ndarray:
    """``k`` rows per class from ``select_rows`` (all of a class that has fewer), seeded."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(select_rows[y[select_rows] == c])[:k] for c in er.EXTERNAL_CLASSES]
    return np.sort(np.concatenate(picked)).astype(int)


def main(argv: list[str] | None = None) -> int:
    args, names = er.parse_choices(__doc__, argv, "external_ceiling.csv", "recipes", list(RECIPES))
    start = time.perf_counter()
    data = er.load_data(args.data, args.cache)
    data["select"] = ea.select_halves(data["ext"]["label"].to_numpy(), seed=0)
    extractor = er.Extractor(args.cache, args.threads)
    ext, pbc = data["ext"], data["pbc"]
    y_ext, y_pbc = ext["label"].to_numpy(), pbc["label"].to_numpy()
    g_ext = np.asarray([f"ext:{g}" for g in merge_duplicate_groups(ext["image_id"].tolist(), ext["md5"].tolist())])
    tr, te = ~data["is_test"], data["is_test"]
    select_rows, report = np.flatnonzero(data["select"]), ~data["select"]
    rows: list[dict[str, Any]] = []
    previous = pd.read_csv(args.out) if args.append and args.out.exists() else None
    for recipe in names:
        processed, _ = ea.prepared(data, recipe)
        features = extractor(processed).astype(np.float64)
        X_pbc, X_ext = features[: len(pbc)], features[len(pbc):]
        new = [in_domain_cv(recipe, X_ext, y_ext, g_ext, args.n_boot)]
        for k in SHOTS:
            add = shots(select_rows, y_ext, k)
            X_train = np.concatenate([X_pbc[tr], X_ext[add]])
            y_train = np.concatenate([y_pbc[tr], y_ext[add]])
            g_train = np.concatenate([data["groups"][tr], g_ext[add]])
            model, clf = fit(X_train, y_train, g_train)
            p_report = model.predict(X_ext[report])
            extra = {"internal_accuracy": float(np.mean(model.predict(X_pbc[te]) == y_pbc[te]))}
            new.append(row("pbc_plus_k", recipe, y_ext[report], p_report, args.n_boot, train="PBC training part + k JTSC select-half cells per class",
                           k_per_class=k, n_train_rows=len(y_train), classifier=clf, **extra))
        model, clf = fit(X_ext[select_rows], y_ext[select_rows], g_ext[select_rows])
        p_half = model.predict(X_ext[report])
        new.append(row("jtsc_half", recipe, y_ext[report], p_half, args.n_boot, train="JTSC select half",
                       k_per_class="", n_train_rows=len(select_rows), classifier=clf))
        for r in new:
            r.update(machine_info())
            print(f"{recipe:24s} {r['experiment']:14s} k={r['k_per_class']!s:3s} acc {r['accuracy']:.3f} "
                  f"({r['accuracy_ci_low']:.3f}-{r['accuracy_ci_high']:.3f}) bal {r['balanced_accuracy']:.3f} {r['recall']}",
                  flush=True)
        rows.extend(new)
        table = pd.DataFrame(rows)
        if previous is not None:
            table = pd.concat([previous[~previous["recipe"].isin(table["recipe"])], table], ignore_index=True)
        tmp = args.out.with_suffix(".csv.tmp")
        table.to_csv(tmp, index=False)
        tmp.replace(args.out)
    print(f"written {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

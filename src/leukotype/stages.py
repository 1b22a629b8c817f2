"""One function per workflow stage: paths and plain config in, files out.

Workflow scripts call these (and nothing else), so every stage is testable without Snakemake.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from leukotype.config import task_from_dict
from leukotype.errors import LeukotypeError
from leukotype.io import provenance, read_json, read_tsv, write_json, write_tsv

log = logging.getLogger("leukotype")

PathLike = str | Path


# ---------------------------------------------------------------------------------- data


def run_demo(out_manifest: PathLike, demo_cfg: Mapping[str, Any]) -> Path:
    from leukotype.demo import make_demo_dataset

    return make_demo_dataset(Path(out_manifest).parent, **demo_cfg)


def run_validation(
    dataset: PathLike,
    tasks_cfg: Sequence[Mapping[str, Any]],
    validation_cfg: Mapping[str, Any],
    out_table: PathLike,
    out_summary: PathLike,
    threads: int = 1,
) -> pd.DataFrame:
    from leukotype.dataset import read_dataset
    from leukotype.validate import check_class_counts, summarise_validation, validate_images

    tasks = [task_from_dict(t) for t in tasks_cfg]
    table = validate_images(
        read_dataset(dataset),
        tasks,
        min_side=validation_cfg["min_side"],
        max_pixels=validation_cfg["max_pixels"],
        threads=threads,
    )
    rejected = table[table["status"] != "ok"]
    for row in rejected.itertuples():
        log.warning("rejected %s: %s", row.path, row.reason)
    summary = summarise_validation(table)
    log.info("validation: %s", summary)
    # Fail before writing outputs: a class below the minimum must stop the run here.
    check_class_counts(table, tasks, validation_cfg["min_images_per_class"])
    write_tsv(table, out_table)
    write_json({"dataset": str(dataset), **summary, "provenance": provenance()}, out_summary)
    return table


def run_split(
    validated: PathLike, task_cfg: Mapping[str, Any], split_cfg: Mapping[str, Any], out: PathLike
) -> pd.DataFrame:
    from leukotype.split import check_no_leakage, make_split_table

    table = make_split_table(read_tsv(validated), task_from_dict(task_cfg), dict(split_cfg))
    check_no_leakage(table)
    write_tsv(table, out)
    return table


def run_augment(split: PathLike, augmentation_cfg: Mapping[str, Any], out: PathLike) -> pd.DataFrame:
    from leukotype.augment import augmented_samples, transforms_from_config

    samples = augmented_samples(read_tsv(split), transforms_from_config(augmentation_cfg))
    write_tsv(samples, out)
    return samples


# ------------------------------------------------------------------------------ features


def extraction_samples(validated: pd.DataFrame, augmentation_cfg: Mapping[str, Any]) -> pd.DataFrame:
    """Every valid image under every configured transform.

    A superset of what any split needs (test images are only read as `identity`), chosen so that
    extraction depends on validation and augmentation alone: re-splitting, new folds or new
    tasks never re-extract.
    """
    from leukotype.augment import transforms_from_config

    ok = validated[validated["status"] == "ok"][["image_id", "abspath"]]
    transforms = transforms_from_config(augmentation_cfg)
    rows = ok.merge(pd.DataFrame({"transform": transforms}), how="cross")
    return rows.sort_values(["image_id", "transform"], kind="stable").reset_index(drop=True)


def run_extract(
    validated: PathLike,
    backbone: str,
    layers: Sequence[str],
    weights: str,
    sha256: str | None,
    torch_home: str | None,
    augmentation_cfg: Mapping[str, Any],
    features_cfg: Mapping[str, Any],
    out_dir: PathLike,
    threads: int = 1,
) -> None:
    from leukotype.features import extract_features
    from leukotype.weights import resolve_weights

    samples = extraction_samples(read_tsv(validated), augmentation_cfg)
    weights_path = resolve_weights(backbone, weights, sha256=sha256, torch_home=torch_home)
    log.info("extracting %s %s for %d samples (weights: %s)", backbone, list(layers), len(samples), weights_path)
    extract_features(
        samples,
        backbone,
        weights_path,
        list(layers),
        out_dir,
        batch_size=features_cfg["batch_size"],
        num_workers=features_cfg["num_workers"],
        device=features_cfg["device"],
        threads=threads,
        precision=features_cfg["precision"],
    )


# ---------------------------------------------------------------------------- classifier


def fold_parts(samples: pd.DataFrame, fold: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training rows (every transform) and test rows (identity only) of one fold."""
    rows = samples[samples["fold"] == fold]
    if rows.empty:
        raise LeukotypeError(f"fold {fold!r} not found; folds present: {sorted(samples['fold'].unique())}")
    train = rows[rows["part"] == "train"].reset_index(drop=True)
    test = rows[(rows["part"] == "test") & (rows["transform"] == "identity")].reset_index(drop=True)
    return train, test


def run_svm(
    samples: PathLike,
    task_cfg: Mapping[str, Any],
    fold: str,
    feature_dirs: Sequence[PathLike],
    layer: str,
    svm_cfg: Mapping[str, Any],
    out_model: PathLike,
    out_predictions: PathLike,
    out_cv: PathLike,
    seed: int = 0,
    threads: int = 1,
) -> pd.DataFrame:
    from leukotype.classify import fit_svm, predict_table, save_model
    from leukotype.features import load_features

    task = task_from_dict(task_cfg)
    train, test = fold_parts(read_tsv(samples), fold)
    dirs = [Path(d) for d in feature_dirs]
    X_train = load_features(dirs, layer, train[["image_id", "transform"]])
    X_test = load_features(dirs, layer, test[["image_id", "transform"]])
    grid = {k: svm_cfg[k] for k in ("C", "kernel", "gamma")}
    pipeline, cv_results = fit_svm(
        X_train,
        train["label"].to_numpy(),
        train["group"].to_numpy(),
        grid,
        cv_folds=svm_cfg["cv_folds"],
        class_weight=svm_cfg["class_weight"],
        seed=seed,
        n_jobs=threads,
    )
    log.info("SVM chosen: %s", pipeline.named_steps)
    save_model(pipeline, out_model)
    write_tsv(cv_results, out_cv)
    predictions = predict_table(pipeline, X_test, test, list(task.classes))
    write_tsv(predictions, out_predictions)
    return predictions


# ----------------------------------------------------------------------------- evaluation


def run_evaluate(
    predictions: PathLike,
    task_cfg: Mapping[str, Any],
    meta: Mapping[str, Any],
    evaluation_cfg: Mapping[str, Any],
    out_metrics: PathLike,
    out_confusion: PathLike,
    out_confusion_png: PathLike,
) -> dict[str, Any]:
    from leukotype.metrics import confusion_csv, evaluate_predictions
    from leukotype.report import plot_confusion

    task = task_from_dict(task_cfg)
    record = evaluate_predictions(
        read_tsv(predictions),
        list(task.classes),
        dict(meta),
        n_boot=evaluation_cfg["n_bootstrap"],
        seed=evaluation_cfg["seed"],
    )
    write_json(record, out_metrics)
    confusion_csv(record, out_confusion)
    plot_confusion(record, out_confusion_png)
    return record


def run_summarise(
    metrics: Sequence[PathLike],
    task_cfg: Mapping[str, Any],
    out_csv: PathLike,
    out_accuracy_png: PathLike,
    out_confusion_png: PathLike,
) -> pd.DataFrame:
    from leukotype.metrics import fold_summary
    from leukotype.report import paper_table, plot_accuracy, plot_confusion_grid, write_tables

    task = task_from_dict(task_cfg)
    records = [read_json(p) for p in metrics]
    summary = fold_summary(records)
    table = paper_table(summary, task.name)
    write_tables(table, Path(out_csv).with_suffix(""))
    plot_accuracy(summary, task.name, out_accuracy_png)
    plot_confusion_grid(records, task.name, out_confusion_png)
    return table


def run_collect(
    metrics: Sequence[PathLike],
    validation_summary: PathLike,
    config: Mapping[str, Any],
    out_runs: PathLike,
    out_study: PathLike,
) -> pd.DataFrame:
    rows = []
    for path in metrics:
        record = read_json(path)
        row = {k: record.get(k) for k in ("task", "strategy", "backbone", "layer", "fold", "weights", "n_test")}
        row.update(record["metrics"])
        for name, (lo, hi) in record.get("ci", {}).items():
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = lo, hi
        rows.append(row)
    runs = pd.DataFrame(rows)
    write_tsv(runs, out_runs)
    write_json(
        {
            "validation": read_json(validation_summary),
            "n_runs": len(rows),
            "provenance": provenance(config=dict(config), seed=config.get("split", {}).get("seed")),
        },
        out_study,
    )
    return runs

"""One function per workflow stage: paths and plain config in, files out.

Workflow scripts call these (and nothing else), so every stage is testable without Snakemake.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leukotype import catalog, paths
from leukotype.allocator import log_job_cpu
from leukotype.config import penultimate_layer
from leukotype.tasks import task_from_dict
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
    from leukotype.dataset import dataset_root, read_dataset
    from leukotype.validate import check_class_counts, summarise_validation, validate_images

    tasks = [task_from_dict(t) for t in tasks_cfg]
    table = validate_images(
        read_dataset(dataset),
        tasks,
        min_side=validation_cfg["min_side"],
        max_pixels=validation_cfg["max_pixels"],
        threads=threads,
        max_aspect_ratio=validation_cfg.get("max_aspect_ratio"),
        inside=None if validation_cfg.get("allow_outside_paths") else dataset_root(dataset),
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


def run_augment(
    split: PathLike,
    augmentation_cfg: Mapping[str, Any],
    out: PathLike,
    tta: bool = False,
    preprocessing: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The task's sample table; a ``preprocessing`` variant that draws colour views adds them
    to the training rows (``colour1..colourK``), recorded per sample like the rotations."""
    from leukotype.augment import augmented_samples, transforms_from_config
    from leukotype.preprocessing import Variant

    views = Variant.from_dict(preprocessing).view_transforms()
    samples = augmented_samples(read_tsv(split), transforms_from_config(augmentation_cfg), tta=tta, training_views=views)
    write_tsv(samples, out)
    return samples


# ------------------------------------------------------------------------------ features


def extraction_samples(
    validated: pd.DataFrame, augmentation_cfg: Mapping[str, Any], views: Sequence[str] = ()
) -> pd.DataFrame:
    """Every valid image under every configured transform (and a variant's colour ``views``).

    A superset of what any split needs (test images are only read as `identity`), chosen so that
    extraction depends on validation, augmentation and the variant alone: re-splitting, new
    folds or new tasks never re-extract.
    """
    from leukotype.augment import transforms_from_config

    ok = validated[validated["status"] == "ok"][["image_id", "abspath"]]
    transforms = transforms_from_config(augmentation_cfg) + list(views)
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
    memory_mb: float | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    preprocessing_files: Sequence[PathLike] = (),
    colour_views: bool = True,
) -> None:
    """Features of every valid image x transform; ``preprocessing`` (a variant, with its
    per-image tables and fitted state in ``preprocessing_files``) applies to every image.
    ``colour_views=False``: none of the variant's colour views (test images: its colour
    steps then leave every image as it is)."""
    from leukotype.features import extract_features
    from leukotype.memory import extraction_memory_parts, require_memory
    from leukotype.preprocessing import Variant
    from leukotype.weights import resolve_weights

    # Before any weight is loaded: stop with a message if the job's mem_mb cannot hold it.
    require_memory(
        "extract_features",
        extraction_memory_parts(backbone, features_cfg["batch_size"], features_cfg["num_workers"], features_cfg["precision"]),
        memory_mb,
        hint="or lower features.batch_size",
    )
    validated_table = read_tsv(validated)
    views = Variant.from_dict(preprocessing).view_transforms() if colour_views else []
    samples = extraction_samples(validated_table, augmentation_cfg, views)
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
        optimize=features_cfg["optimize"],
        adapt_batchnorm=features_cfg.get("adapt_batchnorm", False),
        prepare=job_preparer(preprocessing, preprocessing_files, validated_table),
    )
    # whether the allocator settings held in this job process (a SLURM job's too) and its cost
    log_job_cpu(len(samples))


def job_preparer(
    preprocessing: Mapping[str, Any] | None, files: Sequence[PathLike], validated: pd.DataFrame
) -> Any:
    """A job's :class:`leukotype.preprocessing.ImagePreparer` (None for ``none``): its variant,
    per-image tables and fitted state, and the images' md5 (the key of colour views)."""
    from leukotype.preprocessing import preparer_for

    keys = dict(zip(validated["abspath"].astype(str), validated["md5"].astype(str))) if "md5" in validated else {}
    return preparer_for(preprocessing, [str(f) for f in files], keys)


# ------------------------------------------------------------------------ preprocessing data


def run_analyse_images(validated: PathLike, step_cfg: Mapping[str, Any], out_table: PathLike) -> pd.DataFrame:
    """A per-image step's table (crop boxes: ``images.tsv``) for every valid image; images it
    finds nothing in (no cell) are listed with the reason and logged."""
    from leukotype.preprocessing import analysis_table, step_from_dict

    step = step_from_dict(step_cfg)
    table = analysis_table(step, read_tsv(validated))
    missed = table[table["status"] != "found"]
    for row in missed.itertuples():
        log.warning("%s: nothing found in %s: %s (the image is used whole)", step.kind, row.path, row.reason)
    log.info("%s: found in %d of %d images", step.kind, len(table) - len(missed), len(table))
    write_tsv(table, out_table)
    return table


def run_fit_preprocessing(
    validated: PathLike,
    splits: Sequence[PathLike],
    preprocessing: Mapping[str, Any],
    analyses: Sequence[PathLike],
    seed: int,
    out_state: PathLike,
    reference: PathLike | None = None,
    validation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A variant's fitted states (stain reference) from at most ``reference_images`` training
    images that are never test images in any fold of any task's ``splits`` (a variant named
    ``<variant>.<fold>``, :func:`leukotype.paths.fold_fitted`: training images of that fold);
    or, when the variant names a ``reference_source`` (``reference``: the same path), from its
    images, validated under ``validation`` like new images, with any image whose bytes are a
    study image's refused (a study image would bring its test part in again)."""
    from leukotype.images import load_rgb
    from leukotype.preprocessing import Variant, fit_variant, read_analysis_table, reference_image_ids

    variant = Variant.from_dict(preprocessing)
    table = read_tsv(validated)
    if reference is None:
        fold = paths.split_fold_fitted(variant.name)[1]
        chosen = reference_image_ids([read_tsv(p) for p in splits], variant.reference_images, seed, fold=fold)
        abspaths = table.set_index("image_id").loc[chosen, "abspath"].astype(str).tolist()
        tables = {Path(p).parent.name: read_analysis_table(p) for p in analyses}
        used: dict[str, Any] = {"image_ids": chosen, **({"fold": fold} if fold else {})}
    else:
        if validation is None:
            raise LeukotypeError("a reference source is validated like new images: give the config's validation")
        reference_table = reference_images(reference, validation, table, variant.reference_images, seed)
        abspaths = reference_table["abspath"].tolist()
        tables = {}  # per-image rows (crop boxes) are computed from each reference image
        used = {"reference_source": str(reference), "reference": reference_table[["path", "md5"]].to_dict("records")}
    states = fit_variant(variant, [(p, load_rgb(p)) for p in abspaths], tables)
    record = {
        "variant": variant.to_dict(),
        "states": states,
        **used,
        "n_images": len(abspaths),
        "provenance": provenance(seed=seed),
    }
    write_json(record, out_state)
    if reference is not None:
        where = f"images of {reference}"
    elif used.get("fold"):
        where = f"training images of fold {used['fold']}"
    else:
        where = "training images (never test images)"
    log.info("variant %s fitted on %d %s", variant.name, len(abspaths), where)
    return record


def reference_images(
    source: PathLike, validation: Mapping[str, Any], study: pd.DataFrame, n: int, seed: int
) -> pd.DataFrame:
    """``path, abspath, md5`` of at most ``n`` (seeded sample) valid images of a reference
    source (a folder or manifest outside the study, :func:`leukotype.predict.gather_inputs`),
    none with the bytes of an image of the validated ``study`` table."""
    from leukotype.predict import gather_inputs, validate_inputs
    from leukotype.validate import study_copies

    table = validate_inputs(gather_inputs([source]), validation)
    for row in table[table["status"] != "ok"].itertuples():
        log.warning("reference %s: rejected %s: %s", source, row.path, row.reason)
    table = table[table["status"] == "ok"].reset_index(drop=True)
    copies = study_copies(table["md5"], study)
    shared = table[copies != ""]
    if not shared.empty:
        examples = "; ".join(f"{path} = the study's {copies[i]}" for i, path in shared["path"].head(3).items())
        raise LeukotypeError(
            f"reference_source {source}: {len(shared)} image(s) are study images (identical bytes: "
            f"{examples}); a fitted step would see the study's test images through them, so give "
            "reference images from outside the study"
        )
    if table.empty:
        raise LeukotypeError(f"reference_source {source}: no valid image to fit the variant on")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(table), size=min(n, len(table)), replace=False).tolist())
    return table.iloc[chosen][["path", "abspath", "md5"]].reset_index(drop=True)


# ---------------------------------------------------------------------------- classifier


def fold_parts(samples: pd.DataFrame, fold: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training rows (every transform) and test rows (identity, and every transform with
    test-time augmentation) of one fold."""
    rows = samples[samples["fold"] == fold]
    if rows.empty:
        raise LeukotypeError(f"fold {fold!r} not found; folds present: {sorted(samples['fold'].unique())}")
    train = rows[rows["part"] == "train"].reset_index(drop=True)
    test = rows[rows["part"] == "test"].reset_index(drop=True)
    return train, test


def run_svm(
    samples: PathLike,
    task_cfg: Mapping[str, Any],
    fold: str,
    feature_dirs: Sequence[PathLike],
    layer: str | Sequence[str],
    svm_cfg: Mapping[str, Any],
    out_model: PathLike,
    out_predictions: PathLike,
    out_cv: PathLike,
    seed: int = 0,
    threads: int = 1,
    memory_mb: float | None = None,
    out_calibration: PathLike | None = None,
) -> pd.DataFrame:
    from leukotype.calibration import add_probabilities, fit_svm_calibration
    from leukotype.classify import (
        DEFAULT_KERNEL_MEMORY_FRACTION,
        DEFAULT_N_COMPONENTS,
        fit_svm,
        kernel_budget_mb,
        predict_table,
        save_model,
    )
    from leukotype.feature_store import feature_dim, load_features
    from leukotype.memory import require_memory, svm_memory_parts

    task = task_from_dict(task_cfg)
    train, test = fold_parts(read_tsv(samples), fold)
    dirs = [Path(d) for d in feature_dirs]
    # Before the features are loaded: stop with a message if the job's mem_mb cannot hold them.
    layers = [layer] * len(dirs) if isinstance(layer, str) else list(layer)
    dim = sum(feature_dim(d, name) for d, name in zip(dirs, layers, strict=True))
    # The job's own memory (snakemake.resources.mem_mb) sets the kernel-memory budget (one
    # matrix); the exact search holds at most two, above the budget the solver changes.
    gram_mb = kernel_budget_mb(
        memory_mb, svm_cfg.get("kernel_memory_fraction", DEFAULT_KERNEL_MEMORY_FRACTION)
    )
    require_memory("train_svm", svm_memory_parts(len(train), len(test), dim, 2 * gram_mb if memory_mb else 0.0), memory_mb)
    X_train = load_features(dirs, layer, train[["image_id", "transform"]])
    X_test = load_features(dirs, layer, test[["image_id", "transform"]])
    grid = {k: svm_cfg[k] for k in ("C", "kernel", "gamma")}
    # the search's out-of-fold scores of the chosen setting: the calibration reuses them
    # instead of refitting that setting on the same inner folds
    out_of_fold: dict[str, Any] = {}
    pipeline, cv_results = fit_svm(
        X_train,
        train["label"].to_numpy(),
        train["group"].to_numpy(),
        grid,
        cv_folds=svm_cfg["cv_folds"],
        class_weight=svm_cfg["class_weight"],
        seed=seed,
        n_jobs=threads,
        gram_mb=gram_mb,
        solver=svm_cfg.get("solver", "auto"),
        n_components=svm_cfg.get("n_components", DEFAULT_N_COMPONENTS),
        out_of_fold=out_of_fold if out_calibration is not None else None,
    )
    log.info("SVM chosen: %s", pipeline.named_steps)
    save_model(pipeline, out_model)
    write_tsv(cv_results, out_cv)
    predictions = predict_table(pipeline, X_test, test, list(task.classes))
    if out_calibration is not None:
        # Probabilities: a temperature on the decision scores, fitted on out-of-fold scores of
        # the training part (the test part is never used to fit anything).
        reused = None
        if out_of_fold.get("scores") is not None and sorted(out_of_fold["classes"]) == sorted(
            str(c) for c in task.classes
        ):
            order = [out_of_fold["classes"].index(str(c)) for c in task.classes]
            reused = out_of_fold["scores"][:, order]
        calibration = fit_svm_calibration(
            pipeline, X_train, train["label"].to_numpy(), train["group"].to_numpy(),
            list(task.classes), cv_folds=svm_cfg["cv_folds"], seed=seed, scores=reused,
        )
        log.info("calibration: temperature %.4g (%s)", calibration["temperature"], calibration["fitted_on"])
        write_json(calibration, out_calibration)
        predictions = add_probabilities(predictions, list(task.classes), calibration["temperature"])
    write_tsv(predictions, out_predictions)
    return predictions


# ----------------------------------------------------------------------------- evaluation


def svm_choice(cv_results: pd.DataFrame) -> dict[str, Any]:
    """The selected row of an SVM run's cv_results: solver (and why), kernel, C, gamma, and
    the processes its grid search ran in (n_jobs)."""
    row = cv_results[cv_results["selected"].astype(str) == "True"].iloc[0]
    keys = ("solver", "solver_reason", "kernel_budget_mb", "n_components", "kernel", "C",
            "gamma", "mean_test_score", "n_jobs")
    return {k: (None if pd.isna(row[k]) else row[k].item() if hasattr(row[k], "item") else row[k])
            for k in keys if k in row.index}


def run_evaluate(
    predictions: PathLike,
    samples: PathLike,
    task_cfg: Mapping[str, Any],
    meta: Mapping[str, Any],
    evaluation_cfg: Mapping[str, Any],
    out_metrics: PathLike,
    out_confusion: PathLike,
    out_confusion_png: PathLike,
    feature_dirs: Sequence[PathLike] = (),
    cv_results: PathLike | None = None,
    calibration: PathLike | None = None,
) -> dict[str, Any]:
    """Metrics of one run; ``feature_dirs`` (the features it ran on) give its precision;
    ``calibration`` (the run's calibration.json) is recorded as how its probabilities were
    calibrated (without the held-out image list)."""
    from leukotype.hardware import run_precision
    from leukotype.metrics import confusion_csv, evaluate_predictions
    from leukotype.report import plot_confusion

    if feature_dirs:
        meta = {**meta, "precision": run_precision(feature_dirs)}
    task = task_from_dict(task_cfg)
    if cv_results is not None:  # an SVM run: which solver and setting produced it
        meta = {**meta, "classifier": svm_choice(read_tsv(cv_results))}
    # Bootstrap whole groups (patients, duplicates): images of one patient are not independent.
    sample_table = read_tsv(samples)
    groups = dict(zip(sample_table["image_id"], sample_table["group"]))
    record = evaluate_predictions(
        read_tsv(predictions),
        list(task.classes),
        dict(meta),
        n_boot=evaluation_cfg["n_bootstrap"],
        seed=evaluation_cfg["seed"],
        groups=groups,
    )
    _add_calibration_metrics(record, read_tsv(predictions), list(task.classes), groups, evaluation_cfg)
    _add_tta_metrics(record, read_tsv(predictions), list(task.classes), groups, evaluation_cfg)
    if calibration is not None:
        record["calibration"] = {k: v for k, v in read_json(calibration).items() if k != "image_ids"}
    write_json(record, out_metrics)
    confusion_csv(record, out_confusion)
    plot_confusion(record, out_confusion_png)
    return record


def _add_calibration_metrics(
    record: dict[str, Any], predictions: pd.DataFrame, classes: list[str], groups: Mapping[str, str],
    evaluation_cfg: Mapping[str, Any],
) -> None:
    """ECE and Brier score (with bootstrap CIs) of the run's probabilities, where it has them."""
    from leukotype.calibration import calibration_metrics, probabilities_from_table

    identity = predictions[predictions["transform"].astype(str) == "identity"]
    probabilities = probabilities_from_table(identity, classes)
    if probabilities is None:
        return
    lookup = {c: i for i, c in enumerate(classes)}
    labels = [lookup[str(v)] for v in identity["true"]]
    result = calibration_metrics(
        probabilities, labels, n_boot=evaluation_cfg["n_bootstrap"], seed=evaluation_cfg["seed"],
        groups=[groups[str(i)] for i in identity["image_id"]],
    )
    record["metrics"].update(result["metrics"])
    record["ci"].update(result["ci"])
    from leukotype.calibration import reliability_bins

    record["reliability"] = {k: v.tolist() for k, v in reliability_bins(probabilities, labels).items()}


def _add_tta_metrics(
    record: dict[str, Any], predictions: pd.DataFrame, classes: list[str], groups: Mapping[str, str],
    evaluation_cfg: Mapping[str, Any],
) -> None:
    """Accuracy and balanced accuracy (with CIs) of the scores averaged over each test image's
    views, where the run predicted more than the identity view (``evaluation.tta``)."""
    from leukotype.metrics import evaluate_predictions
    from leukotype.tta import TTA_METRICS, has_views, tta_predictions

    if not has_views(predictions):
        return
    averaged = tta_predictions(predictions, classes)
    tta_record = evaluate_predictions(
        averaged, classes, {}, n_boot=evaluation_cfg["n_bootstrap"], seed=evaluation_cfg["seed"], groups=groups
    )
    for name, source in TTA_METRICS.items():
        record["metrics"][name] = tta_record["metrics"][source]
        record["ci"][name] = tta_record["ci"][source]
    record["tta"] = {"n_views": int(averaged["n_views"].max()), "transforms": sorted(predictions["transform"].astype(str).unique())}


def run_reliability(
    metrics: Sequence[PathLike], task_cfg: Mapping[str, Any], out_png: PathLike, dataset: str | None = None
) -> None:
    """The task's reliability diagram from its runs' metrics records."""
    from leukotype.calibration_plots import plot_reliability

    plot_reliability([read_json(p) for p in metrics], task_from_dict(task_cfg).name, out_png, dataset=dataset)


def dataset_label(dataset_cfg: Mapping[str, Any]) -> str:
    """How tables and figures name the data; synthetic data says so everywhere it appears."""
    name = dataset_cfg.get("name") or str(dataset_cfg["source"])
    if dataset_cfg["source"] == "demo" or dataset_cfg.get("synthetic"):
        return f"SYNTHETIC: {name}"
    return name


def run_summarise(
    metrics: Sequence[PathLike],
    task_cfg: Mapping[str, Any],
    out_csv: PathLike,
    out_accuracy_png: PathLike,
    out_confusion_png: PathLike,
    dataset: str | None = None,
    comparisons: PathLike | None = None,
    baselines: Sequence[Mapping[str, Any]] = (),
    out_per_class: PathLike | None = None,
) -> pd.DataFrame:
    """The paper table (with the best run and those not significantly worse marked, from the
    ``comparisons`` table, and published ``baselines`` appended), the figures and, with
    ``out_per_class``, the per-class table of every run (CSV + Markdown)."""
    from leukotype.baselines import baselines_of_task
    from leukotype.compare import standing_against_best
    from leukotype.comparison_report import (
        add_baselines,
        mark_standing,
        per_class_table,
        run_labels,
        table_run_keys,
        write_per_class,
    )
    from leukotype.metrics import fold_summary
    from leukotype.report import paper_table, plot_accuracy, plot_confusion_grid, write_tables

    task = task_from_dict(task_cfg)
    records = [read_json(p) for p in metrics]
    summary = fold_summary(records)
    table = paper_table(summary, task.name, dataset=dataset)
    keys = table_run_keys(summary, task.name)
    if comparisons is not None:
        pairs = pd.read_csv(comparisons)
        table = mark_standing(table, keys, standing_against_best(pairs, keys))
    published = baselines_of_task(baselines, task.name)
    table = add_baselines(table, published)
    write_tables(table, Path(out_csv).with_suffix(""))
    plot_accuracy(summary, task.name, out_accuracy_png, dataset=dataset, baselines=published)
    plot_confusion_grid(records, task.name, out_confusion_png, dataset=dataset)
    if out_per_class is not None:
        per_class = per_class_table(records, run_labels(summary, task.name))
        write_per_class(per_class, Path(out_per_class).with_suffix(""))
    return table


def run_compare(
    metrics: Sequence[PathLike],
    predictions: Sequence[PathLike],
    samples: PathLike,
    task_cfg: Mapping[str, Any],
    evaluation_cfg: Mapping[str, Any],
    out_csv: PathLike,
    out_png: PathLike,
    dataset: str | None = None,
    test_set: str = "internal",
    test_groups: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Paired comparisons of every pair of a task's runs on their common test images.

    ``metrics[i]`` and ``predictions[i]`` belong to the same run and fold (the record names
    the run; a record's ``adapt`` other than ``none``, e.g. BatchNorm adaptation on an
    external set, makes it a run of its own). ``samples`` (the task's augmented samples table)
    gives the groups the bootstrap resamples and the fold sizes of the Nadeau-Bengio
    correction. For another test set (an external one) pass that set's predictions and
    metrics, name it in ``test_set`` and give its images' groups in ``test_groups``; with
    k-fold its size then stands for the test size in the correction (every fold's model is
    tested on the same external images, so the correction is approximate there).
    """
    from leukotype.compare import compare_runs, fold_sizes_from_samples, record_run_key, run_predictions
    from leukotype.comparison_report import (
        comparison_caption,
        plot_comparison_matrix,
        run_labels,
        write_comparison_tables,
    )
    from leukotype.metrics import fold_summary

    if len(metrics) != len(predictions):
        raise LeukotypeError(
            f"{len(metrics)} metrics files but {len(predictions)} prediction tables; they pair up"
        )
    task = task_from_dict(task_cfg)
    # An external set's record holds its scores under external_metrics (next to the run's
    # internal ones); the labels below read them as the run's metrics.
    records = [_as_run_record(read_json(p)) for p in metrics]
    runs = [
        run_predictions(record_run_key(record), record["fold"], read_tsv(path))
        for record, path in zip(records, predictions)
    ]
    sample_table = read_tsv(samples)
    fold_sizes = fold_sizes_from_samples(sample_table)
    if test_groups is None:
        groups = dict(zip(sample_table["image_id"].astype(str), sample_table["group"].astype(str)))
    else:
        groups = {str(k): str(v) for k, v in test_groups.items()}
        n_test = {r.fold: len(r.predictions) for r in runs}
        fold_sizes = {f: (n_train, n_test.get(f, 0)) for f, (n_train, _) in fold_sizes.items()}
    alpha = float(evaluation_cfg.get("alpha", 0.05))
    table = compare_runs(
        runs,
        list(task.classes),
        groups=groups,
        fold_sizes=fold_sizes,
        n_boot=max(1, int(evaluation_cfg["n_bootstrap"])),
        seed=int(evaluation_cfg["seed"]),
        alpha=alpha,
        test_set=test_set,
    )
    table.insert(0, "task", task.name)
    # Display names come from the plain runs; an adapted variant is named after its run.
    plain = {}
    for record, item in zip(records, runs):
        plain.setdefault((item.run.partition("#")[0], item.fold), record)
    labels = run_labels(fold_summary(list(plain.values())), task.name)
    for item in runs:
        base, _, adapt = item.run.partition("#")
        if adapt:
            labels[item.run] = f"{labels.get(base, base)} [{adapt}]"
    write_comparison_tables(
        table, labels, Path(out_csv).with_suffix(""), caption=comparison_caption(table, alpha)
    )
    suffix = f" ({dataset})" if dataset else ""
    title = f"{task.name}: paired differences in accuracy, {test_set} test set{suffix}"
    if len(table):
        plot_comparison_matrix(table, labels, out_png, title)
    else:
        _placeholder_figure(out_png, f"{title}: fewer than two runs, nothing to compare")
    return table


def _as_run_record(record: dict[str, Any]) -> dict[str, Any]:
    if "metrics" not in record and "external_metrics" in record:
        return {**record, "metrics": record["external_metrics"] or {}}
    return record


def _placeholder_figure(path: PathLike, text: str) -> None:
    from leukotype.report import _new_figure, save_figure, wrap_title

    fig = _new_figure(6.0, 1.5)
    fig.text(0.5, 0.5, wrap_title(text, 6.0, 10), ha="center", va="center", fontsize=10)
    save_figure(fig, path)


def run_feature_map(
    feature_dir: PathLike,
    layer: str,
    samples: Mapping[str, PathLike],
    out_png: PathLike,
    settings: Mapping[str, Any],
    seed: int = 0,
    title: str = "",
    classes: Mapping[str, Sequence[str]] | None = None,
    threads: int = 1,
    externals: Sequence[Mapping[str, Any]] = (),
    tasks_cfg: Mapping[str, Mapping[str, Any]] | None = None,
    internal_name: str = "internal test",
) -> pd.DataFrame:
    """t-SNE map of one backbone layer's test features, one panel per task (``samples``: task
    name -> augmented samples table; ``classes``: task -> class order of the legend).

    ``externals``: external test sets drawn on the same map, fitted jointly with the internal
    test images and marked by dataset; each ``{"config": evaluation.external entry,
    "validated": its validated.tsv, "features": its features folder of this backbone}``. An
    external image shows in the panel of each task the set scores (``tasks_cfg``: task name ->
    task entry), coloured by its mapped class. Returns the points: ``dataset`` (``internal`` or
    the set's name), ``image_id``, ``x``, ``y`` and ``label_<task>`` ('' where not shown).
    """
    from leukotype.external import ExternalSet, external_samples
    from leukotype.feature_map import (
        INTERNAL,
        feature_map_inputs,
        map_points,
        plot_feature_map,
        subsample,
        tsne_embedding,
    )
    from leukotype.feature_store import load_features

    tables = {task: read_tsv(path) for task, path in samples.items()}
    datasets = {INTERNAL: (*feature_map_inputs(tables), Path(feature_dir), internal_name)}
    for entry in externals:
        ext = ExternalSet.from_dict(entry["config"])
        validated = read_tsv(entry["validated"])
        per_task = {}
        for task in tables:
            if ext.evaluates(task) and tasks_cfg and task in tasks_cfg:
                scored, _ = external_samples(validated, task_from_dict(tasks_cfg[task]), ext)
                per_task[task] = dict(zip(scored["image_id"].astype(str), scored["label"].astype(str)))
        ids = sorted(set().union(*[set(m) for m in per_task.values()])) if per_task else []
        if ids:
            datasets[ext.name] = (ids, per_task, Path(entry["features"]), ext.label_display)
    points, labels = map_points({name: (ids, per_task) for name, (ids, per_task, _, _) in datasets.items()})
    first = [
        f"{d}|" + next((labels[t][k] for t in labels if labels[t][k]), "")
        for k, d in enumerate(points["dataset"])
    ]
    keep = subsample(first, int(settings.get("max_points", 2000)), seed)
    points = points.iloc[keep].reset_index(drop=True)
    labels = {task: [values[k] for k in keep] for task, values in labels.items()}
    blocks = []
    for name, (_, _, folder, _) in datasets.items():
        rows = points.loc[points["dataset"] == name, ["image_id"]].assign(transform="identity")
        if len(rows):
            blocks.append(load_features([folder], layer, rows))
    features = np.vstack(blocks)
    embedding = tsne_embedding(
        features, seed=seed, perplexity=float(settings.get("perplexity", 30)), threads=threads
    )
    panels = []
    for task, values in labels.items():
        seen = sorted({v for v in values if v})
        order = list((classes or {}).get(task) or seen)
        panels.append((f"task {task}", values, order))
    displays = {name: display for name, (_, _, _, display) in datasets.items()}
    marked = [displays[d] for d in points["dataset"]] if len(datasets) > 1 else None
    plot_feature_map(embedding, panels, out_png, title or f"t-SNE of {feature_dir} / {layer}", datasets=marked)
    out = points.assign(x=embedding[:, 0], y=embedding[:, 1])
    for task, values in labels.items():
        out[f"label_{task}"] = values
    return out


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
        row = {k: record.get(k) for k in ("task", "strategy", "backbone", "layer", "prep", "fold", "weights", "n_test")}
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


# ----------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class FinetuneOutputs:
    """Where a fine-tuning job writes: model, history, learning curve, test predictions and the
    fine-tuned features' folder."""

    model: PathLike
    history: PathLike
    curve: PathLike
    predictions: PathLike
    features: PathLike
    #: Temperature of the head's probabilities (leukotype.head_calibration); None: not written.
    calibration: PathLike | None = None


def run_finetune(
    samples: PathLike,
    validated: PathLike,
    task_cfg: Mapping[str, Any],
    backbone: str,
    fold: str,
    weights: str | Mapping[str, str],
    torch_home: str | None,
    settings: Mapping[str, Any],
    checkpoint_dir: PathLike,
    outputs: FinetuneOutputs,
    feature_dirs: Sequence[PathLike] = (),
    threads: int = 1,
    sha256: str | None | Mapping[str, str | None] = None,
    preprocessing: Mapping[str, Any] | None = None,
    preprocessing_files: Sequence[PathLike] = (),
) -> pd.DataFrame:
    """Fine-tune ``backbone`` on one task and fold; write model, history, curve, predictions
    and the fine-tuned network's features (for ``finetune_svm``). ``preprocessing`` (a variant
    and its data files) applies to every image the network reads; its colour views are
    training samples of the sample table.

    With ``feature_dirs`` (the paper's policy: every pretrained layer frozen) the head trains on
    the cached penultimate features of those folders instead of running the backbone again.
    ``sha256`` checks a user weight file (as extraction does).
    """
    from leukotype.finetune import (
        FinetuneConfig,
        FoldSamples,
        Samples,
        build_finetune_model,
        finetune_fold,
        save_finetuned,
        train_head_on_features,
    )
    from leukotype.finetune.outputs import write_features
    from leukotype.report import plot_learning_curve
    from leukotype.head_calibration import calibration_slice
    from leukotype.split import carve_validation
    from leukotype.weights import resolve_weights

    task = task_from_dict(task_cfg)
    classes = list(task.classes)
    validated_table = read_tsv(validated)
    prepare = job_preparer(preprocessing, preprocessing_files, validated_table)
    abspaths = validated_table[["image_id", "abspath"]]
    train_rows, test_rows = (part.merge(abspaths, on="image_id", how="left") for part in fold_parts(read_tsv(samples), fold))
    cfg = FinetuneConfig.from_mapping({**settings, "threads": threads})
    precision = _native_precision(cfg)
    cfg = dataclasses.replace(cfg, precision=precision.effective)
    val_rows = train_rows.iloc[0:0]
    held_out = "validation"
    if cfg.val_fraction > 0:
        is_val = carve_validation(train_rows, cfg.val_fraction, cfg.seed)
        train_rows, val_rows = train_rows[~is_val], train_rows[is_val]
        log.info("validation part for early stopping: %d of %d training samples", len(val_rows), len(is_val))
    is_cal, no_slice_reason = calibration_slice(
        train_rows, cfg, trains_layers=cfg.policy != "head" or catalog.is_from_scratch(backbone)
    )
    if is_cal is not None:
        # evaluated each epoch (history's val_ columns), never trained on: the temperature's data
        train_rows, val_rows, held_out = train_rows[~is_cal], train_rows[is_cal], "calibration"
        log.info("calibration slice: %d of %d training samples held out", len(val_rows), len(is_cal))
    fold_samples = FoldSamples(
        train=Samples.from_frame(train_rows, classes, prepare=prepare),
        val=Samples.from_frame(val_rows, classes, prepare=prepare) if len(val_rows) else None,
        test=Samples.from_frame(test_rows, classes, prepare=prepare),
    )

    parts = list(catalog.parts(backbone))
    # one setting for every part, or (a combination of differently weighted parts) one each
    per_part = lambda value, part: value[part] if isinstance(value, Mapping) else value  # noqa: E731
    weight_paths = {
        part: resolve_weights(
            part, per_part(weights, part), sha256=per_part(sha256, part), torch_home=torch_home
        )
        for part in parts
    }
    model, preprocess = build_finetune_model(
        backbone,
        len(classes),
        cfg.policy,
        weights=weight_paths if len(parts) > 1 else weight_paths[backbone],
        seed=cfg.seed,
    )
    if feature_dirs:
        # each part's penultimate layer (one name when the parts share it, as the paper's do)
        penultimates = [penultimate_layer(part) for part in parts]
        cached_layer = penultimates[0] if len(set(penultimates)) == 1 else penultimates
        job = train_head_on_features(
            model, fold_samples, classes, cfg, feature_dirs=feature_dirs, layer=cached_layer, checkpoint_dir=checkpoint_dir
        )
    else:
        job = finetune_fold(model, preprocess, fold_samples, classes, cfg, checkpoint_dir=checkpoint_dir)
    result = job.train
    log.info("trained %d epochs (best %s, resumed from %s)", len(result.history), result.best_epoch, result.resumed_from_epoch)
    save_finetuned(model, outputs.model)
    write_tsv(result.history, outputs.history)
    plot_learning_curve(result.history, outputs.curve, title=f"{task.name} / {backbone} / {fold}")
    predictions = job.predictions
    if outputs.calibration is not None:
        from leukotype.head_calibration import calibrate_prediction_table, fit_head_calibration

        calibration = fit_head_calibration(
            model.head, cfg, job.features, job.feature_index, fold_samples,
            train_rows["group"].astype(str).tolist(), frozen_features=not any(True for _ in model.trainable.parameters()),
            held_out=held_out, no_slice_reason=no_slice_reason,
        )
        log.info("calibration: temperature %.4g (%s)", calibration["temperature"], calibration["fitted_on"])
        write_json(calibration, outputs.calibration)
        predictions = calibrate_prediction_table(predictions, classes, calibration["temperature"])
    write_tsv(predictions, outputs.predictions)
    write_features(outputs.features, job.feature_index, job.features)
    write_json({**precision.meta(), "provenance": provenance()}, Path(outputs.features) / "meta.json")
    log_job_cpu(len(job.feature_index))  # as extraction's: allocator applied, CPU, faults
    return predictions


def _native_precision(cfg: Any) -> Any:
    """Fine-tuning runs bf16 only where the device has it natively (see leukotype.hardware)."""
    from leukotype.hardware import resolve_precision
    from leukotype.runtime import resolve_device

    return resolve_precision(cfg.precision, resolve_device(cfg.device))

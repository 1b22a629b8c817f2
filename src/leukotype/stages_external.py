"""Workflow stages of the external test sets: paths and plain config in, files out.

Validate an external set, extract its features (in folders of its own, so no training job's
inputs change), predict it with every trained run, score it next to the internal test part,
and tabulate internal vs external. Training jobs never read any of these files: the job graph
shows it (``tests/test_external.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from leukotype import catalog
from leukotype.config import penultimate_layer, task_from_dict
from leukotype.errors import LeukotypeError
from leukotype.external import ExternalSet, evaluate_external, external_samples, validation_tasks
from leukotype.io import provenance, read_json, read_tsv, write_json, write_tsv

log = logging.getLogger("leukotype")

PathLike = str | Path


def run_validate_external(
    source: PathLike,
    ext_cfg: Mapping[str, Any],
    validation_cfg: Mapping[str, Any],
    out_table: PathLike,
    out_summary: PathLike,
    threads: int = 1,
    study: PathLike | None = None,
) -> pd.DataFrame:
    """Validate an external set as training data is validated (same checks and reasons); an
    image with the bytes of an image of the validated ``study`` table is rejected as
    ``in_study`` (a training image scored as another lab's would inflate the external score)."""
    from leukotype.dataset import read_dataset
    from leukotype.validate import summarise_validation, validate_images

    ext = ExternalSet.from_dict(ext_cfg)
    table = read_dataset(source)
    validated = validate_images(
        table,
        validation_tasks(table),
        min_side=validation_cfg["min_side"],
        max_pixels=validation_cfg["max_pixels"],
        threads=threads,
    )
    if study is not None:
        validated = reject_study_images(validated, read_tsv(study))
    for row in validated[validated["status"] != "ok"].itertuples():
        log.warning("external %s: rejected %s: %s", ext.name, row.path, row.reason)
    summary = summarise_validation(validated)
    log.info("external %s validation: %s", ext.name, summary)
    write_tsv(validated, out_table)
    write_json({"external": ext.name, "dataset": str(source), **summary, "provenance": provenance()}, out_summary)
    return validated


def reject_study_images(validated: pd.DataFrame, study: pd.DataFrame) -> pd.DataFrame:
    """``validated`` with its valid rows whose bytes (md5) are a ``study`` image's rejected as
    ``in_study``, naming that image."""
    from leukotype.validate import study_copies

    copies = study_copies(validated["md5"], study)
    shared = (validated["status"] == "ok") & (copies != "")
    validated = validated.copy()
    validated.loc[shared, "status"] = "rejected"
    validated.loc[shared, "reason"] = "in_study: identical bytes to the study's image " + copies[shared]
    return validated


def run_extract_external(
    validated: PathLike,
    backbone: str,
    layers: Sequence[str],
    weights: str,
    sha256: str | None,
    torch_home: str | None,
    features_cfg: Mapping[str, Any],
    out_dir: PathLike,
    adapt: str = "none",
    threads: int = 1,
    preprocessing: Mapping[str, Any] | None = None,
    preprocessing_files: Sequence[PathLike] = (),
) -> None:
    """Features of every valid external image (identity only: external images are test images).

    ``adapt: bn`` re-estimates BatchNorm statistics on these (unlabelled) images first. A
    ``preprocessing`` variant applies with the set's own per-image tables (crop boxes) and the
    state fitted on the training part (stain reference); its colour views are training-only.
    """
    from leukotype.stages import run_extract

    run_extract(
        validated,
        backbone,
        layers,
        weights,
        sha256,
        torch_home,
        {"rotations": [], "reflection": False},
        {**features_cfg, "adapt_batchnorm": adapt == "bn"},
        out_dir,
        threads=threads,
        preprocessing=preprocessing,
        preprocessing_files=preprocessing_files,
        # external images are test images: the variant whole (its fitted states are one per
        # step), but none of its colour views
        colour_views=False,
    )


def _scored(validated: PathLike, task_cfg: Mapping[str, Any], ext_cfg: Mapping[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    task = task_from_dict(task_cfg)
    samples, summary = external_samples(read_tsv(validated), task, ExternalSet.from_dict(ext_cfg))
    log.info("external %s, task %s: %s", summary["external"], task.name, {k: v for k, v in summary.items() if k != "external"})
    return samples, summary


def run_predict_external_svm(
    model: PathLike,
    validated: PathLike,
    task_cfg: Mapping[str, Any],
    ext_cfg: Mapping[str, Any],
    feature_dirs: Sequence[PathLike],
    layer: str,
    out_predictions: PathLike,
) -> pd.DataFrame:
    """A trained SVM run's predictions for the scored external images."""
    from leukotype.classify import load_model, predict_table
    from leukotype.feature_store import load_features

    task = task_from_dict(task_cfg)
    samples, _ = _scored(validated, task_cfg, ext_cfg)
    pipeline = load_model(model)
    columns = ["image_id", "transform", "true", "pred", *(f"score_{c}" for c in task.classes)]
    if samples.empty:
        predictions = pd.DataFrame(columns=columns)
    else:
        X = load_features([Path(d) for d in feature_dirs], layer, samples[["image_id", "transform"]])
        predictions = predict_table(pipeline, X, samples, list(task.classes))
    write_tsv(predictions, out_predictions)
    return predictions


def run_adapt_external_svm(
    model: PathLike,
    samples: PathLike,
    fold: str,
    train_feature_dirs: Sequence[PathLike],
    validated: PathLike,
    task_cfg: Mapping[str, Any],
    ext_cfg: Mapping[str, Any],
    external_feature_dirs: Sequence[PathLike],
    layers: Sequence[str],
    seed: int,
    out_predictions: PathLike,
    out_internal: PathLike,
    out_shots: PathLike,
    out_model: PathLike | None = None,
    memory_mb: float | None = None,
) -> pd.DataFrame:
    """Few-shot adaptation of one SVM run to an external lab (``adapt: shots``).

    The run's pipeline (scaler + SVM with the setting its own search chose) is refitted on the
    run's training rows plus ``train_per_class`` labelled external cells per shared class
    (:func:`leukotype.external.draw_shots`), weighted by ``shot_weight``, as one population
    (``shot_method: pooled``) or feature-augmented (``augment``, :mod:`leukotype.few_shot`);
    no new search, no new calibration. It predicts the set's other scored cells
    (``out_predictions``; ``augment``: the lab's view) and the run's internal test part again
    (``out_internal``, the training lab's view: a fix for another lab must not break the lab's
    own cells); ``out_shots`` lists the cells it trained on, ``out_model`` holds the refitted
    pipeline that scores the lab's cells (``leukotype export --few-shot`` bundles it). The
    run's own files are left as they are.
    """
    import numpy as np
    from sklearn.base import clone

    from leukotype.classify import load_model, predict_table, save_model
    from leukotype.external import LABEL, draw_shots
    from leukotype.feature_store import feature_dim, load_features
    from leukotype.few_shot import NEW_LAB, TRAINING_LAB, fit_lab_views
    from leukotype.memory import require_memory, svm_memory_parts
    from leukotype.stages import fold_parts

    task = task_from_dict(task_cfg)
    ext = ExternalSet.from_dict(ext_cfg)
    if ext.train_per_class < 1:
        raise LeukotypeError(f"external set {ext.name!r}: train_per_class is {ext.train_per_class}; few-shot runs need >= 1")
    scored, _ = _scored(validated, task_cfg, ext_cfg)
    if scored.empty:
        raise LeukotypeError(f"external set {ext.name!r} has no scored image for task {task.name!r}")
    shots = draw_shots(scored, ext.train_per_class, seed).to_numpy()
    trained, rest = scored[shots].reset_index(drop=True), scored[~shots].reset_index(drop=True)
    train, test = fold_parts(read_tsv(samples), fold)
    index = ["image_id", "transform"]
    train_dirs, ext_dirs = [Path(d) for d in train_feature_dirs], [Path(d) for d in external_feature_dirs]
    # as train_svm: stop with a message if the job's mem_mb cannot hold the features
    dim = sum(feature_dim(d, name) for d, name in zip(train_dirs, layers, strict=True))
    require_memory("adapt_external_svm", svm_memory_parts(len(train) + len(trained), len(test) + len(rest), dim), memory_mb)
    X_train = load_features(train_dirs, list(layers), train[index])
    X_scored = load_features(ext_dirs, list(layers), scored[index])
    weight = ext.weight_per_shot(len(train), len(trained))
    X_fit = np.concatenate([X_train, X_scored[shots]])
    y_fit = np.concatenate([train["label"].astype(str).to_numpy(), trained[LABEL].astype(str).to_numpy()])
    sample_weight = None if weight == 1.0 else np.concatenate([np.ones(len(train)), np.full(len(trained), weight)])
    if ext.shot_method == "augment":
        views = fit_lab_views(load_model(model), X_fit, y_fit, np.repeat([TRAINING_LAB, NEW_LAB], [len(train), len(trained)]),
                              sample_weight)
        lab_model, own_model = views[NEW_LAB], views[TRAINING_LAB]
    else:
        fit_weights = {} if sample_weight is None else {"svm__sample_weight": sample_weight}
        lab_model = own_model = clone(load_model(model)).fit(X_fit, y_fit, **fit_weights)
    counts = trained[LABEL].astype(str).value_counts().sort_index().to_dict()
    log.info(
        "few-shot refit (%s) on %d training rows + %d cells of %s (%s, weight %.3g each), scored on its other %d cells",
        ext.shot_method, len(train), len(trained), ext.name, {c: int(n) for c, n in counts.items()}, weight, len(rest),
    )
    # the lab's cells are scored by the lab's view, the run's test part by the training lab's
    predictions = predict_table(lab_model, X_scored[~shots], rest, list(task.classes))
    write_tsv(predictions, out_predictions)
    write_tsv(predict_table(own_model, load_features(train_dirs, list(layers), test[index]), test, list(task.classes)), out_internal)
    write_tsv(trained[["image_id", "abspath", LABEL, "group"]].assign(weight=weight), out_shots)
    if out_model is not None:
        save_model(lab_model, out_model)
    return predictions


def run_predict_external_finetune(
    model_file: PathLike,
    validated: PathLike,
    task_cfg: Mapping[str, Any],
    ext_cfg: Mapping[str, Any],
    backbone: str,
    settings: Mapping[str, Any],
    out_predictions: PathLike,
    out_features: PathLike,
    feature_dirs: Sequence[PathLike] = (),
    adapt: str = "none",
    threads: int = 1,
    preprocessing: Mapping[str, Any] | None = None,
    preprocessing_files: Sequence[PathLike] = (),
) -> pd.DataFrame:
    """A fine-tuned network's predictions (and its features, for ``finetune_svm``) for the
    scored external images (``preprocessing``: the run's variant, as for extraction).

    With ``feature_dirs`` (the paper's policy: the head trained on cached frozen features) the
    head runs on the external images' frozen features (BatchNorm-adapted ones for ``bn``);
    otherwise the network runs on the images, its BatchNorm statistics first re-estimated on
    them for ``adapt: bn``.
    """
    import torch

    from leukotype.feature_store import load_features, write_feature_matrix
    from leukotype.finetune import (
        FINETUNED_LAYER,
        FinetuneConfig,
        Samples,
        build_finetune_model,
        load_finetuned,
        predict,
        prediction_frame,
        write_finetuned_features,
    )

    task = task_from_dict(task_cfg)
    classes = list(task.classes)
    samples, _ = _scored(validated, task_cfg, ext_cfg)
    if samples.empty:
        raise LeukotypeError(f"external set {ext_cfg['name']!r} has no scored image for task {task.name!r}")
    cfg = FinetuneConfig.from_mapping({**settings, "threads": threads})
    torch.set_num_threads(max(1, threads))
    # Architecture only: every tensor comes from the fine-tuned model file.
    model, preprocess = build_finetune_model(backbone, len(classes), cfg.policy, weights=None, seed=cfg.seed)
    load_finetuned(model, model_file)
    model.eval()
    from leukotype.stages import job_preparer

    prepare = job_preparer(preprocessing, preprocessing_files, read_tsv(validated))
    image_samples = Samples.from_frame(samples, classes, prepare=prepare)
    index = samples[["image_id", "transform"]]
    if feature_dirs:
        X = load_features([Path(d) for d in feature_dirs], penultimate_layer(catalog.parts(backbone)[0]), index)
        with torch.inference_mode():
            probabilities = torch.softmax(model.head(torch.from_numpy(X)), dim=1).numpy()
        predictions = prediction_frame(image_samples, probabilities, classes)
        write_feature_matrix(Path(out_features), FINETUNED_LAYER, index, X)
    else:
        inference = {"batch_size": cfg.batch_size, "device": cfg.device, "precision": cfg.precision, "num_workers": cfg.num_workers}
        if adapt == "bn":
            from torch.utils.data import DataLoader

            from leukotype.adaptation import adapt_batchnorm
            from leukotype.features import resolve_device

            device = resolve_device(cfg.device)
            model.to(device)
            loader = DataLoader(image_samples.dataset(preprocess), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
            seen = adapt_batchnorm(model, loader, device)
            log.info("BatchNorm statistics re-estimated on %d external images (labels unused)", seen)
        predictions = predict(model, image_samples, preprocess, classes, **inference)
        write_finetuned_features(out_features, model, Samples.from_frame(samples, prepare=prepare), preprocess, **inference)
    write_tsv(predictions, out_predictions)
    return predictions


def run_evaluate_external(
    predictions: PathLike,
    internal_predictions: PathLike,
    internal_samples: PathLike,
    validated: PathLike,
    task_cfg: Mapping[str, Any],
    ext_cfg: Mapping[str, Any],
    meta: Mapping[str, Any],
    evaluation_cfg: Mapping[str, Any],
    out_metrics: PathLike,
    shots: PathLike | None = None,
) -> dict[str, Any]:
    """One run's metrics on an external set next to its internal ones. A few-shot run
    (``shots``: the cells it trained on) is scored on the other cells, and its internal
    predictions are those of the refitted model."""
    task = task_from_dict(task_cfg)
    samples, summary = _scored(validated, task_cfg, ext_cfg)
    internal = read_tsv(internal_samples)
    internal_rows = read_tsv(internal_predictions)
    record = evaluate_external(
        read_tsv(predictions),
        internal_rows,
        samples,
        dict(zip(internal["image_id"].astype(str), internal["group"].astype(str))),
        summary,
        list(task.classes),
        dict(meta),
        n_boot=evaluation_cfg["n_bootstrap"],
        seed=evaluation_cfg["seed"],
    )
    if shots is not None:
        from leukotype.external import LABEL

        # the refitted model's accuracy on all of the task's classes (the other rows' is the
        # run's own metrics.json)
        identity = internal_rows[internal_rows["transform"].astype(str) == "identity"]
        record["internal_accuracy_all"] = float((identity["true"].astype(str) == identity["pred"].astype(str)).mean()) if len(identity) else None
        trained = read_tsv(shots)
        ext = ExternalSet.from_dict(ext_cfg)
        record["train_per_class"] = ext.train_per_class
        record["shots_per_class"] = {str(c): int(n) for c, n in sorted(trained[LABEL].astype(str).value_counts().items())}
        record["n_shots"] = int(len(trained))
        record["shot_weight"], record["shot_method"] = ext.shot_weight, ext.shot_method
        # shots.tsv of a run before shot_weight existed has no weight column: weight 1
        record["weight_per_shot"] = float(trained["weight"].iloc[0]) if "weight" in trained and len(trained) else 1.0
    write_json(record, out_metrics)
    return record


def run_compare_external(
    metrics: Sequence[PathLike],
    predictions: Sequence[PathLike],
    samples: PathLike,
    validated: PathLike,
    task_cfg: Mapping[str, Any],
    ext_cfg: Mapping[str, Any],
    evaluation_cfg: Mapping[str, Any],
    out_csv: PathLike,
    out_png: PathLike,
) -> pd.DataFrame:
    """Paired comparisons of every run of a task on one external set
    (``tables/<task>_<set>_comparisons.*``): :func:`leukotype.stages.run_compare` on the runs'
    external predictions (BatchNorm-adapted rows are runs of their own), scored on the shared
    classes, the bootstrap resampling the external set's groups."""
    from leukotype.stages import run_compare

    ext = ExternalSet.from_dict(ext_cfg)
    scored, _ = _scored(validated, task_cfg, ext_cfg)
    return run_compare(
        metrics,
        predictions,
        samples,
        task_cfg,
        evaluation_cfg,
        out_csv,
        out_png,
        dataset=ext.label_display,
        test_set=ext.name,
        test_groups=dict(zip(scored["image_id"].astype(str), scored["group"].astype(str))),
    )


def run_external_table(
    external_metrics: Sequence[PathLike],
    internal_metrics: Sequence[PathLike],
    task_cfg: Mapping[str, Any],
    externals_cfg: Sequence[Mapping[str, Any]],
    out_csv: PathLike,
    out_png: PathLike,
    dataset: str | None = None,
    comparisons: Mapping[str, PathLike] | None = None,
) -> pd.DataFrame:
    """``tables/<task>_external.{csv,md,tex}`` and ``figures/<task>_external.png``; with
    ``comparisons`` (external set name -> its comparison CSV) each set's best run and every
    run not significantly worse than it are marked, as in the main table."""
    from leukotype.report import write_tables
    from leukotype.report_external import external_table, plot_external

    task = task_from_dict(task_cfg)
    displays = {e["name"]: ExternalSet.from_dict(e).label_display for e in externals_cfg}
    records = [read_json(p) for p in external_metrics]
    internal = [read_json(p) for p in internal_metrics]
    pairs = {name: pd.read_csv(path) for name, path in (comparisons or {}).items()}
    table = external_table(records, internal, task.name, displays, dataset=dataset, comparisons=pairs or None)
    write_tables(table, Path(out_csv).with_suffix(""))
    plot_external(records, internal, task.name, out_png, displays, dataset=dataset)
    return table


def run_demo_external(out_manifest: PathLike, demo_cfg: Mapping[str, Any]) -> Path:
    """The synthetic demo's external set, at the demo's image size and seed."""
    from leukotype.demo import make_demo_external

    return make_demo_external(
        Path(out_manifest).parent, cells_per_subtype=4, image_size=demo_cfg["image_size"], seed=demo_cfg["seed"]
    )

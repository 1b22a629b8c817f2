"""Export a finished run of the workflow as a model bundle (see :mod:`leukotype.bundle`).

Everything a bundle holds is read from the run's files and the workflow's results: the
classifier (``svm.skops`` or the fine-tuned ``model.pt``), the training features (the
classifier's input, for the out-of-distribution model and the calibration), the sample table
(which rows were training rows), ``metrics.json`` (test metrics and the config). No image is
decoded and no network is run, except to fingerprint a random-weight backbone.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leukotype import bundle as fmt
from leukotype import catalog, paths
from leukotype.config import (
    Run,
    external_svm_feature_dirs,
    finetune_settings,
    frozen_features_prep,
    study_runs,
    svm_feature_dirs,
    svm_feature_layers,
    task_from_dict,
    weights_setting,
)
from leukotype.errors import LeukotypeError
from leukotype.io import provenance, read_json, read_tsv
from leukotype.preprocessing import variant_of

log = logging.getLogger(__name__)

#: Defaults of the config's ``export`` block (the schema holds the same values).
DEFAULT_METRIC = "balanced_accuracy"
DEFAULT_LOW_CONFIDENCE = 0.5


def _state_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 over names, shapes, dtypes and bytes of tensors (sorted by name)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        if hasattr(value, "detach"):
            value = value.detach().cpu().contiguous().numpy()
        value = np.ascontiguousarray(value)
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def random_backbone_digest(part: str, seed: int) -> str:
    """Fingerprint of the random-weight ``part`` built from ``seed`` (checked again on load)."""
    from leukotype.backbones import build_model, get_spec

    return _state_digest(build_model(get_spec(part), None, seed=seed).state_dict())


def _weights_record(
    config: Mapping[str, Any], part: str, copy_weights: bool, seed: int
) -> tuple[dict[str, Any], Path | None]:
    """The bundle's record of one backbone part's weights, and the file to copy (or None)."""
    from leukotype.weights import file_sha256, resolve_weights

    weights, sha256 = weights_setting(config, part)
    path = resolve_weights(part, weights, sha256=sha256, torch_home=config.get("torch_home"))
    record: dict[str, Any] = {"name": part, "weights": weights if weights in ("imagenet", "none") else "file"}
    if path is None:
        record.update({"seed": seed, "state_sha256": random_backbone_digest(part, seed), "copied": None})
        return record, None
    copy = copy_weights or weights not in ("imagenet", "none")  # a user's file is part of the model
    record.update(
        {
            "file_name": path.name,
            "sha256": file_sha256(path),
            "copied": f"{fmt.WEIGHTS_DIR}/{part}{''.join(path.suffixes)}" if copy else None,
        }
    )
    return record, path if copy else None


def _feature_meta(feature_dir: Path) -> dict[str, Any]:
    meta_path = feature_dir / "meta.json"
    return read_json(meta_path) if meta_path.is_file() else {}


def _load_finetuned_state(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def image_steps_record(results: Path, variant: Any, fitted_name: str | None = None) -> dict[str, Any] | None:
    """The bundle's record of a run's preprocessing variant: its steps and their fitted states
    (``preprocessing/<fitted_name>/state.json``: the run's fold's for a variant fitted per
    fold, :func:`leukotype.config.frozen_features_prep`; default the variant's own); None for
    ``none``."""
    if variant.is_identity:
        return None
    states = [None] * len(variant.steps)
    if variant.fitted:
        state_file = Path(paths.prep_state(str(results), fitted_name or variant.name))
        if not state_file.is_file():
            raise LeukotypeError(f"variant {variant.name!r} has no fitted state at {state_file}; finish the run first")
        states = read_json(state_file)["states"]
    return {"variant": variant.to_dict(), "states": states}


def tta_setting(config: Mapping[str, Any], test: Any) -> dict[str, Any]:
    """The bundle's test-time augmentation: the views the run's test images were scored under."""
    from leukotype.augment import TRANSFORMS

    enabled = bool(config.get("evaluation", {}).get("tta", False))
    views = set(test["transform"].astype(str)) if enabled else {"identity"}
    return {"enabled": enabled and len(views) > 1, "transforms": [t for t in TRANSFORMS if t in views]}


def export_run(
    results: str | os.PathLike,
    run: Run,
    out_dir: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    copy_weights: bool = False,
    low_confidence: float = DEFAULT_LOW_CONFIDENCE,
    ood_quantile: float = 0.99,
    few_shot: str | None = None,
) -> Path:
    """Write the bundle of ``run`` (a finished run under ``results``) to ``out_dir``.

    ``few_shot`` (an external set's name): the run's SVM as refitted with that set's labelled
    cells (``evaluation.external[].train_per_class``, rule ``adapt_external_svm``) instead of
    the run's own. Its training features, calibration and out-of-distribution model then
    include those cells, and its metrics are the few-shot record's: the set's other cells, and
    the run's internal test part on the shared classes.
    """
    from leukotype.calibration import fit_svm_calibration, identity_calibration
    from leukotype.classify import load_model
    from leukotype.feature_store import load_features
    from leukotype.ood import fit_ood
    from leukotype.report import model_display_name, technique_and_classifier
    from leukotype.stages import dataset_label, fold_parts

    results = Path(results)
    run_dir = results / run.path
    metrics_path = run_dir / paths.METRICS
    if not metrics_path.is_file():
        raise LeukotypeError(f"run {run.path} has no metrics.json under {results}; finish the run first")
    record = read_json(metrics_path)
    config = dict(config or record["provenance"]["config"])
    task_cfg = next((t for t in config["tasks"] if t["name"] == run.task), None)
    if task_cfg is None:
        raise LeukotypeError(f"task {run.task!r} is not in the run's config")
    task = task_from_dict(task_cfg)
    classes = list(task.classes)
    variant = variant_of(config, run.prep)
    # the run's fold's state and frozen features, for a variant fitted per fold (k-fold)
    frozen_prep = frozen_features_prep(config, run.prep, run.fold)
    # a variant that draws colour views trained on its own sample table
    samples = read_tsv(paths.samples_file(str(results), run.task, run.prep if variant.views else paths.NO_PREP))
    train, test = fold_parts(samples, run.fold)
    parts = list(catalog.parts(run.backbone))
    seed = int(config["split"]["seed"])
    writers: dict[str, Any] = {}

    # --- the classifier's input: which features, from where
    finetuned_model = Path(paths.finetune_file(str(results), paths.FINETUNED_MODEL, run.task, run.backbone, run.fold, run.prep))
    feature_dirs = [Path(d) for d in svm_feature_dirs(str(results), run.strategy, run.task, run.backbone, run.fold, run.prep, frozen_prep)]
    if run.strategy == "features_svm":
        # one layer per feature dir: a combination reads each part's penultimate layer
        feature_layer = svm_feature_layers(run.strategy, run.backbone, run.layer)
        settings: dict[str, Any] = {}
    else:
        feature_layer = paths.STRATEGY_LAYER["finetune_svm"]
        settings = finetune_settings(config, run.backbone)
    # Fine-tuning changed layers of the network (not only its head): the bundle carries them.
    trained_layers = run.strategy != "features_svm" and (
        settings["policy"] != "head" or catalog.is_from_scratch(run.backbone)
    )
    X_train = load_features(feature_dirs, feature_layer, train[["image_id", "transform"]])
    y_train = train["label"].astype(str).to_numpy()
    groups = train["group"].astype(str).to_numpy()
    adapted, sample_weight, lab = None, None, None
    if few_shot is not None:
        from leukotype.few_shot import NEW_LAB, TRAINING_LAB

        adapted = _few_shot_part(results, run, few_shot, feature_layer, frozen_prep)
        # the refit's own weights (shot_weight) and labs (shot_method augment), so that
        # calibration refits the same model
        weight = adapted["record"]["weight_per_shot"]
        if weight != 1.0:
            sample_weight = np.concatenate([np.ones(len(X_train)), np.full(adapted["n"], weight)])
        lab = np.repeat([TRAINING_LAB, NEW_LAB], [len(X_train), adapted["n"]])
        X_train = np.concatenate([X_train, adapted["X"]])
        y_train = np.concatenate([y_train, adapted["labels"]])
        groups = np.concatenate([groups, adapted["groups"]])

    part_records, copies = [], {}
    part_seed = int(settings.get("seed", 0)) if trained_layers else 0
    for part in parts:
        entry, source = _weights_record(config, part, copy_weights, part_seed)
        part_records.append(entry)
        if source is not None:
            copies[entry["copied"]] = source
    for rel, source in copies.items():
        writers[rel] = lambda target, source=source: shutil.copyfile(source, target)

    if trained_layers:
        state = _load_finetuned_state(finetuned_model)
        trained = {k: v for k, v in state.items() if k.startswith("trainable.")}
        frozen = {k: v for k, v in state.items() if k.startswith("frozen.")}
        feature_source = {
            "kind": "finetuned_network",
            "policy": settings["policy"],
            "seed": int(settings["seed"]),
            "precision": settings["precision"],
            "file": fmt.NETWORK_FILE,
            "frozen_sha256": _state_digest(frozen),
            "layer": feature_layer,
        }
        writers[fmt.NETWORK_FILE] = lambda target: fmt.save_tensors(trained, target)
    else:
        meta = _feature_meta(Path(paths.features_dir(str(results), parts[0], frozen_prep)))
        layer = run.layer if run.strategy == "features_svm" else catalog.penultimate_layer(run.backbone)
        layers = dict(catalog.part_layers(run.backbone, layer))
        feature_source = {
            "kind": "backbone",
            "layers": layers,
            "precision": meta.get("precision", config["features"]["precision"]),
            "optimize": bool(meta.get("optimized", config["features"].get("optimize", True))),
            "batch_size": int(meta.get("batch_size", config["features"]["batch_size"])),
        }
    feature_source["dim"] = int(X_train.shape[1])

    # --- classifier and calibration
    technique, classifier_name = technique_and_classifier(run.strategy)
    if run.strategy in ("features_svm", "finetune_svm"):
        model_path = run_dir / paths.SVM_MODEL if adapted is None else adapted["model"]
        pipeline = load_model(model_path)
        svm_params = pipeline.named_steps["svm"].get_params()
        calibration_path = run_dir / paths.CALIBRATION
        if calibration_path.is_file() and adapted is None:
            calibration = read_json(calibration_path)
        else:
            augmented = adapted is not None and adapted["record"]["shot_method"] == "augment"
            calibration = fit_svm_calibration(
                pipeline, X_train, y_train, groups, classes, cv_folds=config["svm"]["cv_folds"], seed=seed,
                sample_weight=sample_weight, lab=lab if augmented else None,
            )
        classifier = {
            "kind": "svm",
            "file": fmt.SVM_FILE,
            "description": (
                f"StandardScaler + SVM (kernel {svm_params['kernel']}, C {svm_params['C']}, gamma "
                f"{svm_params['gamma']}), chosen by grouped cross-validation on the training part"
                + ("" if adapted is None else f", refitted with {adapted['n']} labelled cells of {few_shot}")
            ),
        }
        writers[fmt.SVM_FILE] = lambda target: shutil.copyfile(model_path, target)
    else:
        state = _load_finetuned_state(finetuned_model)
        head = {"weight": state["head.weight"], "bias": state["head.bias"]}
        calibration_path = run_dir / paths.CALIBRATION
        calibration = (
            read_json(calibration_path)
            if calibration_path.is_file()
            else identity_calibration("not recalibrated: the run has no validation part to fit a temperature on")
        )
        classifier = {
            "kind": "softmax",
            "file": fmt.HEAD_FILE,
            "description": f"fine-tuned softmax head (policy {settings['policy']}, {settings['epochs']} epochs)",
        }
        writers[fmt.HEAD_FILE] = lambda target: fmt.save_tensors(head, target)

    # --- out-of-distribution model of the training features
    density = fit_ood(X_train, groups, quantile=ood_quantile, seed=seed)
    writers[fmt.OOD_FILE] = lambda target: fmt.save_tensors(density.arrays(), target)

    from leukotype.backbones import get_spec

    preprocessing = {part: fmt.preprocessing_steps(get_spec(part)) for part in parts}
    dataset_cfg = config["dataset"]
    spec = {
        "display_name": f"{technique} / {model_display_name(run.backbone, run.layer)}"
        + (f" + {classifier_name}" if classifier_name else ""),
        "task": {"name": task.name, "column": task.column, "classes": classes,
                 "derive": {k: list(v) for k, v in task.derive.items()} if task.derive else None},
        "classes": classes,
        "run": {"task": run.task, "strategy": run.strategy, "backbone": run.backbone,
                "layer": run.layer, "fold": run.fold, "prep": run.prep, "path": run.path},
        "backbone": {"name": run.backbone, "parts": part_records},
        "features": feature_source,
        "preprocessing": preprocessing,
        # the variant's steps before the backbone's preprocessing (crop, stain) and their
        # states fitted on the training part; `leukotype predict` / `explain` apply them
        "image_steps": image_steps_record(results, variant, frozen_prep),
        "classifier": classifier,
        "calibration": calibration,
        "thresholds": {"low_confidence": float(low_confidence)},
        "ood": {"method": "probabilistic-PCA Mahalanobis", "file": fmt.OOD_FILE,
                "threshold": density.threshold, "quantile": density.quantile,
                "n_components": int(len(density.variances))},
        "tta": tta_setting(config, test),
        "validation": {k: config["validation"].get(k) for k in fmt.VALIDATION_KEYS},
        "metrics": {k: record.get(k) for k in ("metrics", "ci", "ci_method", "n_test", "per_class")}
        if adapted is None else adapted["metrics"],
        "few_shot": None if adapted is None else adapted["record"],
        "training_data": {
            "name": dataset_label(dataset_cfg),
            "synthetic": dataset_cfg["source"] == "demo" or bool(dataset_cfg.get("synthetic")),
            "n_train_images": int(train["image_id"].nunique()) + (0 if adapted is None else adapted["n"]),
            "n_train_samples": int(len(train)),
            "n_test_images": int(test["image_id"].nunique()),
            "transforms": sorted(train["transform"].unique().tolist()),
            "split": {k: config["split"].get(k) for k in ("method", "test_size", "n_splits", "seed")},
        },
        "provenance": provenance(config=config, seed=seed),
    }
    if adapted is not None:
        spec["display_name"] += f", few-shot on {few_shot}"
    card = fmt.model_card(spec)
    out = fmt.write_bundle(out_dir, spec, writers, card)
    log.info("exported %s -> %s", run.path, out)
    return out


def _few_shot_part(
    results: Path, run: Run, ext: str, layers: str | Sequence[str], frozen_prep: str | None = None
) -> dict[str, Any]:
    """A few-shot run's refitted model, the external cells it trained on (features, labels,
    groups kept apart from the training data's) and its metrics, from its run folder."""
    from leukotype.external import LABEL, SHOT_STRATEGIES
    from leukotype.feature_store import load_features

    if run.strategy not in SHOT_STRATEGIES:
        raise LeukotypeError(f"--few-shot: run {run.path} is a {run.strategy} run; few-shot runs are SVM runs {list(SHOT_STRATEGIES)}")
    def file(name: str) -> Path:
        return Path(paths.external_run_file(str(results), name, run.task, run.strategy, run.backbone, run.layer,
                                            run.fold, ext, "shots", run.prep))

    record_path = file(paths.METRICS)
    if not record_path.is_file():
        raise LeukotypeError(
            f"--few-shot {ext}: {record_path} is missing; give the set train_per_class in "
            "evaluation.external and run the workflow first"
        )
    shots = read_tsv(file(paths.SHOTS))
    dirs = external_svm_feature_dirs(
        str(results), run.strategy, run.task, run.backbone, run.fold, ext, "none", run.prep, frozen_prep
    )
    index = shots[["image_id"]].assign(transform="identity")
    record = read_json(record_path)
    return {
        "model": file(paths.SVM_MODEL),
        "X": load_features([Path(d) for d in dirs], layers, index),
        "labels": shots[LABEL].astype(str).to_numpy(),
        "groups": np.asarray([f"{ext}:{g}" for g in shots["group"].astype(str)]),
        "n": int(len(shots)),
        "metrics": {
            "metrics": record["external_metrics"], "ci": record["external_ci"], "ci_method": record.get("ci_method"),
            "n_test": record["n_external"], "per_class": record.get("external_per_class"),
        },
        "record": {
            "external": ext, "shots_per_class": record["shots_per_class"], "n_scored": record["n_external"],
            "shared_classes": record["shared_classes"], "internal_metrics": record["internal_metrics"],
            "internal_ci": record.get("internal_ci"), "n_internal": record["n_internal"],
            "weight_per_shot": float(record.get("weight_per_shot", 1.0)),
            "shot_method": record.get("shot_method", "pooled"),
        },
    }


# --------------------------------------------------------------------------------------------
# choosing the run to export


def best_run(
    metrics_paths: Sequence[str | os.PathLike], metric: str = DEFAULT_METRIC
) -> tuple[Run, pd.DataFrame]:
    """The best (strategy, backbone, layer) of one task by the mean of ``metric`` over folds.

    Ties go to the higher accuracy, then to the first in the study's order. With k-fold the
    exported model is the configuration's first fold (each fold's model saw different data;
    the bundle states the fold). Returns the run and the ranking table.
    """
    rows = []
    for order, path in enumerate(metrics_paths):
        record = read_json(path)
        value = record["metrics"].get(metric)
        if metric not in record["metrics"]:
            raise LeukotypeError(
                f"export.metric {metric!r} is not a run metric; choose one of {sorted(record['metrics'])}"
            )
        rows.append(
            {
                "order": order,
                "task": record["task"],
                "strategy": record["strategy"],
                "backbone": record["backbone"],
                "layer": record["layer"],
                "fold": record["fold"],
                "prep": str(record.get("prep") or paths.NO_PREP),
                metric: np.nan if value is None else float(value),
                "accuracy_tiebreak": float(record["metrics"].get("accuracy") or 0.0),
            }
        )
    if not rows:
        raise LeukotypeError("no finished runs to choose a model from")
    frame = pd.DataFrame(rows)
    keys = ["task", "strategy", "backbone", "layer", "prep"]
    ranking = (
        frame.groupby(keys, sort=False)
        .agg(score=(metric, "mean"), accuracy=("accuracy_tiebreak", "mean"), order=("order", "min"),
             first_fold=("fold", "min"), n_folds=("fold", "nunique"))
        .reset_index()
        .sort_values(["score", "accuracy", "order"], ascending=[False, False, True], kind="stable")
        .reset_index(drop=True)
    )
    best = ranking.iloc[0]
    return Run(best["task"], best["strategy"], best["backbone"], best["layer"], best["first_fold"], best["prep"]), ranking


def task_runs(config: Mapping[str, Any], task: str) -> list[Run]:
    return [run for run in study_runs(config) if run.task == task]


def run_export_best(
    results: str | os.PathLike,
    config: Mapping[str, Any],
    task: str,
    out_dir: str | os.PathLike,
) -> Path:
    """Export the best run of ``task`` by ``config['export']['metric']`` into ``out_dir``."""
    export_cfg = config.get("export", {}) or {}
    results = Path(results)
    metrics = [results / run.path / "metrics.json" for run in task_runs(config, task)]
    run, ranking = best_run(metrics, export_cfg.get("metric", DEFAULT_METRIC))
    log.info("ranking by %s:\n%s", export_cfg.get("metric", DEFAULT_METRIC), ranking.to_string())
    return export_run(
        results,
        run,
        out_dir,
        config=config,
        copy_weights=bool(export_cfg.get("copy_weights", False)),
        low_confidence=float(export_cfg.get("low_confidence", DEFAULT_LOW_CONFIDENCE)),
        ood_quantile=float(export_cfg.get("ood_quantile", 0.99)),
    )

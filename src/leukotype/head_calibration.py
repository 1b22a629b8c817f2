"""Temperature scaling for fine-tuned softmax heads, fitted on the training part only.

- With a validation part (``finetune.val_fraction > 0``) the temperature is fitted on the
  trained head's logits of the validation samples (never used for its weights).
- Without one, for the ``head`` policy (every backbone layer frozen, so the head's input does
  not depend on the labels), the head is retrained the same way (same settings and seed) on
  grouped inner folds of the training part, and the temperature is fitted on those heads'
  out-of-fold logits: the ``CalibratedClassifierCV(ensemble=False)`` recipe for a softmax head.
- Otherwise (layers fine-tuned, e.g. the paper CNN trained from scratch, and no validation
  part) a calibration slice of the training part (``finetune.calibration_fraction`` of its
  groups, every class, :func:`calibration_slice`) is held out from the gradient steps and the
  temperature is fitted on the trained network's logits of it. Only where no slice can be
  held out (fraction 0, early stopping, too few groups) the probabilities stay as trained
  (``T = 1``, with the reason recorded).

The test part is never used to fit anything.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from leukotype.calibration import fit_temperature, identity_calibration, negative_log_likelihood, softmax

log = logging.getLogger(__name__)


def _logits(head: Any, X: np.ndarray) -> np.ndarray:
    weight = head.weight.detach().cpu().numpy().astype(np.float64)
    bias = head.bias.detach().cpu().numpy().astype(np.float64)
    return np.asarray(X, dtype=np.float64) @ weight.T + bias


def calibration_slice(train_rows: Any, cfg: Any, trains_layers: bool) -> tuple[np.ndarray | None, str]:
    """(True = held out for calibration, per training row) or (None, why there is none; empty
    where none is needed).

    Only for a run with no validation part whose network layers train (a frozen backbone's head
    is calibrated out of fold on all training rows instead). The slice is group-aware and
    stratified (:func:`leukotype.split.carve_validation`, seeded by ``cfg.seed``) and is used
    for nothing else: no gradient step, no early stopping, no model selection.
    """
    from leukotype.errors import LeukotypeError
    from leukotype.split import carve_validation

    if cfg.val_fraction > 0 or not trains_layers:
        return None, ""
    if cfg.calibration_fraction <= 0:
        return None, "finetune.calibration_fraction is 0"
    if cfg.early_stopping_patience is not None:
        return None, "early stopping needs a validation part (set finetune.val_fraction > 0)"
    try:
        return carve_validation(train_rows, cfg.calibration_fraction, cfg.seed), ""
    except LeukotypeError as error:
        return None, f"no calibration slice could be held out ({error})"


def _record(scores: np.ndarray, labels: np.ndarray, fitted_on: str) -> dict[str, Any]:
    from leukotype.calibration import expected_calibration_error

    temperature = fit_temperature(scores, labels)
    return {
        "method": "temperature",
        "temperature": temperature,
        "scores": "softmax head logits",
        "fitted_on": fitted_on,
        "n": int(len(labels)),
        "nll_before": negative_log_likelihood(scores, labels, 1.0),
        "nll_after": negative_log_likelihood(scores, labels, temperature),
        "ece_out_of_fold": expected_calibration_error(softmax(scores, temperature), labels),
    }


def out_of_fold_head_logits(
    features: np.ndarray, labels: np.ndarray, groups: Sequence[str], num_classes: int, cfg: Any, cv_folds: int = 3
) -> np.ndarray:
    """Logits of each training row from a head trained (like the run's) without its group."""
    from torch import nn

    from leukotype.classify import make_inner_cv
    from leukotype.finetune import ActivationCache, FinetuneModel, fit, seeded_head

    cfg = dataclasses.replace(cfg, early_stopping_patience=None, val_fraction=0.0)
    labels = np.asarray(labels, dtype=np.int64)
    splitter = make_inner_cv(labels.astype(str), np.asarray(groups).astype(str), cv_folds=cv_folds, seed=cfg.seed)
    scores = np.full((len(labels), num_classes), np.nan)
    for fit_rows, val_rows in splitter.split(features, labels.astype(str), np.asarray(groups).astype(str)):
        head = seeded_head(features.shape[1], num_classes, cfg.seed)
        model = FinetuneModel(nn.Identity(), nn.Sequential(), head)
        fit(model, ActivationCache(np.ascontiguousarray(features[fit_rows], dtype=np.float32)),
            labels[fit_rows].tolist(), cfg)
        scores[val_rows] = _logits(head, features[val_rows])
    return scores


def fit_head_calibration(
    head: Any,
    cfg: Any,
    features: np.ndarray,
    feature_index: Any,
    samples: Any,
    train_groups: Sequence[str],
    frozen_features: bool,
    held_out: str = "validation",
    no_slice_reason: str = "",
) -> dict[str, Any]:
    """The calibration record of a fine-tuning run (see the module doc).

    ``features``/``feature_index``: the job's head-input features of every sample (train, val,
    test); ``samples``: its ``FoldSamples``, whose ``val`` part is the validation part or
    (``held_out="calibration"``) the calibration slice; ``train_groups``: the group of each
    training sample; ``frozen_features``: whether the head's input is the frozen backbone's
    (policy ``head``); ``no_slice_reason``: why no calibration slice was held out.
    """
    import pandas as pd

    position = pd.Series(np.arange(len(feature_index)), index=pd.MultiIndex.from_frame(feature_index[["image_id", "transform"]]))

    def rows(part: Any) -> np.ndarray:
        keys = pd.MultiIndex.from_frame(part.index_frame())
        return features[position.loc[keys].to_numpy()]

    if samples.val is not None and len(samples.val):
        labels = np.asarray(samples.val.labels)
        what = (
            f"the {len(labels)} samples of a calibration slice (whole groups of the training part, "
            "held out from every gradient step; test part never used)"
            if held_out == "calibration"
            else f"the {len(labels)} validation samples (carved from the training part)"
        )
        record = _record(_logits(head, rows(samples.val)), labels, f"logits of {what}")
        record["held_out"] = held_out
        record["image_ids"] = sorted(set(samples.val.index_frame()["image_id"].astype(str)))
        return record
    if frozen_features:
        labels = np.asarray(samples.train.labels)
        scores = out_of_fold_head_logits(rows(samples.train), labels, train_groups, head.out_features, cfg)
        return _record(scores, labels, (
            f"out-of-fold logits of {len(labels)} training rows from heads retrained on grouped "
            "inner folds of the training part (test part never used)"))
    return identity_calibration(
        "not recalibrated: fine-tuned layers and no validation part"
        + (f"; {no_slice_reason}" if no_slice_reason else "")
        + " (set finetune.val_fraction or finetune.calibration_fraction > 0)"
    )


def calibrate_prediction_table(predictions: Any, classes: Sequence[str], temperature: float) -> Any:
    """``prob_`` columns of a softmax prediction table recomputed at ``temperature``."""
    columns = [f"prob_{c}" for c in classes]
    probabilities = predictions[columns].to_numpy(dtype=np.float64)
    log_p = np.log(np.clip(probabilities, 1e-300, None))  # = logits - logsumexp(logits)
    table = predictions.copy()
    table[columns] = softmax(log_p, temperature)
    return table

"""One fine-tuning job: train on a fold's samples, predict its test part, and compute the
fine-tuned features of every sample (for ``finetune_svm``).

Where the frozen part ends at a layer the extraction job already stored (the ``head`` policy:
every pretrained layer frozen), :func:`train_head_on_features` trains the head on those stored
features and predicts from them: no image is decoded and no backbone runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from leukotype.errors import LeukotypeError

from .cache import ActivationCache
from .model import FinetuneModel
from .outputs import (
    check_classes,
    collect_from_activations,
    finetuned_features,
    predict,
    prediction_frame,
    softmax,
)
from .samples import FoldSamples, Samples
from .settings import FinetuneConfig
from .training import TrainResult, fit, train

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    """What a fine-tuning job writes: the training outcome, the test predictions
    (``image_id, transform, true, pred, prob_<class>...``) and the fine-tuned features of every
    sample (rows in ``feature_index`` order: train, val, test)."""

    train: TrainResult
    predictions: pd.DataFrame
    features: np.ndarray
    feature_index: pd.DataFrame


def finetune_fold(
    model: FinetuneModel,
    preprocess: Callable[[Any], Any],
    samples: FoldSamples,
    classes: Sequence[str],
    cfg: FinetuneConfig,
    *,
    checkpoint_dir: str | Path | None = None,
) -> JobResult:
    """Train ``model`` on ``samples.train`` (early stopping on ``samples.val``), predict
    ``samples.test`` and compute the fine-tuned features of every sample, from images."""
    check_classes(model, classes)
    result = train(
        model,
        samples.train,
        cfg,
        preprocess=preprocess,
        val_samples=samples.val,
        checkpoint_dir=checkpoint_dir,
    )
    inference = {
        "batch_size": cfg.batch_size,
        "device": cfg.device,
        "precision": cfg.precision,
        "num_workers": cfg.num_workers,
    }
    predictions = predict(result.model, samples.test, preprocess, classes, **inference)
    every = samples.all()
    features = finetuned_features(result.model, every, preprocess, **inference)
    return JobResult(result, predictions, features, every.index_frame())


def train_head_on_features(
    model: FinetuneModel,
    samples: FoldSamples,
    classes: Sequence[str],
    cfg: FinetuneConfig,
    *,
    feature_dirs: Sequence[str | Path],
    layer: str,
    checkpoint_dir: str | Path | None = None,
) -> JobResult:
    """Train ``model.head`` on the stored ``layer`` features of ``feature_dirs`` (one folder per
    part of a combined backbone, columns concatenated) and predict from them.

    Valid where every pretrained layer is frozen (the ``head`` policy): those features are then
    exactly the head's input. The head module is shared, so ``model`` is the trained network
    afterwards; the fine-tuned features are the stored ones.
    """
    from leukotype.feature_store import load_features

    if any(True for _ in model.trainable.parameters()):
        raise LeukotypeError(
            "train_head_on_features trains only a head: every backbone layer must be frozen "
            "(freeze policy 'head')"
        )
    check_classes(model, classes)
    dirs = [Path(d) for d in feature_dirs]

    def stored(part: Samples) -> ActivationCache:
        return ActivationCache(load_features(dirs, layer, part.index_frame()))

    head_only = FinetuneModel(nn.Identity(), nn.Sequential(), model.head)
    val = samples.val if samples.val is not None and len(samples.val) else None
    result = fit(
        head_only,
        stored(samples.train),
        samples.train.labels,
        cfg,
        val_data=stored(val) if val is not None else None,
        val_labels=val.labels if val is not None else None,
        checkpoint_dir=checkpoint_dir,
        data_key=f"cached:{layer}:{samples.train.key()}:{val.key() if val is not None else ''}",
    )
    logits = collect_from_activations(
        head_only.logits_from_trunk,
        head_only,
        [stored(samples.test)],
        batch_size=cfg.batch_size,
        device=cfg.device,
        precision="fp32",
    )
    every = samples.all()
    features = load_features(dirs, layer, every.index_frame())
    predictions = prediction_frame(samples.test, softmax(logits), classes)
    return JobResult(result, predictions, features, every.index_frame())

"""One fine-tuning job: train on a fold's samples, predict its test part, and compute the
fine-tuned features of every sample (for ``finetune_svm``).

Where the frozen part ends at a layer the extraction job already stored (the ``head`` policy:
every pretrained layer frozen), :func:`train_head_on_features` trains the head on those stored
features and predicts from them: no image is decoded and no backbone runs.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from leukotype.allocator import keep_freed_memory
from leukotype.errors import LeukotypeError

from leukotype.runtime import (
    deterministic_algorithms,
    resolve_device,
    sequential_batches,
    torch_threads,
)

from .cache import (
    ActivationCache,
    PatchedActivations,
    compute_activation_cache,
    inputs_fit_in_memory,
)
from .checkpoint import run_fingerprint
from .model import FinetuneModel
from .outputs import (
    check_classes,
    collect_from_activations,
    finetuned_features,
    predict,
    prediction_frame,
    softmax,
)
from .probe import probe_head
from .samples import FoldSamples, Samples, digest
from .settings import FinetuneConfig
from .training import TrainResult, fit, samples_data_key, train

log = logging.getLogger(__name__)

#: Sub-folder of the checkpoint dir holding a job's frozen activations (removed when done).
ACTIVATIONS_DIR = "activations"


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
    ``samples.test`` and compute the fine-tuned features of every sample.

    The frozen part runs once per sample of the job (train, val, test, every transform):
    training, predictions and features all read those activations and run only the trainable
    layers (:func:`fold_activations`; the samples of a part's batches that are not batches of
    the whole job -- a part's last, partial batch; a validation or test part that does not
    start on a batch boundary -- are computed a second time, so that every value is what the
    two-pass path computes). The results are bit-identical on CPU to
    :func:`finetune_fold_from_images`, which is used instead where activations are not cached
    (``fast_path`` off; nothing frozen and the inputs above ``fast_path_memory_mb``).
    """
    check_classes(model, classes)
    keep_freed_memory()  # every batch frees activations and gradients the next one reallocates
    if not _caches_activations(cfg, model, preprocess, samples):
        return finetune_fold_from_images(
            model, preprocess, samples, classes, cfg, checkpoint_dir=checkpoint_dir
        )
    cache_dir = Path(checkpoint_dir) / ACTIVATIONS_DIR if checkpoint_dir is not None else None
    t0 = time.perf_counter()
    activations = fold_activations(model, preprocess, samples, cfg, cache_dir=cache_dir)
    cache_seconds = time.perf_counter() - t0
    log.info("frozen activations of %d samples in %.1f s", len(samples.all()), cache_seconds)
    val = samples.val if "val" in activations else None
    probe = _probe_head_from(
        cfg,
        model,
        samples.train,
        lambda: collect_from_activations(
            model.features_from_trunk,
            model,
            activations["train"],
            batch_size=cfg.batch_size,
            device=cfg.device,
            precision=cfg.precision,
        ),
    )
    result = fit(
        model,
        activations["train"],
        samples.train.labels,
        cfg,
        val_data=activations.get("val"),
        val_labels=val.labels if val is not None else None,
        checkpoint_dir=checkpoint_dir,
        data_key=samples_data_key(samples.train, val),
    )
    result.cache_seconds = cache_seconds
    result.head_init = probe
    job = _outputs_from_activations(result, activations, samples, classes, cfg, cfg.precision)
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)  # GBs; a finished job no longer needs them
    return job


def finetune_fold_from_images(
    model: FinetuneModel,
    preprocess: Callable[[Any], Any],
    samples: FoldSamples,
    classes: Sequence[str],
    cfg: FinetuneConfig,
    *,
    checkpoint_dir: str | Path | None = None,
) -> JobResult:
    """:func:`finetune_fold` in two passes: ``train`` (which caches only the training
    samples' activations), then predictions and features by full forwards from the images."""
    check_classes(model, classes)
    keep_freed_memory()
    inference = {
        "batch_size": cfg.batch_size,
        "device": cfg.device,
        "precision": cfg.precision,
        "num_workers": cfg.num_workers,
    }
    probe = _probe_head_from(
        cfg,
        model,
        samples.train,
        lambda: finetuned_features(model, samples.train, preprocess, **inference),
    )
    result = train(
        model,
        samples.train,
        cfg,
        preprocess=preprocess,
        val_samples=samples.val,
        checkpoint_dir=checkpoint_dir,
    )
    result.head_init = probe
    predictions = predict(result.model, samples.test, preprocess, classes, **inference)
    every = samples.all()
    features = finetuned_features(result.model, every, preprocess, **inference)
    return JobResult(result, predictions, features, every.index_frame())


def _probe_head_from(
    cfg: FinetuneConfig,
    model: FinetuneModel,
    train: Samples,
    pretrained_features: Callable[[], np.ndarray],
) -> dict[str, Any]:
    """With ``head_init: probe``, set the head to a linear probe on the training samples'
    pretrained features (computed only then) before the first gradient step. The probe is
    deterministic, so a resumed run rebuilds the same initial state and its fingerprint."""
    if cfg.head_init != "probe":
        return {"head_init": cfg.head_init}
    with torch_threads(cfg.threads):
        record = probe_head(
            model,
            np.asarray(pretrained_features(), dtype=np.float64),
            train.labels,
            class_weighted=cfg.class_weighted,
            seed=cfg.seed,
        )
    log.info("head set to a linear probe: %s", record)
    return record


def _caches_activations(
    cfg: FinetuneConfig, model: FinetuneModel, preprocess: Callable[[Any], Any], samples: FoldSamples
) -> bool:
    """Frozen activations are cached whenever something is frozen; with nothing frozen the
    inputs themselves are, when all of the job's fit the memory budget (RAM only)."""
    if not cfg.fast_path:
        return False
    if model.has_frozen_part:
        return True
    every = samples.all()
    return inputs_fit_in_memory([(every.dataset(preprocess), len(every))], cfg.memory_limit_bytes)


def fold_activations(
    model: FinetuneModel,
    preprocess: Callable[[Any], Any],
    samples: FoldSamples,
    cfg: FinetuneConfig,
    *,
    cache_dir: Path | None = None,
) -> dict[str, ActivationCache]:
    """The frozen part's output for every sample of the job: ``all`` (every sample, train then
    val then test) and one view per part (``train``, ``val``, ``test``).

    A frozen layer's output for a sample can depend, in its last bits, on the other samples of
    its batch (CPU kernels pick their blocking by batch size). ``all`` is computed in the
    sequential batches that a full forward over every sample uses (the fine-tuned features');
    each part's view holds what its own sequential batches give (training, validation and
    predictions run over their part alone): where a part's batch is also a batch of ``all`` its
    rows are shared, and only the samples of the other batches (a part's last, partial batch,
    and a part that starts off a batch boundary) are computed a second time. So every value
    equals the two-pass path's bit for bit on CPU.

    Caches share one memory budget (``fast_path_memory_mb``): above it they stay memmaps. With
    ``cache_dir`` (and a frozen part) they are files there, fingerprinted, so a resumed job
    reuses them; nothing-frozen caches (the inputs) stay in RAM.
    """
    device = resolve_device(cfg.device)
    parts = {name: part for name, part in samples.parts().items() if len(part)}
    every = Samples.concat(list(parts.values()))
    n, batch_size = len(every), cfg.batch_size
    bounds, start = {}, 0
    for name, part in parts.items():
        bounds[name] = (start, start + len(part))
        start += len(part)
    # Batches of a part that are not batches of the whole: computed again, in that composition.
    repeated = []
    for lo, hi in bounds.values():
        for batch in sequential_batches(hi - lo, batch_size):
            first, stop = lo + int(batch[0]), lo + int(batch[-1]) + 1
            if not (first % batch_size == 0 and stop == min(first + batch_size, n)):
                repeated.append(batch + lo)
    val = samples.val if "val" in parts else None
    key = digest(
        [
            run_fingerprint(
                cfg,
                model,
                samples.train.labels or (),
                val.labels if val is not None else None,
                samples_data_key(samples.train, val),
            ),
            samples.test.key(),
        ]
    )
    common = dict(
        batch_size=batch_size,
        device=device,
        precision=cfg.precision,
        num_workers=cfg.num_workers,
        cache_dir=cache_dir if model.has_frozen_part else None,
        fingerprint=key,
    )
    with torch_threads(cfg.threads), deterministic_algorithms(device):
        model.to(device)
        whole = compute_activation_cache(
            model,
            every.dataset(preprocess),
            n,
            memory_limit_bytes=cfg.memory_limit_bytes,
            name="all",
            **common,
        )
        patch, patch_rows = None, np.full(n, -1, dtype=np.int64)
        if repeated:
            rows = torch.cat(repeated)
            offsets = np.cumsum([0] + [len(b) for b in repeated])
            patch = compute_activation_cache(
                model,
                every.take(rows.tolist()).dataset(preprocess),
                len(rows),
                memory_limit_bytes=max(cfg.memory_limit_bytes - whole.in_memory_bytes, 0),
                name="repeated",
                batches=[torch.arange(offsets[k], offsets[k + 1]) for k in range(len(repeated))],
                **common,
            )
            patch_rows[rows.numpy()] = np.arange(len(rows))
    views: dict[str, ActivationCache] = {"all": whole}
    for name, (lo, hi) in bounds.items():
        views[name] = PatchedActivations(whole, lo, hi, patch, patch_rows[lo:hi])
    return views


def _outputs_from_activations(
    result: TrainResult,
    activations: dict[str, ActivationCache],
    samples: FoldSamples,
    classes: Sequence[str],
    cfg: FinetuneConfig,
    precision: str,
) -> JobResult:
    """Test predictions and every sample's fine-tuned features from the frozen activations,
    in the batches a full forward over those samples would use."""
    model = result.model
    common = {"batch_size": cfg.batch_size, "device": cfg.device, "precision": precision}
    with torch_threads(cfg.threads):
        logits = collect_from_activations(
            model.logits_from_trunk, model, activations["test"], **common
        )
        features = collect_from_activations(
            model.features_from_trunk, model, activations["all"], **common
        )
    every = samples.all()
    predictions = prediction_frame(samples.test, softmax(logits), classes)
    return JobResult(result, predictions, features, every.index_frame())


def train_head_on_features(
    model: FinetuneModel,
    samples: FoldSamples,
    classes: Sequence[str],
    cfg: FinetuneConfig,
    *,
    feature_dirs: Sequence[str | Path],
    layer: str | Sequence[str],
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
    probe = _probe_head_from(cfg, head_only, samples.train, lambda: stored(samples.train).array)
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
        stored(samples.test),
        batch_size=cfg.batch_size,
        device=cfg.device,
        precision="fp32",
    )
    result.head_init = probe
    every = samples.all()
    features = load_features(dirs, layer, every.index_frame())
    predictions = prediction_frame(samples.test, softmax(logits), classes)
    return JobResult(result, predictions, features, every.index_frame())

"""Fine-tuning: freeze policies, training loop, checkpoint/resume, frozen-layer fast path.

One job per module:

- :mod:`.settings` -- ``FinetuneConfig`` (hyper-parameters, validated) and the valid choices;
- :mod:`.samples` -- ``Samples`` ((image, transform) samples with labels), ``FoldSamples``;
- :mod:`.model` -- freeze policies over a backbone's stages, ``FinetuneModel``
  (frozen -> trainable -> head), ``build_finetune_model``;
- :mod:`.cache` -- the frozen part's outputs computed once (RAM, or a memmap above a budget);
- :mod:`.checkpoint` -- what a resumable run stores and the fingerprint it must match;
- :mod:`.training` -- ``fit`` (the SGD loop, resumable after every epoch) and ``train``;
- :mod:`.outputs` -- probabilities, prediction tables, fine-tuned features, model files;
- :mod:`.job` -- one workflow job: train, predict the test part, features of every sample;
  ``train_head_on_features`` for the ``head`` policy, on the extraction job's stored features.

Device, precision, threads, determinism and image decoding come from :mod:`leukotype.runtime`,
shared with feature extraction.
"""

from __future__ import annotations

from .cache import (
    ActivationCache,
    compute_activation_cache,
    remove_activation_cache,
)
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME, model_digest, run_fingerprint
from .job import JobResult, finetune_fold, train_head_on_features
from .model import (
    CombinedPreprocess,
    FinetuneModel,
    ParallelTrunks,
    build_finetune_model,
    check_policy,
    freeze,
    seeded_head,
    split_stages,
    valid_policies,
)
from .outputs import (
    FINETUNED_LAYER,
    finetuned_features,
    load_finetuned,
    predict,
    predict_proba,
    prediction_frame,
    save_finetuned,
    write_finetuned_features,
)
from .samples import FoldSamples, Samples
from .settings import EXECUTION_ONLY_FIELDS, POLICIES, PRECISIONS, SCHEDULES, FinetuneConfig
from .training import (
    HISTORY_COLUMNS,
    TrainResult,
    class_weights,
    derived_seed,
    epoch_batches,
    fit,
    history_frame,
    lr_at,
    train,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "EXECUTION_ONLY_FIELDS",
    "FINETUNED_LAYER",
    "HISTORY_COLUMNS",
    "POLICIES",
    "PRECISIONS",
    "SCHEDULES",
    "ActivationCache",
    "CombinedPreprocess",
    "FinetuneConfig",
    "FinetuneModel",
    "FoldSamples",
    "JobResult",
    "ParallelTrunks",
    "Samples",
    "TrainResult",
    "build_finetune_model",
    "check_policy",
    "class_weights",
    "compute_activation_cache",
    "derived_seed",
    "epoch_batches",
    "finetune_fold",
    "finetuned_features",
    "fit",
    "freeze",
    "history_frame",
    "load_finetuned",
    "lr_at",
    "model_digest",
    "predict",
    "predict_proba",
    "prediction_frame",
    "remove_activation_cache",
    "run_fingerprint",
    "save_finetuned",
    "seeded_head",
    "split_stages",
    "train",
    "train_head_on_features",
    "valid_policies",
    "write_finetuned_features",
]

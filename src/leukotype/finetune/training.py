"""The training loop: SGD over the trainable layers and the head, resumable after every epoch.

The fast path (``fast_path=True`` and a non-empty frozen part) trains on the frozen part's
outputs computed once (:mod:`leukotype.finetune.cache`); the ordinary path runs the full
forward every epoch with the frozen part under ``no_grad``/eval. Both paths draw the same
batches in the same order and seed dropout identically, so with the same seed they give the
same model up to float noise (the frozen part sees the samples in differently composed
batches). With nothing frozen (the paper CNN trained from scratch) the fast path caches the
preprocessed input tensors instead, when they fit in ``fast_path_memory_mb`` of RAM: decoding
and resizing each image once rather than once per epoch, which on a small network costs as much
as the training step. Inputs are a deterministic function of (image, transform), so this gives
the same model bit for bit.

Randomness: the batch order of epoch ``e`` comes from a ``torch.Generator`` seeded with a value
derived from ``(cfg.seed, e)``; the global RNG (used by dropout) is forked and re-seeded from
``(cfg.seed, e)`` for each epoch, so the caller's global RNG state is left untouched and a
resumed run needs no stored RNG state to continue exactly. The learning-rate schedule is a
pure function of the epoch index.

Determinism: on CPU a run and an interrupted-then-resumed run give bit-identical models. On GPU
``leukotype.runtime.deterministic_algorithms`` holds for the duration of training; operations
without a deterministic CUDA kernel (e.g. some atomic-add based backward passes such as adaptive
pooling / index_add, and cuBLAS unless ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is set before CUDA
starts) only warn, so GPU runs are reproducible up to float noise, not bit for bit. bf16
autocast (``precision="bf16"``) changes results at the bf16 rounding level; cached activations
are always stored as float32.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from leukotype.errors import LeukotypeError
from leukotype.runtime import (
    autocast,
    deterministic_algorithms,
    fork_rng,
    resolve_device,
    sample_loader,
    sequential_batches,
    to_device,
    torch_threads,
)

from .cache import (
    ActivationCache,
    compute_activation_cache,
    inputs_fit_in_memory,
    remove_activation_cache,
)
from .checkpoint import (
    CHECKPOINT_NAME,
    TrainingState,
    load_checkpoint,
    restore,
    run_fingerprint,
    save_checkpoint,
)
from .model import FinetuneModel
from .samples import Samples, digest
from .settings import FinetuneConfig

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")

# Independent random streams derived from (seed, epoch).
_SHUFFLE_STREAM, _DROPOUT_STREAM = 0, 1


# --------------------------------------------------------------------------------------------
# Small pure helpers


def class_weights(
    labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Balanced class weights ``n / (k * n_c)`` (scikit-learn's ``class_weight="balanced"``)."""
    labels_arr = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels_arr, minlength=num_classes)[:num_classes]
    absent = [int(c) for c in np.flatnonzero(counts == 0)]
    if absent:
        raise LeukotypeError(
            f"class-weighted loss: class index(es) {absent} have no training samples; "
            "check the split or set class_weighted: false"
        )
    return torch.as_tensor(len(labels_arr) / (num_classes * counts), dtype=torch.float32)


def lr_at(cfg: FinetuneConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: constant, or cosine from ``lr`` towards 0 per epoch."""
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))


def derived_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one epoch's random stream, independent across (seed, epoch, stream)."""
    return int(
        np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0]
        >> np.uint64(1)
    )


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Shuffled index batches of one epoch; a final batch of one joins the previous batch.

    (A one-sample batch would make BatchNorm fail in training mode.)
    """
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch, _SHUFFLE_STREAM))
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        single = batches.pop()
        batches[-1] = torch.cat([batches[-1], single])
    return batches


def history_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Per-epoch history as a DataFrame with columns ``HISTORY_COLUMNS`` (epoch is 1-based)."""
    return pd.DataFrame(list(records), columns=list(HISTORY_COLUMNS))


# --------------------------------------------------------------------------------------------
# Where a batch's frozen-part output comes from


class _Source:
    """Yields (sample index, frozen-part output) batches: from the cache or a full forward."""

    def __init__(
        self,
        model: FinetuneModel,
        device: torch.device,
        precision: str,
        num_workers: int,
        data: Dataset | None = None,
        cache: ActivationCache | None = None,
    ) -> None:
        self.model, self.device = model, device
        self.precision, self.num_workers = precision, num_workers
        self.data, self.cache = data, cache

    def batches(
        self, batches: Sequence[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.cache is not None:
            for index in batches:
                yield index, self.cache.take(index).to(self.device, non_blocking=True)
            return
        for x, index in sample_loader(self.data, batches, self.num_workers):
            with torch.no_grad(), autocast(self.device, self.precision):
                h = self.model.trunk(to_device(x, self.device))
            # Same dtype as the cache so both paths feed the trainable part identically.
            yield torch.as_tensor(index), h.float() if self.model.has_frozen_part else h


def _make_source(
    model: FinetuneModel,
    cfg: FinetuneConfig,
    device: torch.device,
    use_fast: bool,
    cache_dir: Path | None,
    fingerprint: str,
    data: Dataset | ActivationCache,
    n: int,
    name: str,
) -> _Source:
    """Cached frozen activations (fast path) or full forwards over ``data``.

    ``data`` may already be an :class:`ActivationCache` (frozen outputs computed by the caller,
    e.g. once for a whole fine-tuning job): it is then trained on as it is.
    """
    common = dict(device=device, precision=cfg.precision, num_workers=cfg.num_workers)
    if isinstance(data, ActivationCache):
        return _Source(model, cache=data, **common)
    if not use_fast:
        return _Source(model, data=data, **common)
    cache = compute_activation_cache(
        model,
        data,
        n,
        name=name,
        batch_size=cfg.batch_size,
        memory_limit_bytes=cfg.memory_limit_bytes,
        # Cached inputs (nothing frozen) are cheap to recompute: RAM only, never a file.
        cache_dir=cache_dir if model.has_frozen_part else None,
        fingerprint=fingerprint,
        **common,
    )
    return _Source(model, cache=cache, **common)


# --------------------------------------------------------------------------------------------
# One epoch


def _train_epoch(
    model: FinetuneModel,
    source: _Source,
    labels: torch.Tensor,
    batches: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
    precision: str,
) -> tuple[float, float]:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for index, h in source.batches(batches):
        y = labels[index].to(device)
        with autocast(device, precision):
            logits = model.logits_from_trunk(h)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(index)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(index)
    return total_loss / seen, correct / seen


def _evaluate(
    model: FinetuneModel,
    source: _Source,
    labels: torch.Tensor,
    batch_size: int,
    criterion: nn.Module,
    device: torch.device,
    precision: str,
) -> tuple[float, float]:
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for index, h in source.batches(sequential_batches(len(labels), batch_size)):
            y = labels[index].to(device)
            with autocast(device, precision):
                logits = model.logits_from_trunk(h)
            total_loss += float(criterion(logits.float(), y)) * len(index)
            correct += int((logits.argmax(1) == y).sum())
    return total_loss / len(labels), correct / len(labels)


def _update_early_stopping(
    state: TrainingState, model: FinetuneModel, val_loss: float, patience: int | None
) -> None:
    """Track the lowest validation loss; keep that epoch's weights; flag a stop after
    ``patience`` epochs without improvement."""
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_epoch, state.bad_epochs = float(val_loss), state.epoch, 0
        if patience is not None:
            state.best_state = model.trainable_state()
    else:
        state.bad_epochs += 1
        if patience is not None and state.bad_epochs >= patience:
            state.stopped_early = True


@dataclass
class _Run:
    """What every epoch of one ``fit`` call uses."""

    model: FinetuneModel
    cfg: FinetuneConfig
    device: torch.device
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    train_labels: torch.Tensor
    val_labels: torch.Tensor | None
    checkpoint: Path | None
    fingerprint: str
    train_source: _Source | None = None
    val_source: _Source | None = None

    def run_epoch(self, state: TrainingState) -> dict[str, Any]:
        """Train one epoch, validate, update the state, checkpoint; the history record."""
        cfg, model, epoch = self.cfg, self.model, state.epoch
        lr = lr_at(cfg, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        with fork_rng(self.device):
            torch.manual_seed(derived_seed(cfg.seed, epoch, _DROPOUT_STREAM))
            batches = epoch_batches(len(self.train_labels), cfg.batch_size, cfg.seed, epoch)
            train_loss, train_acc = _train_epoch(
                model,
                self.train_source,
                self.train_labels,
                batches,
                self.optimizer,
                self.criterion,
                self.device,
                cfg.precision,
            )
        val_loss = val_acc = float("nan")
        if self.val_labels is not None:
            val_loss, val_acc = _evaluate(
                model,
                self.val_source,
                self.val_labels,
                cfg.batch_size,
                self.criterion,
                self.device,
                cfg.precision,
            )
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }
        state.history.append(record)
        state.epoch = epoch + 1
        if self.val_labels is not None:
            _update_early_stopping(state, model, val_loss, cfg.early_stopping_patience)
        if state.stopped_early or state.epoch >= cfg.epochs:
            state.finished = True
            if cfg.early_stopping_patience is not None and state.best_state is not None:
                model.load_trainable_state(state.best_state)
        if self.checkpoint is not None:
            save_checkpoint(
                self.checkpoint,
                self.fingerprint,
                model,
                self.optimizer,
                cfg,
                state,
                next_lr=lr_at(cfg, state.epoch),
            )
        log.info(
            "epoch %d/%d  loss %.4f  acc %.3f  val_loss %.4f  val_acc %.3f  lr %.2e  %.1f s",
            record["epoch"],
            cfg.epochs,
            train_loss,
            train_acc,
            val_loss,
            val_acc,
            lr,
            record["seconds"],
        )
        return record


# --------------------------------------------------------------------------------------------
# fit and train


@dataclass
class TrainResult:
    """Outcome of ``fit``/``train``. ``completed`` is False when ``max_epochs_this_run`` cut the
    run short (call again with the same checkpoint dir to continue)."""

    model: FinetuneModel
    history: pd.DataFrame
    best_epoch: int | None
    stopped_early: bool
    completed: bool
    resumed_from_epoch: int
    fingerprint: str
    cache_seconds: float = 0.0
    fast_path: bool = False
    #: how the head started (``head_init``; with ``probe`` the probe's record), set by the job
    head_init: dict[str, Any] = field(default_factory=lambda: {"head_init": "random"})


def _label_tensors(
    train_labels: Sequence[int] | torch.Tensor,
    val_labels: Sequence[int] | torch.Tensor | None,
    has_val_data: bool,
    cfg: FinetuneConfig,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels as long tensors (validation: None when there is none), checked against the model."""
    train_t = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    if len(train_t) == 0:
        raise LeukotypeError("fine-tuning needs at least one training sample")
    has_val = has_val_data and val_labels is not None and len(val_labels) > 0
    val_t = torch.as_tensor(np.asarray(val_labels), dtype=torch.long) if has_val else None
    if cfg.early_stopping_patience is not None and not has_val:
        raise LeukotypeError(
            "early_stopping_patience is set but no validation samples were given; "
            "set val_fraction > 0 (or pass validation samples) or early_stopping_patience: null"
        )
    for name, labels in (("training", train_t), ("validation", val_t)):
        if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise LeukotypeError(f"{name} labels must be class indices in [0, {num_classes})")
    return train_t, val_t


def _uses_fast_path(
    cfg: FinetuneConfig, model: FinetuneModel, datasets: Sequence[tuple[Any, int]]
) -> bool:
    """Frozen activations are cached when there is a frozen part, inputs when they fit RAM."""
    if not cfg.fast_path:
        return False
    if model.has_frozen_part or any(isinstance(d, ActivationCache) for d, _ in datasets):
        return True
    return inputs_fit_in_memory(datasets, cfg.memory_limit_bytes)


def fit(
    model: FinetuneModel,
    train_data: Dataset | ActivationCache,
    train_labels: Sequence[int] | torch.Tensor,
    cfg: FinetuneConfig,
    *,
    val_data: Dataset | ActivationCache | None = None,
    val_labels: Sequence[int] | torch.Tensor | None = None,
    checkpoint_dir: str | Path | None = None,
    data_key: str = "",
    max_epochs_this_run: int | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable part and head on datasets yielding ``(input, index)``.

    SGD with momentum, ``cfg.schedule`` per epoch, (class-weighted) cross-entropy; with
    validation data, val loss/accuracy per epoch, and with ``early_stopping_patience`` training
    stops after that many epochs without a lower val loss and the best epoch's weights are
    restored. With ``checkpoint_dir`` a checkpoint is written atomically after every epoch and a
    matching one (same ``run_fingerprint``) is resumed from. ``max_epochs_this_run`` stops after
    that many epochs in this call (``completed=False``); ``on_epoch_end(record)`` is called after
    each epoch's checkpoint is written (an exception there interrupts training resumably).

    ``train_data``/``val_data`` may instead be :class:`ActivationCache` objects holding the
    frozen part's outputs for those samples (computed by the caller): training then never runs
    the frozen part.

    ``data_key`` identifies the data behind the datasets (``train`` derives it from the sample
    paths and transforms); a checkpoint and cached activations are only reused when it, the
    labels, the result-relevant config and the model's initial state all match. Pass a freshly
    built model when resuming: its state is part of that fingerprint.
    """
    train_t, val_t = _label_tensors(
        train_labels, val_labels, val_data is not None, cfg, model.num_classes
    )
    device = resolve_device(cfg.device)
    fingerprint = run_fingerprint(
        cfg, model, train_t.tolist(), None if val_t is None else val_t.tolist(), data_key
    )
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    weight = class_weights(train_t.numpy(), model.num_classes) if cfg.class_weighted else None

    with torch_threads(cfg.threads), deterministic_algorithms(device):
        model.to(device)
        run = _Run(
            model=model,
            cfg=cfg,
            device=device,
            criterion=nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device)),
            optimizer=torch.optim.SGD(
                model.trainable_parameters(),
                lr=cfg.lr,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
            ),
            train_labels=train_t,
            val_labels=val_t,
            checkpoint=ckpt_dir / CHECKPOINT_NAME if ckpt_dir is not None else None,
            fingerprint=fingerprint,
        )
        state = _resume(run)
        resumed_from = state.epoch
        datasets = [(train_data, len(train_t))]
        if val_t is not None:
            datasets.append((val_data, len(val_t)))
        use_fast = _uses_fast_path(cfg, model, datasets)
        cache_seconds = 0.0
        if not state.finished:
            t0 = time.perf_counter()
            run.train_source = _make_source(
                model, cfg, device, use_fast, ckpt_dir, fingerprint, *datasets[0], "train"
            )
            if val_t is not None:
                run.val_source = _make_source(
                    model, cfg, device, use_fast, ckpt_dir, fingerprint, *datasets[1], "val"
                )
            if use_fast:
                cache_seconds = time.perf_counter() - t0
                log.info("fast path: cached frozen activations in %.1f s", cache_seconds)

        epochs_run = 0
        while not state.finished and (
            max_epochs_this_run is None or epochs_run < max_epochs_this_run
        ):
            record = run.run_epoch(state)
            epochs_run += 1
            if on_epoch_end is not None:
                on_epoch_end(dict(record))

    if state.finished and ckpt_dir is not None:
        remove_activation_cache(ckpt_dir)
    model.eval()
    return TrainResult(
        model=model,
        history=history_frame(state.history),
        best_epoch=state.best_epoch,
        stopped_early=state.stopped_early,
        completed=state.finished,
        resumed_from_epoch=resumed_from,
        fingerprint=fingerprint,
        cache_seconds=cache_seconds,
        fast_path=use_fast,
    )


def _resume(run: _Run) -> TrainingState:
    """The state of a matching checkpoint (weights and optimizer restored), else a fresh one."""
    payload = load_checkpoint(run.checkpoint, run.fingerprint) if run.checkpoint else None
    if payload is None:
        return TrainingState()
    state = restore(payload, run.model, run.optimizer)
    log.info("resuming fine-tuning from %s after epoch %d", run.checkpoint, state.epoch)
    return state


def train(
    model: FinetuneModel,
    train_samples: Samples,
    cfg: FinetuneConfig,
    *,
    preprocess: Callable[[Any], Any],
    val_samples: Samples | None = None,
    checkpoint_dir: str | Path | None = None,
    max_epochs_this_run: int | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """``fit`` on image samples (``abspath`` + ``transform``, decoded by ``SampleDataset``).

    Validation samples (for early stopping) are carved from the training part by the caller,
    e.g. with ``leukotype.split.carve_validation``.
    """
    if train_samples.labels is None:
        raise LeukotypeError("training samples need labels")
    has_val = val_samples is not None and len(val_samples) > 0
    if has_val and val_samples.labels is None:
        raise LeukotypeError("validation samples need labels")
    return fit(
        model,
        train_samples.dataset(preprocess),
        train_samples.labels,
        cfg,
        val_data=val_samples.dataset(preprocess) if has_val else None,
        val_labels=val_samples.labels if has_val else None,
        checkpoint_dir=checkpoint_dir,
        data_key=samples_data_key(train_samples, val_samples if has_val else None),
        max_epochs_this_run=max_epochs_this_run,
        on_epoch_end=on_epoch_end,
    )


def samples_data_key(train_samples: Samples, val_samples: Samples | None) -> str:
    """The ``data_key`` that ``train`` gives ``fit`` for these image samples."""
    return digest([train_samples.key(), val_samples.key() if val_samples is not None else None])

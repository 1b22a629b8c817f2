"""What a trained network gives: class probabilities, predictions, fine-tuned features, files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from leukotype.errors import LeukotypeError
from leukotype.io import atomic_path
from leukotype.runtime import (
    Inputs,
    autocast,
    resolve_device,
    sample_loader,
    sequential_batches,
    to_device,
)

from .model import FinetuneModel, cpu_state
from .samples import Samples

#: The layer name under which the fine-tuned network's features are stored.
FINETUNED_LAYER = "finetuned"


def collect(
    fn: Callable[[Inputs], torch.Tensor],
    model: nn.Module,
    data: Dataset,
    n: int,
    *,
    batch_size: int,
    device: str | torch.device,
    precision: str,
    num_workers: int,
) -> np.ndarray:
    """Apply ``fn`` to every sample of ``data`` in order; float32 rows stacked in sample order."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    model.to(device).eval()
    out: np.ndarray | None = None
    with torch.inference_mode(), autocast(device, precision):
        for x, index in sample_loader(data, sequential_batches(n, batch_size), num_workers):
            y = fn(to_device(x, device)).float().cpu().numpy()
            if out is None:
                out = np.empty((n, *y.shape[1:]), dtype=np.float32)
            out[np.asarray(index)] = y
    if out is None:
        raise LeukotypeError("no samples to run the model on")
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float32 logits (torch's, as every prediction path uses)."""
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def predict_proba(
    model: FinetuneModel,
    data: Dataset,
    n: int,
    *,
    batch_size: int = 30,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    num_workers: int = 0,
) -> np.ndarray:
    """Softmax class probabilities (N, C) for the ``n`` samples of ``data`` ((x, index) items)."""
    logits = collect(
        model,
        model,
        data,
        n,
        batch_size=batch_size,
        device=device,
        precision=precision,
        num_workers=num_workers,
    )
    return softmax(logits)


def prediction_frame(
    samples: Samples, probabilities: np.ndarray, classes: Sequence[str]
) -> pd.DataFrame:
    """``image_id, transform, true, pred, prob_<class>...`` (``true`` is empty without labels)."""
    if probabilities.shape != (len(samples), len(classes)):
        raise LeukotypeError(
            f"probabilities have shape {probabilities.shape}; "
            f"expected ({len(samples)}, {len(classes)})"
        )
    classes = list(classes)
    frame = samples.index_frame()
    frame["true"] = [classes[i] for i in samples.labels] if samples.labels is not None else ""
    frame["pred"] = [classes[i] for i in probabilities.argmax(axis=1)]
    for j, name in enumerate(classes):
        frame[f"prob_{name}"] = probabilities[:, j]
    return frame


def check_classes(model: FinetuneModel, classes: Sequence[str]) -> None:
    if len(classes) != model.num_classes:
        raise LeukotypeError(
            f"{len(classes)} class names given for a model with {model.num_classes} outputs"
        )


def predict(
    model: FinetuneModel,
    samples: Samples,
    preprocess: Callable[[Any], Inputs],
    classes: Sequence[str],
    *,
    batch_size: int = 30,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    num_workers: int = 0,
) -> pd.DataFrame:
    """Predictions for image samples as ``image_id, transform, true, pred, prob_<class>...``."""
    check_classes(model, classes)
    probabilities = predict_proba(
        model,
        samples.dataset(preprocess),
        len(samples),
        batch_size=batch_size,
        device=device,
        precision=precision,
        num_workers=num_workers,
    )
    return prediction_frame(samples, probabilities, classes)


def finetuned_features(
    model: FinetuneModel,
    samples: Samples,
    preprocess: Callable[[Any], Inputs],
    *,
    batch_size: int = 30,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    num_workers: int = 0,
) -> np.ndarray:
    """Penultimate (head-input) features (N, D) of the fine-tuned model, for ``finetune_svm``."""
    return collect(
        model.features,
        model,
        samples.dataset(preprocess),
        len(samples),
        batch_size=batch_size,
        device=device,
        precision=precision,
        num_workers=num_workers,
    )


def write_features(out_dir: str | Path, index: pd.DataFrame, array: np.ndarray) -> None:
    """Fine-tuned features in the feature-store format, layer ``finetuned``."""
    from leukotype.feature_store import write_feature_matrix

    write_feature_matrix(Path(out_dir), FINETUNED_LAYER, index, array)


def write_finetuned_features(
    out_dir: str | Path,
    model: FinetuneModel,
    samples: Samples,
    preprocess: Callable[[Any], Inputs],
    **kwargs: Any,
) -> np.ndarray:
    """``finetuned_features`` written via ``feature_store.write_feature_matrix``, layer ``finetuned``."""
    array = finetuned_features(model, samples, preprocess, **kwargs)
    write_features(out_dir, samples.index_frame(), array)
    return array


def save_finetuned(model: nn.Module, path: str | Path) -> None:
    """Save the full ``state_dict`` atomically (reload with ``load_finetuned``, weights_only)."""
    with atomic_path(path) as tmp:
        torch.save(cpu_state(model.state_dict()), tmp)


def load_finetuned(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``save_finetuned`` file into a model of the same architecture (weights_only)."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def collect_from_activations(
    fn: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    activations: Any,
    *,
    batch_size: int,
    device: str | torch.device,
    precision: str,
) -> np.ndarray:
    """``fn`` over the rows of ``activations`` (an ``ActivationCache``) in order.

    The same sequential batches as :func:`collect` over those samples, so the trainable layers
    see the same inputs in the same batch composition as a full forward over them.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    n = len(activations)
    model.to(device).eval()
    out: np.ndarray | None = None
    with torch.inference_mode(), autocast(device, precision):
        for index in sequential_batches(n, batch_size):
            h = activations.take(index).to(device, non_blocking=True)
            y = fn(h).float().cpu().numpy()
            if out is None:
                out = np.empty((n, *y.shape[1:]), dtype=np.float32)
            out[index.numpy()] = y
    if out is None:
        raise LeukotypeError("no samples to run the model on")
    return out

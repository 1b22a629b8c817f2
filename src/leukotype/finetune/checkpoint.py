"""Checkpoints: what a resumable run stores after every epoch, and what it must match.

A checkpoint holds the trainable weights, the optimizer, the history and the early-stopping
state. All randomness derives from ``(seed, epoch)`` (see :mod:`leukotype.finetune.training`),
so nothing else is needed to continue exactly. It is resumed only when its fingerprint
(:func:`run_fingerprint`) matches: same result-relevant config, model initial state, labels
and data.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leukotype.io import atomic_path

from .model import FinetuneModel
from .samples import digest
from .settings import FinetuneConfig

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainingState:
    """Everything a checkpoint restores besides the trainable weights and optimizer."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_loss: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    best_state: dict[str, dict[str, torch.Tensor]] | None = None
    finished: bool = False
    stopped_early: bool = False


def model_digest(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and values of every state tensor."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_fingerprint(
    cfg: FinetuneConfig,
    model: nn.Module,
    train_labels: Sequence[int],
    val_labels: Sequence[int] | None,
    data_key: str = "",
) -> str:
    """What a checkpoint must match to be resumed: result-relevant config, the model's initial
    state (pretrained weights, head init, structure), the labels and the caller's data key."""
    return digest(
        {
            "config": cfg.result_fields(),
            "model": model_digest(model),
            "train_labels": [int(v) for v in train_labels],
            "val_labels": None if val_labels is None else [int(v) for v in val_labels],
            "data": data_key,
            "format": CHECKPOINT_FORMAT,
        }
    )


def save_checkpoint(
    path: Path,
    fingerprint: str,
    model: FinetuneModel,
    optimizer: torch.optim.Optimizer,
    cfg: FinetuneConfig,
    state: TrainingState,
    next_lr: float,
) -> None:
    """Write the checkpoint atomically (a kill mid-write leaves the previous one intact)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "epoch": state.epoch,
        "finished": state.finished,
        "stopped_early": state.stopped_early,
        "model": model.trainable_state(),
        "optimizer": optimizer.state_dict(),
        # The schedule is a pure function of the epoch; recorded for inspection.
        "scheduler": {"schedule": cfg.schedule, "next_epoch": state.epoch, "next_lr": next_lr},
        "history": state.history,
        # All randomness derives from (seed, epoch): nothing else to store.
        "rng": {"seed": cfg.seed, "next_epoch": state.epoch},
        "early_stopping": {
            "best_val_loss": state.best_val_loss,
            "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs,
            "best_state": state.best_state,
        },
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it matches ``fingerprint``; None (with a warning) if not."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: start over rather than fail
        warnings.warn(f"ignoring unreadable checkpoint {path}: {exc}; starting fresh", stacklevel=4)
        return None
    if payload.get("fingerprint") != fingerprint or payload.get("format") != CHECKPOINT_FORMAT:
        warnings.warn(
            f"checkpoint {path} was written for a different config, model or data "
            "(fingerprint mismatch); starting fresh and overwriting it",
            stacklevel=4,
        )
        return None
    return payload


def restore(
    payload: Mapping[str, Any], model: FinetuneModel, optimizer: torch.optim.Optimizer
) -> TrainingState:
    """Load a checkpoint's weights and optimizer into ``model``/``optimizer``; its state."""
    model.load_trainable_state(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    stopping = payload["early_stopping"]
    return TrainingState(
        epoch=int(payload["epoch"]),
        history=list(payload["history"]),
        best_val_loss=stopping["best_val_loss"],
        best_epoch=stopping["best_epoch"],
        bad_epochs=int(stopping["bad_epochs"]),
        best_state=stopping["best_state"],
        finished=bool(payload["finished"]),
        stopped_early=bool(payload["stopped_early"]),
    )

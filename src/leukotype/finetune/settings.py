"""The settings of one fine-tuning run (``FinetuneConfig``) and the choices they allow."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from leukotype.catalog import POLICIES
from leukotype.config import FINETUNE_EXECUTION_FIELDS, FINETUNE_LATER_DEFAULTS, without_later_defaults
from leukotype.errors import LeukotypeError
from leukotype.runtime import PRECISIONS

SCHEDULES = ("constant", "cosine")
#: How the new head starts: ``random`` (a seeded ``nn.Linear``) or ``probe`` (LP-FT, Kumar et al.
#: 2022: a logistic regression on the pretrained penultimate features; ``leukotype.finetune.probe``).
HEAD_INITS = ("random", "probe")
#: Config fields that change how a run executes but not (beyond float noise) what it learns;
#: they are left out of the checkpoint fingerprint so e.g. moving a run to a GPU resumes it
#: (the same fields the rule keeps out of its params: one list, in leukotype.config).
EXECUTION_ONLY_FIELDS = FINETUNE_EXECUTION_FIELDS

__all__ = ["EXECUTION_ONLY_FIELDS", "HEAD_INITS", "POLICIES", "PRECISIONS", "SCHEDULES", "FinetuneConfig"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (defaults: the paper's network parameters).

    ``val_fraction``: share of the training images the caller holds out as validation samples
    (see ``leukotype.split.carve_validation``); ``fit`` itself uses whatever validation samples it is given.
    ``calibration_fraction``: without a validation part, the share of the training images held
    out from the gradient steps of a network whose layers train, to fit its probability
    temperature on (``leukotype.head_calibration.calibration_slice``).
    ``threads``: torch intra-op threads during training (0 leaves the current setting).
    ``fast_path_memory_mb``: cached frozen activations up to this size stay in RAM; larger
    caches are float32 memmaps on disk.
    ``head_init``: ``probe`` sets the head, before the first gradient step, to a logistic
    regression fitted on the pretrained network's penultimate features of the training samples
    (LP-FT), so the trainable layers are not pulled about by a random head's gradients.
    """

    policy: str = "head"
    epochs: int = 20
    batch_size: int = 30
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    class_weighted: bool = False
    head_init: str = FINETUNE_LATER_DEFAULTS["head_init"]
    early_stopping_patience: int | None = None
    val_fraction: float = 0.0
    calibration_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    fast_path: bool = True
    num_workers: int = 0
    threads: int = 1
    fast_path_memory_mb: int = 1024

    def __post_init__(self) -> None:
        check_choice("policy", self.policy, POLICIES)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("head_init", self.head_init, HEAD_INITS)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        for name, value in positive.items():
            if not value > 0:
                raise LeukotypeError(f"finetune {name} must be > 0, got {value!r}")
        if not 0.0 <= self.momentum <= 1.0:
            raise LeukotypeError(f"finetune momentum must be in [0, 1], got {self.momentum!r}")
        if self.weight_decay < 0:
            raise LeukotypeError(f"finetune weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise LeukotypeError(
                "finetune early_stopping_patience must be a positive integer or null, "
                f"got {self.early_stopping_patience!r}"
            )
        for name in ("val_fraction", "calibration_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise LeukotypeError(f"finetune {name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("num_workers", "threads", "fast_path_memory_mb"):
            if getattr(self, name) < 0:
                raise LeukotypeError(f"finetune {name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> FinetuneConfig:
        """Build from a config section; unknown keys are an error naming the valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise LeukotypeError(
                f"unknown finetune option(s) {unknown}; valid options: {sorted(known)}"
            )
        return cls(**dict(mapping))

    def result_fields(self) -> dict[str, Any]:
        """The fields that determine the trained model (what the fingerprint covers); settings
        added later are left out at their default (``FINETUNE_LATER_DEFAULTS``), so checkpoints
        written before them stay valid."""
        return without_later_defaults(
            {k: v for k, v in dataclasses.asdict(self).items() if k not in EXECUTION_ONLY_FIELDS}
        )

    @property
    def memory_limit_bytes(self) -> int:
        """``fast_path_memory_mb`` in bytes: caches above it live in memory-mapped files."""
        return self.fast_path_memory_mb * 2**20


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise LeukotypeError(
            f"finetune {name} {value!r} is not valid; choose one of {list(choices)}"
        )

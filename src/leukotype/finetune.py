"""Fine-tuning: freeze policies, training loop, checkpoint/resume, frozen-layer fast path.

Freeze policies (``FinetuneConfig.policy``) over a backbone's ordered ``stages``
(``leukotype.backbones.stages``; their composition maps a normalised batch to the penultimate
(N, D) feature):

- ``head``: the paper's setting. Every pretrained layer is frozen and only a new, randomly
  initialised fully connected head trains (in the paper's MATLAB terms: all but the last three
  layers -- fc, softmax, classification -- are frozen; "we froze 822 [of 825 layers]").
- ``last_block``: the last stage plus the head train.
- ``all``: everything trains (the only valid policy for ``paper_cnn``, trained from scratch).

Frozen parameters have ``requires_grad=False`` and the frozen part always runs in eval mode,
so BatchNorm layers in it keep their pretrained running statistics and dropout in it is off
(``FinetuneModel.train()`` re-applies ``eval()`` to it). BatchNorm layers in the trainable part
behave as usual (batch statistics while training).

Fast path: with ``fast_path=True`` and a non-empty frozen part the frozen part's output does
not change during training, so it is computed ONCE per (image, transform) sample (batched,
``inference_mode``) and stored -- in memory when small, otherwise as a float32 ``.npy`` memmap
(under the checkpoint dir, where a resumed run reuses it). The trainable layers then train on
the stored activations for all epochs. The ordinary path runs the full forward every epoch
with the frozen part under ``no_grad``/eval. Both paths draw the same batches in the same order
and seed dropout identically, so with the same seed they give the same model up to float noise
(the frozen part sees the samples in differently composed batches). With nothing frozen (the
paper CNN trained from scratch) the fast path caches the preprocessed input tensors instead,
when they fit in ``fast_path_memory_mb`` of RAM: decoding and resizing each image once rather
than once per epoch, which on a small network costs as much as the training step. Inputs are a
deterministic function of (image, transform), so this gives the same model bit for bit.

Randomness: the batch order of epoch ``e`` comes from a ``torch.Generator`` seeded with a value
derived from ``(cfg.seed, e)``; the global RNG (used by dropout) is forked and re-seeded from
``(cfg.seed, e)`` for each epoch, so the caller's global RNG state is left untouched and a
resumed run needs no stored RNG state to continue exactly. The learning-rate schedule is a
pure function of the epoch index.

Determinism: on CPU a run and an interrupted-then-resumed run give bit-identical models. On GPU
``cudnn.benchmark`` is switched off, ``cudnn.deterministic`` on and
``torch.use_deterministic_algorithms(True, warn_only=True)`` set for the duration of training
(previous values are restored afterwards); operations without a deterministic CUDA kernel
(e.g. some atomic-add based backward passes such as adaptive pooling / index_add, and cuBLAS
unless ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is set before CUDA starts) only warn, so GPU runs are
reproducible up to float noise, not bit for bit. bf16 autocast (``precision="bf16"``) changes
results at the bf16 rounding level; cached activations are always stored as float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import LeukotypeError
from .io import atomic_path, write_json

log = logging.getLogger(__name__)

POLICIES = ("head", "last_block", "all")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
FINETUNED_LAYER = "finetuned"
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
#: Config fields that change how a run executes but not (beyond float noise) what it learns;
#: they are left out of the checkpoint fingerprint so e.g. moving a run to a GPU resumes it.
EXECUTION_ONLY_FIELDS = ("device", "num_workers", "threads", "fast_path", "fast_path_memory_mb")
#: Backbones trained from scratch: nothing pretrained to freeze.
FROM_SCRATCH_BACKBONES = ("paper_cnn",)

# Independent random streams derived from (seed, epoch).
_SHUFFLE_STREAM, _DROPOUT_STREAM = 0, 1

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (defaults: the paper's network parameters).

    ``val_fraction``: share of the training images the caller holds out as validation samples
    (see ``leukotype.split.carve_validation``); ``fit`` itself uses whatever validation samples it is given.
    ``threads``: torch intra-op threads during training (0 leaves the current setting).
    ``fast_path_memory_mb``: cached frozen activations up to this size stay in RAM; larger
    caches are float32 memmaps on disk.
    """

    policy: str = "head"
    epochs: int = 20
    batch_size: int = 30
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    class_weighted: bool = False
    early_stopping_patience: int | None = None
    val_fraction: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    fast_path: bool = True
    num_workers: int = 0
    threads: int = 1
    fast_path_memory_mb: int = 1024

    def __post_init__(self) -> None:
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("precision", self.precision, PRECISIONS)
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
        if not 0.0 <= self.val_fraction < 1.0:
            raise LeukotypeError(
                f"finetune val_fraction must be in [0, 1), got {self.val_fraction!r}"
            )
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
        """The fields that determine the trained model (what the fingerprint covers)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in EXECUTION_ONLY_FIELDS}


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise LeukotypeError(
            f"finetune {name} {value!r} is not valid; choose one of {list(choices)}"
        )


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Samples:
    """(image, transform) samples with optional integer labels, in a fixed order."""

    image_ids: tuple[str, ...]
    abspaths: tuple[str, ...]
    transforms: tuple[str, ...]
    labels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        lengths = {len(self.image_ids), len(self.abspaths), len(self.transforms)}
        if self.labels is not None:
            lengths.add(len(self.labels))
        if len(lengths) != 1:
            raise LeukotypeError(
                "Samples: image_ids, abspaths, transforms and labels differ in length"
            )

    @classmethod
    def from_frame(
        cls, df: pd.DataFrame, classes: Sequence[str] | None = None, label_column: str = "label"
    ) -> Samples:
        """From a table with ``image_id, abspath, transform`` (and ``label_column`` if classes).

        Labels are mapped to their index in ``classes``; an unknown label is an error.
        """
        missing = [c for c in ("image_id", "abspath", "transform") if c not in df.columns]
        if missing:
            raise LeukotypeError(f"sample table lacks column(s) {missing}; has {list(df.columns)}")
        labels = None
        if classes is not None:
            if label_column not in df.columns:
                raise LeukotypeError(f"sample table lacks label column {label_column!r}")
            lookup = {name: i for i, name in enumerate(classes)}
            unknown = sorted(set(df[label_column].astype(str)) - set(lookup))
            if unknown:
                raise LeukotypeError(f"labels {unknown} are not among the classes {list(classes)}")
            labels = tuple(lookup[v] for v in df[label_column].astype(str))
        return cls(
            image_ids=tuple(df["image_id"].astype(str)),
            abspaths=tuple(df["abspath"].astype(str)),
            transforms=tuple(df["transform"].astype(str)),
            labels=labels,
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def key(self) -> str:
        """Digest of the sample identities (paths and transforms, not labels)."""
        return _digest({"paths": list(self.abspaths), "transforms": list(self.transforms)})

    def index_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"image_id": list(self.image_ids), "transform": list(self.transforms)})

    def dataset(self, preprocess: Callable[[Any], Any]) -> Dataset:
        """A ``features.SampleDataset`` yielding ``(tensor, index)``."""
        from .features import SampleDataset

        return SampleDataset(list(self.abspaths), list(self.transforms), preprocess)


# --------------------------------------------------------------------------------------------
# Freeze policies and the model
# --------------------------------------------------------------------------------------------


def valid_policies(backbone: str) -> tuple[str, ...]:
    """Freeze policies that make sense for ``backbone``.

    ``paper_cnn`` is trained from scratch (only ``all``); a combined backbone has two frozen
    trunks feeding one shared head (only ``head``); every pretrained backbone allows all three.
    """
    from .backbones import get_spec

    spec = get_spec(backbone)  # an unknown name raises, listing the valid backbones
    if spec.name in FROM_SCRATCH_BACKBONES:
        return ("all",)
    if spec.is_combined:
        return ("head",)
    return POLICIES


def check_policy(backbone: str, policy: str) -> None:
    """Raise ``LeukotypeError`` listing the valid policies when the combination is invalid."""
    allowed = valid_policies(backbone)
    if policy not in allowed:
        raise LeukotypeError(
            f"freeze policy {policy!r} is not valid for backbone {backbone!r}; "
            f"valid policies: {list(allowed)}"
        )


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients into ``module`` and put it in eval mode (BatchNorm keeps its statistics)."""
    module.requires_grad_(False)
    module.eval()
    return module


def split_stages(stages: Sequence[nn.Module], policy: str) -> tuple[nn.Sequential, nn.Sequential]:
    """Split ordered backbone stages into (frozen, trainable) by freeze policy.

    ``head``: all stages frozen, trainable empty; ``last_block``: all but the last stage frozen;
    ``all``: nothing frozen. Frozen parameters get ``requires_grad=False`` and the frozen part is
    put in eval mode (see the module docstring); trainable parameters get ``requires_grad=True``.
    """
    _check_choice("policy", policy, POLICIES)
    stages = list(stages)
    if not stages:
        raise LeukotypeError("split_stages: the backbone has no stages to split")
    if policy == "last_block" and len(stages) < 2:
        raise LeukotypeError(
            "freeze policy 'last_block' needs a backbone with at least two stages; "
            "use 'head' or 'all'"
        )
    n_frozen = {"head": len(stages), "last_block": len(stages) - 1, "all": 0}[policy]
    frozen = freeze(nn.Sequential(*stages[:n_frozen]))
    trainable = nn.Sequential(*stages[n_frozen:])
    trainable.requires_grad_(True)
    return frozen, trainable


class ParallelTrunks(nn.Module):
    """Runs several trunks and concatenates their (N, D_i) features along dim 1.

    The input is either one tensor (given to every trunk) or a tuple with one tensor per trunk
    (each part preprocessed its own way, e.g. inception_v3 at 299 px and resnet101 at 224 px).
    """

    def __init__(self, trunks: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(trunks) < 2:
            raise LeukotypeError("ParallelTrunks needs at least two trunks")
        self.trunks = nn.ModuleList(trunks)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,) * len(self.trunks)
        if len(inputs) != len(self.trunks):
            raise LeukotypeError(
                f"ParallelTrunks got {len(inputs)} inputs for {len(self.trunks)} trunks"
            )
        return torch.cat([trunk(x) for trunk, x in zip(self.trunks, inputs)], dim=1)


class FinetuneModel(nn.Module):
    """frozen -> trainable -> head.

    ``features(x)`` is the penultimate (N, D) vector (input of the head), ``forward(x)`` the
    logits. The frozen part stays in eval mode whatever ``train()`` is called with.
    """

    def __init__(self, frozen: nn.Module, trainable: nn.Sequential, head: nn.Linear) -> None:
        super().__init__()
        self.frozen = freeze(frozen)
        self.trainable = trainable
        self.head = head

    @property
    def num_classes(self) -> int:
        return int(self.head.out_features)

    @property
    def has_frozen_part(self) -> bool:
        return not (isinstance(self.frozen, nn.Sequential) and len(self.frozen) == 0)

    def train(self, mode: bool = True) -> FinetuneModel:
        super().train(mode)
        self.frozen.eval()
        return self

    def trunk(self, x: Inputs) -> torch.Tensor:
        """Output of the frozen part (the input itself when nothing is frozen)."""
        return self.frozen(x)

    def features_from_trunk(self, h: torch.Tensor) -> torch.Tensor:
        return self.trainable(h)

    def logits_from_trunk(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.trainable(h))

    def features(self, x: Inputs) -> torch.Tensor:
        return self.features_from_trunk(self.trunk(x))

    def forward(self, x: Inputs) -> torch.Tensor:
        return self.logits_from_trunk(self.trunk(x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            p for p in [*self.trainable.parameters(), *self.head.parameters()] if p.requires_grad
        ]

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """CPU copies of the trainable part's and the head's state (what training changes)."""
        return {
            "trainable": _cpu_state(self.trainable.state_dict()),
            "head": _cpu_state(self.head.state_dict()),
        }

    def load_trainable_state(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.trainable.load_state_dict(state["trainable"])
        self.head.load_state_dict(state["head"])


def _cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def seeded_head(in_features: int, num_classes: int, seed: int) -> nn.Linear:
    """A new ``nn.Linear`` head; default init drawn from ``seed``, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_features, num_classes)


class CombinedPreprocess:
    """PIL image -> tuple of tensors, one per part (picklable for DataLoader workers)."""

    def __init__(self, parts: Sequence[Callable[[Any], torch.Tensor]]) -> None:
        self.parts = list(parts)

    def __call__(self, img: Any) -> tuple[torch.Tensor, ...]:
        return tuple(part(img) for part in self.parts)


def build_finetune_model(
    backbone: str,
    num_classes: int,
    policy: str,
    weights: Path | str | None | Mapping[str, Path | str | None] = None,
    seed: int = 0,
) -> tuple[FinetuneModel, Callable[[Any], Inputs]]:
    """Build (model, preprocess) for fine-tuning ``backbone`` on ``num_classes`` classes.

    ``weights``: one path (or None) for a single backbone, or a mapping part -> path for a
    combined backbone. The head is a new ``nn.Linear`` seeded from ``seed``. For a combined
    backbone the preprocess returns one tensor per part and the two frozen trunks'
    penultimate features are concatenated into one shared head.
    """
    from . import backbones

    check_policy(backbone, policy)
    parts = backbones.combined_parts(backbone) or [backbone]
    if not isinstance(weights, Mapping):
        if len(parts) > 1 and weights is not None:
            raise LeukotypeError(
                f"combined backbone {backbone!r} needs weights as a mapping part -> path, "
                f"one for each of {parts}"
            )
        weights = {part: weights for part in parts}
    trunks, preprocesses, dim = [], [], 0
    for part in parts:
        spec = backbones.get_spec(part)
        net = backbones.build_model(spec, weights.get(part), seed)
        trunks.append(nn.Sequential(*backbones.stages(spec, net)))
        preprocesses.append(backbones.preprocess(spec))
        dim += int(spec.layers[spec.penultimate_layer])
    if len(parts) > 1:
        frozen: nn.Module = freeze(ParallelTrunks(trunks))
        trainable = nn.Sequential()
        preprocess: Callable[[Any], Inputs] = CombinedPreprocess(preprocesses)
    else:
        frozen, trainable = split_stages(list(trunks[0]), policy)
        preprocess = preprocesses[0]
    return FinetuneModel(frozen, trainable, seeded_head(dim, num_classes, seed)), preprocess


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


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


def sequential_batches(n: int, batch_size: int) -> list[torch.Tensor]:
    return list(torch.arange(n).split(batch_size))


def history_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Per-epoch history as a DataFrame with columns ``HISTORY_COLUMNS`` (epoch is 1-based)."""
    return pd.DataFrame(list(records), columns=list(HISTORY_COLUMNS))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


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
    return _digest(
        {
            "config": cfg.result_fields(),
            "model": model_digest(model),
            "train_labels": [int(v) for v in train_labels],
            "val_labels": None if val_labels is None else [int(v) for v in val_labels],
            "data": data_key,
            "format": CHECKPOINT_FORMAT,
        }
    )


def _to_device(x: Inputs, device: torch.device) -> Inputs:
    if isinstance(x, (tuple, list)):
        return tuple(t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"
    )


def _resolve_device(device: str) -> torch.device:
    from .features import resolve_device

    return torch.device(resolve_device(device))


@contextlib.contextmanager
def _execution_context(threads: int, device: torch.device) -> Iterator[None]:
    """Thread count and GPU determinism flags for the duration of a run, restored afterwards."""
    old_threads = torch.get_num_threads()
    cudnn = torch.backends.cudnn
    old_flags = (
        cudnn.benchmark,
        cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        cudnn.benchmark, cudnn.deterministic = False, True
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        cudnn.benchmark, cudnn.deterministic = old_flags[0], old_flags[1]
        torch.use_deterministic_algorithms(old_flags[2], warn_only=old_flags[3])


def _fork_rng(device: torch.device) -> contextlib.AbstractContextManager:
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    return torch.random.fork_rng(devices=devices)


def _loader(data: Dataset, batches: Sequence[torch.Tensor], num_workers: int) -> DataLoader:
    # A private generator: DataLoader would otherwise draw its base seed from the global RNG,
    # which would shift the dropout stream of the ordinary path relative to the fast path.
    return DataLoader(
        data,
        batch_sampler=[b.tolist() for b in batches],
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )


# --------------------------------------------------------------------------------------------
# Fast path: cached frozen activations
# --------------------------------------------------------------------------------------------


class ActivationCache:
    """Frozen-part outputs of every sample, float32, in sample order (RAM tensor or memmap)."""

    def __init__(self, array: np.ndarray, keepalive: Any = None) -> None:
        self.array = array
        self._keepalive = keepalive  # a TemporaryDirectory holding an unnamed memmap

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[index.numpy()]))


def _cache_files(cache_dir: Path, name: str) -> tuple[Path, Path]:
    return cache_dir / f"frozen_{name}.npy", cache_dir / f"frozen_{name}.json"


def _load_cache(
    cache_dir: Path | None, name: str, fingerprint: str, n: int, memory_limit: int
) -> ActivationCache | None:
    if cache_dir is None:
        return None
    array_path, meta_path = _cache_files(cache_dir, name)
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("fingerprint") != fingerprint or meta.get("rows") != n:
        return None
    array = np.load(array_path, mmap_mode="r")
    if array.nbytes <= memory_limit:
        array = np.array(array)
    return ActivationCache(array)


def compute_activation_cache(
    model: FinetuneModel,
    data: Dataset,
    n: int,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    num_workers: int,
    memory_limit_bytes: int,
    cache_dir: Path | None = None,
    name: str = "train",
    fingerprint: str = "",
) -> ActivationCache:
    """Run the frozen part once over ``data`` (in order) and store its float32 outputs.

    With ``cache_dir`` the outputs go to ``frozen_{name}.npy`` there (a memmap, written under a
    temporary name and renamed when complete, with a ``.json`` marker holding ``fingerprint``),
    so a resumed run reuses them; they are read into RAM when at most ``memory_limit_bytes``.
    Without ``cache_dir`` they stay in RAM when small enough, else go to a temporary memmap.
    """
    cached = _load_cache(cache_dir, name, fingerprint, n, memory_limit_bytes)
    if cached is not None:
        log.info("fast path: reusing cached frozen activations %s %s", name, cached.array.shape)
        return cached
    model.eval()
    array: np.ndarray | None = None
    tmp_ctx = keepalive = target = None
    with contextlib.ExitStack() as stack, torch.inference_mode(), _autocast(device, precision):
        for x, index in _loader(data, sequential_batches(n, batch_size), num_workers):
            h = model.trunk(_to_device(x, device)).float().cpu().numpy()
            if array is None:
                shape = (n, *h.shape[1:])
                nbytes = int(np.prod(shape)) * 4
                if cache_dir is not None:
                    target = _cache_files(cache_dir, name)[0]
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    tmp_ctx = stack.enter_context(atomic_path(target))
                    array = np.lib.format.open_memmap(
                        tmp_ctx, mode="w+", dtype=np.float32, shape=shape
                    )
                elif nbytes <= memory_limit_bytes:
                    array = np.empty(shape, dtype=np.float32)
                else:
                    keepalive = tempfile.TemporaryDirectory(prefix="leukotype-frozen-")
                    path = Path(keepalive.name) / f"frozen_{name}.npy"
                    array = np.lib.format.open_memmap(
                        path, mode="w+", dtype=np.float32, shape=shape
                    )
            array[np.asarray(index)] = h
        if array is None:
            raise LeukotypeError("fast path: no samples to cache")
        if isinstance(array, np.memmap):
            array.flush()
    if cache_dir is not None and target is not None:
        write_json(
            {"fingerprint": fingerprint, "rows": n, "shape": list(array.shape)},
            _cache_files(cache_dir, name)[1],
        )
        array = np.load(target, mmap_mode="r")
        if array.nbytes <= memory_limit_bytes:
            array = np.array(array)
    return ActivationCache(array, keepalive)


def _inputs_fit_in_memory(datasets: Sequence[tuple[Dataset, int]], memory_limit_bytes: int) -> bool:
    """Whether every dataset's preprocessed inputs (one tensor per sample) fit the RAM limit.

    Judged from the first sample of each; multi-input samples (combined backbones) never qualify.
    """
    for data, n in datasets:
        if n == 0:
            continue
        first = data[0][0]
        if not isinstance(first, torch.Tensor) or n * first.numel() * 4 > memory_limit_bytes:
            return False
    return True


def remove_activation_cache(cache_dir: str | Path) -> None:
    """Delete cached frozen activations (they can be GBs; a finished run no longer needs them)."""
    for path in Path(cache_dir).glob("frozen_*.*"):
        if path.suffix in {".npy", ".json"}:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


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


@dataclass
class _State:
    """Everything a checkpoint restores besides the trainable weights and optimizer."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_loss: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    best_state: dict[str, dict[str, torch.Tensor]] | None = None
    finished: bool = False
    stopped_early: bool = False


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
        self.model, self.device, self.precision, self.num_workers = (
            model,
            device,
            precision,
            num_workers,
        )
        self.data, self.cache = data, cache

    def batches(
        self, batches: Sequence[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.cache is not None:
            for index in batches:
                yield index, self.cache.take(index).to(self.device, non_blocking=True)
            return
        for x, index in _loader(self.data, batches, self.num_workers):
            with torch.no_grad(), _autocast(self.device, self.precision):
                h = self.model.trunk(_to_device(x, self.device))
            # Same dtype as the cache so both paths feed the trainable part identically.
            yield torch.as_tensor(index), h.float() if self.model.has_frozen_part else h


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
        with _autocast(device, precision):
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
            with _autocast(device, precision):
                logits = model.logits_from_trunk(h)
            total_loss += float(criterion(logits.float(), y)) * len(index)
            correct += int((logits.argmax(1) == y).sum())
    return total_loss / len(labels), correct / len(labels)


def _save_checkpoint(
    path: Path,
    fingerprint: str,
    model: FinetuneModel,
    optimizer: torch.optim.Optimizer,
    cfg: FinetuneConfig,
    state: _State,
) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "epoch": state.epoch,
        "finished": state.finished,
        "stopped_early": state.stopped_early,
        "model": model.trainable_state(),
        "optimizer": optimizer.state_dict(),
        # The schedule is a pure function of the epoch; recorded for inspection.
        "scheduler": {
            "schedule": cfg.schedule,
            "next_epoch": state.epoch,
            "next_lr": lr_at(cfg, state.epoch),
        },
        "history": state.history,
        # All randomness derives from (seed, epoch) (see module docstring): nothing else to store.
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


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: start over rather than fail
        warnings.warn(f"ignoring unreadable checkpoint {path}: {exc}; starting fresh", stacklevel=3)
        return None
    if payload.get("fingerprint") != fingerprint or payload.get("format") != CHECKPOINT_FORMAT:
        warnings.warn(
            f"checkpoint {path} was written for a different config, model or data "
            "(fingerprint mismatch); starting fresh and overwriting it",
            stacklevel=3,
        )
        return None
    return payload


def _restore(
    payload: Mapping[str, Any], model: FinetuneModel, optimizer: torch.optim.Optimizer
) -> _State:
    model.load_trainable_state(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    stopping = payload["early_stopping"]
    return _State(
        epoch=int(payload["epoch"]),
        history=list(payload["history"]),
        best_val_loss=stopping["best_val_loss"],
        best_epoch=stopping["best_epoch"],
        bad_epochs=int(stopping["bad_epochs"]),
        best_state=stopping["best_state"],
        finished=bool(payload["finished"]),
        stopped_early=bool(payload["stopped_early"]),
    )


def _make_sources(
    model: FinetuneModel,
    cfg: FinetuneConfig,
    device: torch.device,
    use_fast: bool,
    cache_dir: Path | None,
    fingerprint: str,
    train: tuple[Dataset, int],
    val: tuple[Dataset, int] | None,
) -> tuple[_Source, _Source | None]:
    """Training and validation sources: cached frozen activations (fast path) or full forwards."""
    common = dict(device=device, precision=cfg.precision, num_workers=cfg.num_workers)
    # Cached inputs (nothing frozen) are cheap to recompute: RAM only, never a file.
    cache_dir = cache_dir if model.has_frozen_part else None

    def source(data: Dataset, n: int, name: str) -> _Source:
        if not use_fast:
            return _Source(model, data=data, **common)
        cache = compute_activation_cache(
            model,
            data,
            n,
            name=name,
            batch_size=cfg.batch_size,
            memory_limit_bytes=cfg.fast_path_memory_mb * 2**20,
            cache_dir=cache_dir,
            fingerprint=fingerprint,
            **common,
        )
        return _Source(model, cache=cache, **common)

    return source(*train, "train"), (source(*val, "val") if val is not None else None)


def fit(
    model: FinetuneModel,
    train_data: Dataset,
    train_labels: Sequence[int] | torch.Tensor,
    cfg: FinetuneConfig,
    *,
    val_data: Dataset | None = None,
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

    ``data_key`` identifies the data behind the datasets (``train`` derives it from the sample
    paths and transforms); a checkpoint and cached activations are only reused when it, the
    labels, the result-relevant config and the model's initial state all match. Pass a freshly
    built model when resuming: its state is part of that fingerprint.
    """
    train_labels_t = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    n_train = len(train_labels_t)
    if n_train == 0:
        raise LeukotypeError("fine-tuning needs at least one training sample")
    has_val = val_data is not None and val_labels is not None and len(val_labels) > 0
    val_labels_t = torch.as_tensor(np.asarray(val_labels), dtype=torch.long) if has_val else None
    if cfg.early_stopping_patience is not None and not has_val:
        raise LeukotypeError(
            "early_stopping_patience is set but no validation samples were given; "
            "set val_fraction > 0 (or pass validation samples) or early_stopping_patience: null"
        )
    num_classes = model.num_classes
    for name, labels_t in (("training", train_labels_t), ("validation", val_labels_t)):
        if (
            labels_t is not None
            and len(labels_t)
            and (labels_t.min() < 0 or labels_t.max() >= num_classes)
        ):
            raise LeukotypeError(f"{name} labels must be class indices in [0, {num_classes})")

    device = _resolve_device(cfg.device)
    fingerprint = run_fingerprint(
        cfg,
        model,
        train_labels_t.tolist(),
        None if val_labels_t is None else val_labels_t.tolist(),
        data_key,
    )
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt_path = ckpt_dir / CHECKPOINT_NAME if ckpt_dir is not None else None
    weight = class_weights(train_labels_t.numpy(), num_classes) if cfg.class_weighted else None

    with _execution_context(cfg.threads, device):
        model.to(device)
        criterion = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device))
        optimizer = torch.optim.SGD(
            model.trainable_parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        payload = _load_checkpoint(ckpt_path, fingerprint) if ckpt_path is not None else None
        state = _restore(payload, model, optimizer) if payload is not None else _State()
        resumed_from = state.epoch
        if payload is not None:
            log.info("resuming fine-tuning from %s after epoch %d", ckpt_path, state.epoch)

        use_fast = cfg.fast_path and (
            model.has_frozen_part
            or _inputs_fit_in_memory(
                [(train_data, n_train)] + ([(val_data, len(val_labels_t))] if has_val else []),
                cfg.fast_path_memory_mb * 2**20,
            )
        )
        cache_seconds = 0.0
        train_source = val_source = None
        if not state.finished:
            t0 = time.perf_counter()
            train_source, val_source = _make_sources(
                model,
                cfg,
                device,
                use_fast,
                ckpt_dir,
                fingerprint,
                (train_data, n_train),
                (val_data, len(val_labels_t)) if has_val else None,
            )
            if use_fast:
                cache_seconds = time.perf_counter() - t0
                log.info("fast path: cached frozen activations in %.1f s", cache_seconds)

        epochs_run = 0
        while not state.finished:
            if max_epochs_this_run is not None and epochs_run >= max_epochs_this_run:
                break
            epoch = state.epoch
            lr = lr_at(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            with _fork_rng(device):
                torch.manual_seed(derived_seed(cfg.seed, epoch, _DROPOUT_STREAM))
                batches = epoch_batches(n_train, cfg.batch_size, cfg.seed, epoch)
                train_loss, train_acc = _train_epoch(
                    model,
                    train_source,
                    train_labels_t,
                    batches,
                    optimizer,
                    criterion,
                    device,
                    cfg.precision,
                )
            val_loss = val_acc = float("nan")
            if has_val:
                val_loss, val_acc = _evaluate(
                    model,
                    val_source,
                    val_labels_t,
                    cfg.batch_size,
                    criterion,
                    device,
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
            epochs_run += 1
            if has_val:
                _update_early_stopping(state, model, val_loss, cfg.early_stopping_patience)
            if state.stopped_early or state.epoch >= cfg.epochs:
                state.finished = True
                if cfg.early_stopping_patience is not None and state.best_state is not None:
                    model.load_trainable_state(state.best_state)
            if ckpt_path is not None:
                _save_checkpoint(ckpt_path, fingerprint, model, optimizer, cfg, state)
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


def _update_early_stopping(
    state: _State, model: FinetuneModel, val_loss: float, patience: int | None
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


def train(
    model: FinetuneModel,
    train_samples: Samples,
    cfg: FinetuneConfig,
    *,
    preprocess: Callable[[Any], Inputs],
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
        data_key=_digest([train_samples.key(), val_samples.key() if has_val else None]),
        max_epochs_this_run=max_epochs_this_run,
        on_epoch_end=on_epoch_end,
    )


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _collect(
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
    device = device if isinstance(device, torch.device) else _resolve_device(device)
    model.to(device).eval()
    out: np.ndarray | None = None
    with torch.inference_mode(), _autocast(device, precision):
        for x, index in _loader(data, sequential_batches(n, batch_size), num_workers):
            y = fn(_to_device(x, device)).float().cpu().numpy()
            if out is None:
                out = np.empty((n, *y.shape[1:]), dtype=np.float32)
            out[np.asarray(index)] = y
    if out is None:
        raise LeukotypeError("no samples to run the model on")
    return out


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
    logits = _collect(
        model,
        model,
        data,
        n,
        batch_size=batch_size,
        device=device,
        precision=precision,
        num_workers=num_workers,
    )
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


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
    if len(classes) != model.num_classes:
        raise LeukotypeError(
            f"{len(classes)} class names given for a model with {model.num_classes} outputs"
        )
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
    return _collect(
        model.features,
        model,
        samples.dataset(preprocess),
        len(samples),
        batch_size=batch_size,
        device=device,
        precision=precision,
        num_workers=num_workers,
    )


def write_finetuned_features(
    out_dir: str | Path,
    model: FinetuneModel,
    samples: Samples,
    preprocess: Callable[[Any], Inputs],
    **kwargs: Any,
) -> np.ndarray:
    """``finetuned_features`` written via ``feature_store.write_feature_matrix``, layer ``finetuned``."""
    from .feature_store import write_feature_matrix

    array = finetuned_features(model, samples, preprocess, **kwargs)
    write_feature_matrix(Path(out_dir), FINETUNED_LAYER, samples.index_frame(), array)
    return array


def save_finetuned(model: nn.Module, path: str | Path) -> None:
    """Save the full ``state_dict`` atomically (reload with ``load_finetuned``, weights_only)."""
    with atomic_path(path) as tmp:
        torch.save(_cpu_state(model.state_dict()), tmp)


def load_finetuned(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``save_finetuned`` file into a model of the same architecture (weights_only)."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model

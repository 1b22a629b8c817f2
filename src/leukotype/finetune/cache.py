"""Activation cache: the frozen part's output for every sample, computed once.

The frozen part's output does not change during training, so the fast path computes it ONCE
per (image, transform) sample (batched, ``inference_mode``) and stores it as float32 -- in RAM
when it fits the memory budget, otherwise as an ``.npy`` memmap (under the checkpoint dir,
where a resumed run reuses it; a ``.json`` marker holds the fingerprint it was made for).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from leukotype.errors import LeukotypeError
from leukotype.io import atomic_path, write_json
from leukotype.runtime import autocast, sample_loader, sequential_batches, to_device

from .model import FinetuneModel

log = logging.getLogger(__name__)

CACHE_PREFIX = "frozen_"


class ActivationCache:
    """Frozen-part outputs of every sample, float32, in sample order (RAM array or memmap)."""

    def __init__(self, array: np.ndarray, keepalive: Any = None) -> None:
        self.array = array
        self._keepalive = keepalive  # a TemporaryDirectory holding an unnamed memmap

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def in_memory_bytes(self) -> int:
        """RAM the rows take (0 for a memmap: the page cache holds them)."""
        return 0 if isinstance(self.array, np.memmap) else int(self.array.nbytes)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[index.numpy()]))


class PatchedActivations(ActivationCache):
    """Rows ``start:stop`` of ``base``, where ``patch_rows[i] >= 0`` takes row ``i`` from
    ``patch`` instead (the same sample computed in another batch composition)."""

    def __init__(
        self,
        base: ActivationCache,
        start: int,
        stop: int,
        patch: ActivationCache | None = None,
        patch_rows: np.ndarray | None = None,
    ) -> None:
        self.base, self.start, self.stop, self.patch = base, int(start), int(stop), patch
        self.patch_rows = (
            np.full(self.stop - self.start, -1, dtype=np.int64) if patch_rows is None else patch_rows
        )

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def in_memory_bytes(self) -> int:
        return 0  # a view: the base and the patch hold the rows

    @property
    def array(self) -> np.ndarray:  # type: ignore[override]
        """The rows as one array (a copy)."""
        return self.take(torch.arange(len(self))).numpy()

    def take(self, index: torch.Tensor) -> torch.Tensor:
        local = index.numpy()
        rows = np.array(self.base.array[self.start + local])
        patched = self.patch_rows[local]
        chosen = patched >= 0
        if chosen.any():
            rows[chosen] = self.patch.array[patched[chosen]]
        return torch.from_numpy(np.ascontiguousarray(rows))


def cache_files(cache_dir: Path, name: str) -> tuple[Path, Path]:
    return cache_dir / f"{CACHE_PREFIX}{name}.npy", cache_dir / f"{CACHE_PREFIX}{name}.json"


def _in_memory_if_small(array: np.ndarray, memory_limit: int) -> np.ndarray:
    return np.array(array) if array.nbytes <= memory_limit else array


def load_cache(
    cache_dir: Path | None, name: str, fingerprint: str, n: int, memory_limit: int
) -> ActivationCache | None:
    """A complete cache written for ``fingerprint`` with ``n`` rows, else None."""
    if cache_dir is None:
        return None
    array_path, meta_path = cache_files(cache_dir, name)
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("fingerprint") != fingerprint or meta.get("rows") != n:
        return None
    return ActivationCache(_in_memory_if_small(np.load(array_path, mmap_mode="r"), memory_limit))


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
    batches: Sequence[torch.Tensor] | None = None,
) -> ActivationCache:
    """Run the frozen part once over ``data`` (in order) and store its float32 outputs.

    ``batches`` (index tensors covering ``0..n-1``) sets the batch composition; by default
    sequential batches of ``batch_size``.

    With ``cache_dir`` the outputs go to ``frozen_{name}.npy`` there (a memmap, written under a
    temporary name and renamed when complete, with a ``.json`` marker holding ``fingerprint``),
    so a resumed run reuses them; they are read into RAM when at most ``memory_limit_bytes``.
    Without ``cache_dir`` they stay in RAM when small enough, else go to a temporary memmap.
    """
    cached = load_cache(cache_dir, name, fingerprint, n, memory_limit_bytes)
    if cached is not None:
        log.info("fast path: reusing cached frozen activations %s %s", name, cached.array.shape)
        return cached
    model.eval()
    array: np.ndarray | None = None
    keepalive = target = None
    with contextlib.ExitStack() as stack, torch.inference_mode(), autocast(device, precision):
        if batches is None:
            batches = sequential_batches(n, batch_size)
        for x, index in sample_loader(data, batches, num_workers):
            h = model.trunk(to_device(x, device)).float().cpu().numpy()
            if array is None:
                shape = (n, *h.shape[1:])
                nbytes = int(np.prod(shape)) * 4
                if cache_dir is not None:
                    target = cache_files(cache_dir, name)[0]
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    tmp = stack.enter_context(atomic_path(target))
                    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
                elif nbytes <= memory_limit_bytes:
                    array = np.empty(shape, dtype=np.float32)
                else:
                    keepalive = tempfile.TemporaryDirectory(prefix="leukotype-frozen-")
                    path = Path(keepalive.name) / f"{CACHE_PREFIX}{name}.npy"
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
            cache_files(cache_dir, name)[1],
        )
        array = _in_memory_if_small(np.load(target, mmap_mode="r"), memory_limit_bytes)
    return ActivationCache(array, keepalive)


def inputs_fit_in_memory(datasets: Sequence[tuple[Dataset, int]], memory_limit_bytes: int) -> bool:
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
    for path in Path(cache_dir).glob(f"{CACHE_PREFIX}*.*"):
        if path.suffix in {".npy", ".json"}:
            path.unlink(missing_ok=True)

"""Streaming feature extraction into the format of :mod:`leukotype.feature_store`.

Extraction streams batches into ``numpy.lib.format.open_memmap`` files, so memory stays flat
however many samples there are, and every file appears under its final name only once the whole
extraction succeeded (temporary names, ``os.replace`` at the end).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from leukotype.augment import apply_transform, check_transform
from leukotype.backbones import FeatureExtractor, build_model, get_spec, preprocess, resolve_layer
from leukotype.errors import LeukotypeError
from leukotype.feature_store import SAMPLE_KEY, _index_table, canonical_samples
from leukotype.images import load_rgb
from leukotype.io import atomic_path, provenance, write_json, write_tsv
from leukotype.weights import file_sha256

PRECISIONS = ("fp32", "bf16")


class SampleDataset(Dataset):
    """(image, transform) samples -> ``(normalised tensor, index)``.

    Decodes with :func:`leukotype.images.load_rgb`, applies the lossless transform to the
    full-resolution image (before any resize, so a rotation never interpolates), then
    ``preprocess``.
    """

    def __init__(
        self,
        abspaths: Sequence[str | os.PathLike],
        transforms: Sequence[str],
        preprocess: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        if len(abspaths) != len(transforms):
            raise LeukotypeError(
                f"SampleDataset: {len(abspaths)} paths but {len(transforms)} transforms"
            )
        self.abspaths = [str(p) for p in abspaths]
        self.transforms = [check_transform(str(t)) for t in transforms]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.abspaths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = apply_transform(load_rgb(self.abspaths[index]), self.transforms[index])
        return self.preprocess(image), index


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable cuda device is an error."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise LeukotypeError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LeukotypeError(
            f"device {device!r} requested but CUDA is not available on this machine; "
            "use device: auto or cpu"
        )
    return resolved


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(total: int, enabled: bool, desc: str):  # -> tqdm
    from tqdm import tqdm

    # In a log file (not a TTY) a refresh every few seconds is plenty.
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit="img",
        file=sys.stderr,
        disable=not enabled,
        mininterval=0.5 if interactive else 10.0,
        dynamic_ncols=interactive,
    )


def _worker_init(worker_id: int) -> None:
    # Decoding workers must not each grab every core for intra-op parallelism.
    torch.set_num_threads(1)


def extract_features(
    samples: pd.DataFrame,
    backbone: str,
    weights_path: str | os.PathLike | None,
    layers: Sequence[str],
    out_dir: str | os.PathLike,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    threads: int = 1,
    precision: str = "fp32",
    progress: bool = True,
    seed: int = 0,
) -> None:
    """Extract ``layers`` of ``backbone`` for every sample into ``out_dir`` (see module doc).

    Args:
        samples: columns ``image_id, transform, abspath`` (others ignored).
        weights_path: resolved weights file (:func:`leukotype.weights.resolve_weights`) or None
            for random weights drawn from ``seed``.
        layers: feature layers, all computed in one forward pass per batch.
        device: ``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:N``.
        threads: torch intra-op threads for this call (restored afterwards).
        precision: ``fp32`` or ``bf16`` (autocast; features are stored as float32 either way).
    """
    spec = get_spec(backbone)
    if spec.is_combined:
        raise LeukotypeError(
            f"backbone {backbone!r} is not extracted itself: extract {', '.join(spec.parts)} "
            "and load their folders together with load_features"
        )
    if precision not in PRECISIONS:
        raise LeukotypeError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if batch_size < 1:
        raise LeukotypeError(f"batch_size must be >= 1, got {batch_size}")
    layers = list(dict.fromkeys(resolve_layer(spec, layer) for layer in layers))
    if "abspath" not in samples.columns:
        raise LeukotypeError("sample table lacks column 'abspath' (absolute image paths)")
    table = canonical_samples(samples)
    if table.empty:
        raise LeukotypeError("no samples to extract features for")
    index = _index_table(table)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        model = build_model(spec, Path(weights_path) if weights_path else None, seed=seed)
        model = model.to(torch_device, memory_format=torch.channels_last)
        extractor = FeatureExtractor(spec, model, layers).eval()
        dataset = SampleDataset(
            table["abspath"].tolist(), table["transform"].tolist(), preprocess(spec)
        )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=torch_device.type == "cuda",
            worker_init_fn=_worker_init if num_workers > 0 else None,
        )
        n_rows = len(dataset)
        with contextlib.ExitStack() as finals:
            # Entered first, so replaced last: meta.json appears only when everything is there.
            meta_tmp = finals.enter_context(atomic_path(out_dir / "meta.json"))
            index_tmp = finals.enter_context(atomic_path(out_dir / "index.tsv"))
            matrices = {
                layer: np.lib.format.open_memmap(
                    finals.enter_context(atomic_path(out_dir / f"{layer}.npy")),
                    mode="w+",
                    dtype=np.float32,
                    shape=(n_rows, spec.layers[layer]),
                )
                for layer in layers
            }
            with _progress(n_rows, progress, f"{backbone} features") as bar, torch.inference_mode():
                for batch, rows in loader:
                    batch = batch.to(torch_device, non_blocking=True)
                    batch = batch.contiguous(memory_format=torch.channels_last)
                    with _autocast(torch_device, precision):
                        outputs = extractor(batch)
                    rows = rows.numpy()
                    for layer, values in outputs.items():
                        values = values.float().cpu().numpy()
                        if not np.isfinite(values).all():
                            raise LeukotypeError(
                                f"{backbone} {layer}: non-finite features for samples "
                                f"{index.iloc[rows][SAMPLE_KEY].values.tolist()[:3]} "
                                f"(precision {precision}); try precision fp32"
                            )
                        matrices[layer][rows] = values
                    bar.update(len(rows))
            for matrix in matrices.values():
                matrix.flush()
            del matrices  # release the memmaps before the files are moved into place
            write_tsv(index, index_tmp)
            weights_file = Path(weights_path).resolve() if weights_path else None
            meta = {
                "backbone": backbone,
                "layers": layers,
                "dims": {layer: spec.layers[layer] for layer in layers},
                "n_rows": n_rows,
                "weights": {
                    "path": str(weights_file) if weights_file else None,
                    "sha256": file_sha256(weights_file) if weights_file else None,
                },
                "preprocess": {
                    "resize_size": spec.resize_size,
                    "input_size": spec.input_size,
                    "interpolation": spec.interpolation.value,
                    "mean": list(spec.mean),
                    "std": list(spec.std),
                },
                "precision": precision,
                "device": str(torch_device),
                "batch_size": batch_size,
                "provenance": provenance(seed=seed),
            }
            write_json(meta, meta_tmp)
    finally:
        torch.set_num_threads(previous_threads)

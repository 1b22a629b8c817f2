"""The on-disk feature format: one folder per backbone (or fine-tuned network).

- ``index.tsv`` — ``row, image_id, transform``: which sample each matrix row belongs to, rows in
  canonical order (sorted by image_id, then transform);
- ``<layer>.npy`` — float32 (N, D) matrix per layer, rows as in the index;
- ``meta.json`` — backbone, layers and dims, weights file and sha256, precision (requested,
  effective, reason: :mod:`leukotype.hardware`), device, provenance (written by
  :func:`leukotype.features.extract_features`; a fine-tuned network's folder records only its
  precision and provenance).

numpy and pandas only: the SVM jobs read features without importing torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leukotype.augment import check_transform
from leukotype.errors import LeukotypeError
from leukotype.io import atomic_path, read_tsv, write_tsv

SAMPLE_KEY = ["image_id", "transform"]
INDEX_COLUMNS = ["row", "image_id", "transform"]


def canonical_samples(samples: pd.DataFrame) -> pd.DataFrame:
    """Samples sorted by (image_id, transform), checked for duplicates and unknown transforms."""
    missing = [c for c in SAMPLE_KEY if c not in samples.columns]
    if missing:
        raise LeukotypeError(f"sample table lacks column(s) {missing}; it needs {SAMPLE_KEY}")
    table = samples.astype({"image_id": str, "transform": str})
    for name in table["transform"].unique():
        check_transform(name)
    duplicated = table.duplicated(SAMPLE_KEY, keep=False)
    if duplicated.any():
        examples = table.loc[duplicated, SAMPLE_KEY].drop_duplicates().head(5)
        raise LeukotypeError(
            f"{int(duplicated.sum())} duplicated (image_id, transform) rows in the sample table, "
            f"e.g. {examples.to_records(index=False).tolist()}"
        )
    return table.sort_values(SAMPLE_KEY, kind="stable").reset_index(drop=True)


def _index_table(table: pd.DataFrame) -> pd.DataFrame:
    index = table[SAMPLE_KEY].reset_index(drop=True)
    index.insert(0, "row", np.arange(len(index), dtype=np.int64))
    return index


def write_feature_matrix(
    out_dir: str | os.PathLike, layer: str, index_df: pd.DataFrame, array: np.ndarray
) -> None:
    """Write one layer matrix and its index in the extraction format (atomically).

    ``index_df`` has ``image_id, transform`` (``row`` is recomputed), one row per array row.
    An existing ``index.tsv`` with different samples is an error: all layers of a folder share
    one index.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != len(index_df):
        raise LeukotypeError(
            f"feature matrix must be 2-D with one row per index row: shape {array.shape}, "
            f"{len(index_df)} index rows"
        )
    index = _index_table(index_df.astype({"image_id": str, "transform": str}))
    out_dir = Path(out_dir)
    existing_path = out_dir / "index.tsv"
    if existing_path.is_file():
        existing = read_tsv(existing_path)
        if not existing[INDEX_COLUMNS].astype(str).equals(index[INDEX_COLUMNS].astype(str)):
            raise LeukotypeError(
                f"{existing_path} lists different samples than the matrix being written for "
                f"layer {layer!r}; write to an empty folder"
            )
    with atomic_path(out_dir / f"{layer}.npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    write_tsv(index, existing_path)


def feature_dim(feature_dir: str | os.PathLike, layer: str) -> int:
    """Columns of ``layer`` in a feature folder, from the ``.npy`` header (nothing is loaded)."""
    path = Path(feature_dir) / f"{layer}.npy"
    if not path.is_file():
        raise LeukotypeError(f"no features for layer {layer!r} in {feature_dir} (missing {path.name})")
    return int(np.load(path, mmap_mode="r").shape[1])


def _read_folder(feature_dir: Path, layer: str) -> tuple[pd.DataFrame, np.ndarray]:
    index_path, matrix_path = feature_dir / "index.tsv", feature_dir / f"{layer}.npy"
    if not index_path.is_file():
        raise LeukotypeError(f"no feature index at {index_path}; extract features first")
    if not matrix_path.is_file():
        available = sorted(p.stem for p in feature_dir.glob("*.npy"))
        raise LeukotypeError(
            f"layer {layer!r} not extracted in {feature_dir}; available layers: {available}"
        )
    index = read_tsv(index_path, dtype={"image_id": str, "transform": str})
    matrix = np.load(matrix_path, mmap_mode="r")
    if matrix.ndim != 2 or matrix.shape[0] != len(index):
        raise LeukotypeError(
            f"{matrix_path} has shape {matrix.shape} but {index_path} lists {len(index)} rows; "
            "the folder is inconsistent, extract again"
        )
    return index, matrix


def load_features(
    feature_dirs: Sequence[str | os.PathLike] | str | os.PathLike,
    layer: str | Sequence[str],
    samples: pd.DataFrame,
) -> np.ndarray:
    """Float32 (len(samples), D) matrix: rows for ``samples`` (image_id, transform) in order.

    With several folders (the parts of a combined backbone) their columns are concatenated in
    folder order; ``layer`` is one name for all, or one per folder (parts whose penultimate
    layers are named differently). Missing samples raise LeukotypeError naming a few of them.
    """
    if isinstance(feature_dirs, (str, os.PathLike)):
        feature_dirs = [feature_dirs]
    if not feature_dirs:
        raise LeukotypeError("load_features needs at least one feature folder")
    layers = [layer] * len(feature_dirs) if isinstance(layer, str) else list(layer)
    if len(layers) != len(feature_dirs):
        raise LeukotypeError(f"load_features: {len(layers)} layers for {len(feature_dirs)} folders")
    wanted = samples[SAMPLE_KEY].astype(str).reset_index(drop=True)
    blocks = []
    for feature_dir, layer in zip(map(Path, feature_dirs), layers):
        index, matrix = _read_folder(feature_dir, layer)
        located = wanted.merge(index[INDEX_COLUMNS], on=SAMPLE_KEY, how="left", validate="m:1")
        absent = located["row"].isna()
        if absent.any():
            examples = located.loc[absent, SAMPLE_KEY].head(5).to_records(index=False).tolist()
            raise LeukotypeError(
                f"{int(absent.sum())} of {len(wanted)} samples have no features in {feature_dir} "
                f"(layer {layer!r}), e.g. {examples}; re-run extraction for the current images "
                "and augmentation settings"
            )
        rows = located["row"].to_numpy(dtype=np.int64)
        blocks.append(np.asarray(matrix[rows], dtype=np.float32))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)

"""Benchmark data for the SVM scaling benchmarks: real PBC features and sizes derived from them.

The shared PBC subset holds 800 images (8 classes x 100), far fewer than the 7k-200k training
rows the scaling questions are about. So:

- ``real_features``: EfficientNet-Lite0 (ImageNet weights, the workflow's extractor, fp32) on
  every image under every lossless transform of ``leukotype.augment.TRANSFORMS`` (identity,
  rot90/180/270, flip_h, flip_v): 800 x 6 = 4,800 real feature rows, grouped by image. Cached
  in a folder (the workflow's feature format), so reruns skip the extraction.
- ``derived_rows``: larger matrices drawn from those rows by a stated generator (below), so the
  timing and memory numbers run on data with the real features' dimension, scale, class
  structure and spectrum. Their accuracies describe the generator, not PBC.

Generator (``derived_rows(X, y, groups, n, seed)``): row i picks a class c (round robin), two
distinct real *images* a, b of class c (uniformly), one view of each, and returns
``lam * x_a + (1 - lam) * x_b + eps`` with ``lam ~ U(0, 1)`` and ``eps ~ N(0, (0.1 s)^2)``
per feature (``s`` = the real features' per-feature standard deviation). Group of row i: a
synthetic "image" id shared by ``views`` consecutive rows of the same (a, b) pair with
different lam/eps, so grouped inner folds keep those together like rotations of one image.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

from leukotype.augment import TRANSFORMS

BACKBONE = "efficientnet_lite0"


def real_features(data: Path, cache: Path, threads: int = 2, num_workers: int = 1,
                  transforms=TRANSFORMS) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """(X float32, table[image_id, transform, label, group], info) for every PBC image x view.

    ``info`` holds the extraction's seconds, samples/s and the process's user/sys CPU seconds
    (``resource.getrusage``, self + children: the decoding worker is a child) when it ran now,
    or what the cached run recorded.
    """
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common

    from leukotype.features import extract_features
    from leukotype.feature_store import load_features
    from leukotype.weights import resolve_weights

    images, source = common.image_table(Path(data), 10**9, cache)
    samples = common.sample_table(images, transforms)
    layer = "pool"
    out = Path(cache) / BACKBONE
    info_path = Path(cache) / "extraction_info.json"
    if not (out / "meta.json").is_file():
        before = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        started = time.perf_counter()
        extract_features(samples, BACKBONE, resolve_weights(BACKBONE, "imagenet"), [layer], out,
                         threads=threads, num_workers=num_workers, progress=False)
        seconds = time.perf_counter() - started
        after = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        info = {
            "source": source, "backbone": BACKBONE, "n_samples": len(samples),
            "seconds": seconds, "samples_per_s": len(samples) / seconds,
            "threads": threads, "num_workers": num_workers,
            "user_s": sum(a.ru_utime - b.ru_utime for a, b in zip(after, before)),
            "sys_s": sum(a.ru_stime - b.ru_stime for a, b in zip(after, before)),
            "load_avg_1m": common.load_avg(),
        }
        info_path.write_text(json.dumps(info, indent=1))
    info = json.loads(info_path.read_text())
    X = load_features([out], layer, samples[["image_id", "transform"]])
    table = samples[["image_id", "transform", "label"]].copy()
    table["group"] = table["image_id"]
    return X, table.reset_index(drop=True), info


def derived_rows(X: np.ndarray, labels, groups, n: int, seed: int = 0, views: int = 4,
                 noise: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` rows drawn from real rows by the generator in the module doc (float32)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels).astype(str)
    groups = np.asarray(groups).astype(str)
    classes = np.unique(labels)
    sd = X.std(axis=0).astype(np.float32)
    # rows of each image, images of each class
    by_image: dict[str, np.ndarray] = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
    images_of = {c: np.unique(groups[labels == c]) for c in classes}
    n_pairs = -(-n // views)
    out = np.empty((n_pairs * views, X.shape[1]), dtype=np.float32)
    y = np.empty(n_pairs * views, dtype=object)
    g = np.empty(n_pairs * views, dtype=object)
    for p in range(n_pairs):
        c = classes[p % len(classes)]
        a, b = rng.choice(images_of[c], size=2, replace=False)
        rows = slice(p * views, (p + 1) * views)
        ia = rng.choice(by_image[a], size=views)
        ib = rng.choice(by_image[b], size=views)
        lam = rng.random((views, 1), dtype=np.float32)
        eps = rng.standard_normal((views, X.shape[1]), dtype=np.float32) * (noise * sd)
        out[rows] = lam * X[ia] + (1 - lam) * X[ib] + eps
        y[rows] = c
        g[rows] = f"syn{p:07d}"
    return out[:n], y[:n].astype(str), g[:n].astype(str)

"""2-D maps of the test features (t-SNE from scikit-learn), coloured by class.

One embedding per backbone and layer, computed once on the test images of every task (each
image once, untransformed) and drawn as one panel per task, so that the panels are comparable
and the classes of a task are seen where that task tests them. Images of other datasets
(external test sets) get their own marker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from leukotype.errors import LeukotypeError
from leukotype.report import _new_figure, save_figure, wrap_title

#: Markers per dataset: the internal test set first, then external ones in order.
_MARKERS = ("o", "^", "s", "D", "v", "P", "X")
#: Dataset name of the internal test images in a map's points.
INTERNAL = "internal"


def subsample(labels: Sequence[Any], max_points: int, seed: int) -> np.ndarray:
    """Indices of at most ``max_points`` items, the same fraction of every label (seeded)."""
    labels = np.asarray([str(v) for v in labels], dtype=object)
    n = len(labels)
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = []
    for value in sorted(set(labels)):
        members = np.flatnonzero(labels == value)
        take = max(1, round(len(members) * max_points / n))
        keep.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(keep))[:max_points]


def tsne_embedding(
    features: np.ndarray, seed: int = 0, perplexity: float = 30.0, threads: int = 1
) -> np.ndarray:
    """(n, 2) t-SNE of standardised features (PCA to 50 dimensions first, the usual practice
    for speed and noise). Perplexity is capped below a third of the number of images, as
    t-SNE needs; fewer than 5 images cannot be embedded.

    OpenMP threads are held to ``threads`` (the job's): scikit-learn's Barnes-Hut gradient
    otherwise starts one thread per core, and on a shared machine spinning threads made a
    30-point map take 35 s instead of 1 s (measured on the 2-core development machine).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n < 5:
        raise LeukotypeError(f"a t-SNE map needs at least 5 images, got {n}")
    x = StandardScaler().fit_transform(x)
    components = min(50, n, x.shape[1])
    if x.shape[1] > components:
        x = PCA(n_components=components, random_state=seed).fit_transform(x)
    perplexity = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(max(1, int(threads))):
        return tsne.fit_transform(x)


def plot_feature_map(
    embedding: np.ndarray,
    panels: Sequence[tuple[str, Sequence[Any], Sequence[str]]],
    path: str | os.PathLike,
    title: str,
    datasets: Sequence[str] | None = None,
) -> Figure:
    """One scatter panel per ``(panel title, label per point or '' if not shown, classes)``.

    ``datasets`` (one name per point) gives each dataset its own marker; the first name seen
    is taken as the internal one.
    """
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    embedding = np.asarray(embedding, dtype=float)
    names = list(dict.fromkeys(datasets)) if datasets is not None else []
    n_panels = len(panels)
    width = 4.6 * n_panels + 1.0
    fig = _new_figure(width, 4.8)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    for ax, (panel_title, labels, classes) in zip(axes, panels):
        labels = np.asarray([str(v) for v in labels], dtype=object)
        palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
        handles = []
        for k, cls in enumerate(classes):
            colour = palette(k % palette.N)
            for d, name in enumerate(names or [None]):
                mask = labels == cls
                if name is not None:
                    mask &= np.asarray(datasets) == name
                if mask.any():
                    ax.scatter(embedding[mask, 0], embedding[mask, 1], s=12, alpha=0.8,
                               color=colour, marker=_MARKERS[d % len(_MARKERS)], linewidths=0)
            handles.append(Line2D([], [], color=colour, marker="o", linestyle="", label=cls))
        present = [n for n in names if ((np.asarray(datasets) == n) & (labels != "")).any()]
        for d, name in enumerate(names if len(present) > 1 else []):
            if name not in present:
                continue  # no point of this dataset in this panel (a task it is not scored on)
            handles.append(Line2D([], [], color="black", marker=_MARKERS[d % len(_MARKERS)],
                                  linestyle="", label=f"data: {name}"))
        shown = int((labels != "").sum())
        ax.set_title(wrap_title(f"{panel_title} (n = {shown})", width / n_panels, 9), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(handles=handles, fontsize=7, loc="best", frameon=False)
    fig.suptitle(wrap_title(title, width), fontsize=11)
    return save_figure(fig, path)


def feature_map_inputs(
    samples: Mapping[str, pd.DataFrame],
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Test image ids over all tasks (sorted) and, per task, ``image_id -> class`` of its
    test images (``samples``: task name -> augmented samples table)."""
    per_task: dict[str, dict[str, str]] = {}
    for task, table in samples.items():
        test = table[(table["part"].astype(str) == "test")
                     & (table["transform"].astype(str) == "identity")]
        per_task[task] = dict(zip(test["image_id"].astype(str), test["label"].astype(str)))
    ids = sorted(set().union(*[set(m) for m in per_task.values()])) if per_task else []
    if not ids:
        raise LeukotypeError("no test images to map")
    return ids, per_task


def map_points(
    datasets: Mapping[str, tuple[Sequence[str], Mapping[str, Mapping[str, str]]]],
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The points of one joint map over several datasets (internal test images first, then
    each external set): ``datasets`` is name -> (image ids, {task: image_id -> class}), as
    :func:`feature_map_inputs` gives. Image ids are only unique within a dataset, so a point is
    ``(dataset, image_id)``. Returns the points (``dataset, image_id``) and, per task (every
    task any dataset labels), each point's class or '' where the point is not in that panel."""
    tasks = list(dict.fromkeys(t for _, per_task in datasets.values() for t in per_task))
    rows, labels = [], {task: [] for task in tasks}
    for name, (ids, per_task) in datasets.items():
        for image_id in ids:
            rows.append((name, str(image_id)))
            for task in tasks:
                labels[task].append(per_task.get(task, {}).get(str(image_id), ""))
    return pd.DataFrame(rows, columns=["dataset", "image_id"]), labels

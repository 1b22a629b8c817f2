"""The report's saliency gallery: correctly and wrongly classified test cells of a task's best
run (the one ``export_model`` bundled), each with its saliency map for the predicted class.

The cells come from the run's ``predictions.tsv`` (identity rows of the test part, one per test
image): the most confident correct ones and the most confident wrong ones (a confident error is
the one worth looking at), taken round-robin over the true classes so every class shows, ties
broken by ``image_id``. The maps are the bundle's (:func:`leukotype.saliency.explain_images`),
so the gallery shows what ``leukotype explain`` gives a user for the same images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leukotype.errors import LeukotypeError

log = logging.getLogger(__name__)

GALLERY_COLUMNS = ("kind", "image_id", "path", "true", "pred", "confidence", "map")


def _confidence(rows: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Top probability where the run has probabilities, else the top raw score."""
    for prefix in ("prob_", "score_"):
        columns = [f"{prefix}{c}" for c in classes]
        if all(c in rows.columns for c in columns):
            return rows[columns].to_numpy(dtype=np.float64).max(axis=1)
    raise LeukotypeError(f"predictions have neither prob_ nor score_ columns for classes {list(classes)}")


def _round_robin(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to ``n`` rows, most confident first within each true class, classes in turn."""
    ranked = rows.sort_values(["confidence", "image_id"], ascending=[False, True], kind="stable")
    ranked = ranked.assign(rank=ranked.groupby("true", sort=False).cumcount())
    return ranked.sort_values(["rank", "true"], kind="stable").head(n).drop(columns="rank")


def select_cells(predictions: pd.DataFrame, classes: Sequence[str], n_correct: int, n_wrong: int) -> pd.DataFrame:
    """``kind`` (correct|wrong), ``image_id``, ``true``, ``pred``, ``confidence`` of the gallery's
    cells: ``min(n, available)`` of each kind (see the module doc), correct ones first."""
    from leukotype.metrics import scored_rows

    rows = scored_rows(predictions).copy()
    rows["true"], rows["pred"] = rows["true"].astype(str), rows["pred"].astype(str)
    rows["confidence"] = _confidence(rows, classes)
    right = rows["true"] == rows["pred"]
    parts = [
        _round_robin(rows[right], n_correct).assign(kind="correct"),
        _round_robin(rows[~right], n_wrong).assign(kind="wrong"),
    ]
    return pd.concat(parts, ignore_index=True)[["kind", "image_id", "true", "pred", "confidence"]]


def plot_gallery(cells: pd.DataFrame, pictures: Sequence[Any], task: str, run_label: str,
                 path: str | os.PathLike, note: str = "", dataset: str | None = None, cam: str = "LayerCAM"):
    """Two rows of tiles (correct, wrong): each picture titled ``true → pred (confidence)``;
    ``cam``: the maps' method (:func:`leukotype.saliency.cam_method`)."""
    from leukotype.report import _new_figure, save_figure, wrap_title

    kinds = ("correct", "wrong")
    columns = max(1, max((int((cells["kind"] == k).sum()) for k in kinds), default=1))
    width = 1.9 * columns + 0.6
    fig = _new_figure(width, 2.3 * len(kinds) + 1.0)
    for r, kind in enumerate(kinds):
        chosen = cells.index[cells["kind"] == kind]
        if not len(chosen):
            ax = fig.add_subplot(len(kinds), 1, r + 1)
            ax.axis("off")
            ax.text(0.5, 0.5, f"no {kind}ly classified test cell", ha="center", va="center", fontsize=9)
            continue
        for c, index in enumerate(chosen):
            ax = fig.add_subplot(len(kinds), columns, r * columns + c + 1)
            ax.imshow(np.asarray(pictures[index]))
            ax.set_xticks([]), ax.set_yticks([])
            row = cells.loc[index]
            ax.set_title(f"{row['true']} → {row['pred']}\n({row['confidence']:.2f})", fontsize=7,
                         color="black" if kind == "correct" else "firebrick")
            if c == 0:
                ax.set_ylabel(kind, fontsize=9)
    title = f"{task}: correctly and wrongly classified test cells of the best run ({run_label})"
    title += f"\n{note}" if note else f"\nmap: {cam} of the predicted class (red = most evidence)"
    if dataset:
        title += f"\n{dataset}"
    fig.suptitle(wrap_title(title, width, 9), fontsize=9)
    return save_figure(fig, path)


def run_gallery(
    bundle_dir: str | os.PathLike,
    predictions: Sequence[str | os.PathLike],
    validated: str | os.PathLike,
    n_correct: int,
    n_wrong: int,
    out_png: str | os.PathLike,
    out_tsv: str | os.PathLike,
    dataset: str | None = None,
    threads: int = 1,
) -> pd.DataFrame:
    """Gallery of the bundled run: ``out_tsv`` lists the cells (``GALLERY_COLUMNS``; ``map`` is
    ``yes``, ``empty: ...`` (:func:`leukotype.saliency.map_status`), or why there is none),
    ``out_png`` shows them with their maps."""
    import torch
    from PIL import Image

    from leukotype.images import load_rgb
    from leukotype.io import read_tsv, write_tsv
    from leukotype.predict import Predictor
    from leukotype.saliency import cam_method, explain_images, map_status, unexplainable_reason

    predictor = Predictor(bundle_dir, device="cpu", threads=threads)
    spec = predictor.bundle.spec
    run_path = spec["run"]["path"]
    matching = [p for p in predictions if Path(p).parent.as_posix().endswith(run_path)]
    if not matching:
        raise LeukotypeError(f"the bundle's run {run_path} is not among the task's predictions")
    cells = select_cells(read_tsv(matching[0]), predictor.bundle.classes, n_correct, n_wrong)
    paths = read_tsv(validated).set_index("image_id")
    cells.insert(2, "path", paths.loc[cells["image_id"], "path"].astype(str).to_numpy())
    abspaths = paths.loc[cells["image_id"], "abspath"].astype(str).tolist()
    torch.set_num_threads(max(1, threads))
    reason = unexplainable_reason(predictor.bundle)
    explained: list[Any] = []
    if reason:
        log.warning("no saliency maps for the gallery: %s", reason)
    else:
        try:
            explained = explain_images(predictor, abspaths)
        except (LeukotypeError, RuntimeError, ValueError) as error:  # e.g. no spatial feature map
            log.warning("no saliency maps for the gallery: %s", error)
            reason = str(error)
    if reason:
        steps = next(iter(spec["preprocessing"].values()))
        size = int(next(step["size"] for step in steps if step["op"] == "center_crop"))
        pictures = [load_rgb(p).resize((size, size)) for p in abspaths]
        cells["map"] = f"none: {reason}"
    else:
        pictures = [picture for _cls, _cam, picture in explained]
        mapped = [cls for cls, _cam, _picture in explained]
        if mapped != cells["pred"].tolist():  # the bundle reproduces its run (tested); say so if not
            log.warning("bundle predictions %s differ from the run's %s", mapped, cells["pred"].tolist())
        cells["map"] = [map_status(cam) for _cls, cam, _picture in explained]
    label = spec["display_name"]
    plot_gallery(cells, [Image.fromarray(np.asarray(p)) for p in pictures], spec["task"]["name"], label,
                 out_png, note=f"no saliency maps: {reason}" if reason else "", dataset=dataset,
                 cam=cam_method(predictor))
    write_tsv(cells[list(GALLERY_COLUMNS)], out_tsv)
    return cells

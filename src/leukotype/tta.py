"""Test-time augmentation: a test image's scores averaged over its extracted views.

With ``evaluation.tta`` on, the sample table lists every test image under every configured
transform (rotations, reflections; ``augment.augmented_samples``), so the runs predict each
view; the views come from the same per image x transform feature cache as training views.
The run's own metrics stay those of the untransformed (``identity``) view; the TTA metrics
(``accuracy_tta``, ``balanced_accuracy_tta``) score the label of the averaged scores, so the
tables show each run with and without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from leukotype.errors import LeukotypeError

#: Metrics of the TTA predictions, summarised over folds like the run's own metrics.
TTA_METRICS = {"accuracy_tta": "accuracy", "balanced_accuracy_tta": "balanced_accuracy"}


def score_columns(pred_df: pd.DataFrame, classes: Sequence[str]) -> list[str]:
    """The columns averaged: calibrated probabilities where the run has them, else raw scores."""
    for prefix in ("prob_", "score_"):
        columns = [f"{prefix}{c}" for c in classes]
        if all(c in pred_df.columns for c in columns):
            return columns
    raise LeukotypeError(f"prediction table has neither prob_<class> nor score_<class> columns for {list(classes)}")


def has_views(pred_df: pd.DataFrame) -> bool:
    """True when some test image is predicted under more than the identity view."""
    return bool((pred_df["transform"].astype(str) != "identity").any())


def tta_predictions(pred_df: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """One row per image: the mean of its views' score columns, ``pred`` their argmax.

    Columns ``image_id, transform ('identity', so scored_rows reads it), true, pred, n_views``
    and the averaged score columns; images keep their first appearance's order.
    """
    classes = [str(c) for c in classes]
    columns = score_columns(pred_df, classes)
    frame = pred_df.assign(image_id=pred_df["image_id"].astype(str))
    grouped = frame.groupby("image_id", sort=False)
    truths = grouped["true"].nunique()
    if (truths > 1).any():
        raise LeukotypeError(f"views of images {truths[truths > 1].index[:5].tolist()} disagree on the true label")
    mean = grouped[columns].mean()
    scores = mean.to_numpy(dtype=float)
    result = pd.DataFrame(
        {
            "image_id": mean.index.to_numpy(),
            "transform": "identity",
            "true": grouped["true"].first().loc[mean.index].astype(str).to_numpy(),
            "pred": np.asarray(classes, dtype=object)[np.argmax(scores, axis=1)],
            "n_views": grouped.size().loc[mean.index].to_numpy(),
        }
    )
    for k, column in enumerate(columns):
        result[column] = scores[:, k]
    return result

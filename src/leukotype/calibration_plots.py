"""Reliability diagrams: how often each run's predictions are right at each stated confidence."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from leukotype import catalog
from leukotype.report import _new_figure, save_figure, technique_and_classifier, wrap_title


def _label(record: Mapping[str, Any]) -> str:
    technique, classifier = technique_and_classifier(record["strategy"])
    model = catalog.display_name(record["backbone"])
    layer = record.get("layer", "")
    if layer in {"fc6", "fc7"}:
        model = f"{model} ({layer})"
    return f"{technique}: {model}" + (f" + {classifier}" if classifier and "SVM" in classifier else "")


def plot_reliability(
    records: Sequence[Mapping[str, Any]], task: str, path: str | os.PathLike, dataset: str | None = None
):
    """One curve per run (test part, bins pooled over folds): accuracy against mean confidence,
    with the diagonal of perfect calibration and each run's ECE in the legend."""
    pooled: dict[str, dict[str, Any]] = {}
    for record in records:
        bins = record.get("reliability")
        if not bins:
            continue
        entry = pooled.setdefault(_label(record), {"count": 0.0, "conf": 0.0, "correct": 0.0, "ece": []})
        count = np.asarray(bins["count"], dtype=float)
        entry["count"] = entry["count"] + count
        entry["conf"] = entry["conf"] + np.nan_to_num(np.asarray(bins["confidence"], dtype=float)) * count
        entry["correct"] = entry["correct"] + np.nan_to_num(np.asarray(bins["accuracy"], dtype=float)) * count
        entry["ece"].append(record["metrics"].get("ece"))
    fig = _new_figure(6.4, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    for label, entry in pooled.items():
        used = entry["count"] > 0
        ece = np.nanmean([v for v in entry["ece"] if v is not None]) if any(v is not None for v in entry["ece"]) else np.nan
        ax.plot(entry["conf"][used] / entry["count"][used], entry["correct"][used] / entry["count"][used],
                marker="o", markersize=3, linewidth=1.2, label=f"{label} (ECE {100 * ece:.1f}%)")
    if not pooled:
        ax.text(0.5, 0.5, "no run of this task has probabilities", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top predicted probability)")
    ax.set_ylabel("accuracy")
    title = f"{task}: reliability of the predicted probabilities (test part)"
    if dataset:
        title += f"\n{dataset}"
    ax.set_title(wrap_title(title, 6.4, 10), fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)

"""Internal vs external results side by side: a table per task and a figure with the drop."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from leukotype.compare import record_run_key, standing_against_best
from leukotype.comparison_report import STANDING_COLUMN
from leukotype.errors import LeukotypeError
from leukotype.external import ADAPTATIONS
from leukotype.report import (
    _new_figure,
    _sort_key,
    format_interval,
    model_display_name,
    save_figure,
    technique_and_classifier,
)

#: How the adaptation of a row is shown (``shots``: see :func:`adaptation_name`).
ADAPTATION_NAMES = {"none": "none", "bn": "BatchNorm re-estimated (test-time)"}


def adaptation_name(
    adapt: str, shots_per_class: Mapping[str, int] | None = None, shot_method: str | None = None
) -> str:
    """A row's adaptation in words; a few-shot row names the cells per class it trained on
    (fewer than ``train_per_class`` where a class has few: at most half of it trains) and,
    when they were feature-augmented, says so (``shot_method``)."""
    if adapt == "shots":
        counts = ", ".join(f"{c} {n}" for c, n in (shots_per_class or {}).items())
        how = " (feature-augmented: a part shared by both labs, one of each lab's own)" if shot_method == "augment" else ""
        return f"few-shot: SVM refitted with the set's labelled cells ({counts}){how}; scored on its other cells"
    return ADAPTATION_NAMES.get(adapt, adapt)

#: ``vs best`` of a few-shot row: scored on the cells it did not train on, so not paired.
NOT_PAIRED = "not compared (scored on other cells)"

EXTERNAL_COLUMNS = (
    "Technique",
    "Model",
    "Classifier",
    "Preprocessing",
    "Adaptation",
    "External set",
    "Shared classes",
    "Internal accuracy",
    "Internal accuracy (shared)",
    "External accuracy",
    "External 95% CI",
    "Drop",
    "Internal balanced accuracy (shared)",
    "External balanced accuracy",
    "External balanced 95% CI",
    "Balanced drop",
    "External n",
    "Folds",
)


def _key(record: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return (str(record["strategy"]), str(record["backbone"]), str(record["layer"]), str(record.get("prep", "")))


def _mean(values: Sequence[Any]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def _pct(value: float, sd: float = math.nan) -> str:
    if not math.isfinite(value):
        return "n/a"
    text = f"{100 * value:.1f}"
    return f"{text} ± {100 * sd:.1f}" if math.isfinite(sd) else text


def _adapt_order(adapt: str) -> int:
    return ADAPTATIONS.index(adapt) if adapt in ADAPTATIONS else len(ADAPTATIONS)


def summarise_external(
    records: Sequence[Mapping[str, Any]], internal: Sequence[Mapping[str, Any]], task: str
) -> pd.DataFrame:
    """One row per (strategy, backbone, layer, prep, external set, adaptation) of ``task``:
    mean over folds of each metric (hold-out: the value and its bootstrap CI)."""
    internal_acc: dict[tuple, list[float]] = {}
    for rec in internal:
        if str(rec.get("task")) == task:
            internal_acc.setdefault(_key(rec), []).append(rec["metrics"]["accuracy"])
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for rec in records:
        if str(rec.get("task")) == task:
            groups.setdefault((*_key(rec), str(rec["external"]), str(rec.get("adapt", "none"))), []).append(rec)
    rows = []
    for (strategy, backbone, layer, prep, ext, adapt), recs in groups.items():
        def metric(part: str, name: str) -> list[Any]:
            return [(r.get(part) or {}).get(name) for r in recs]

        row: dict[str, Any] = {
            "strategy": strategy, "backbone": backbone, "layer": layer, "prep": prep,
            "external": ext, "adapt": adapt, "n_folds": len(recs),
            "shared_classes": ", ".join(recs[0].get("shared_classes", [])),
            "n_shared": len(recs[0].get("shared_classes", [])),
            "n_external": int(recs[0].get("n_external") or 0),
            "internal_accuracy": _mean(internal_acc.get((strategy, backbone, layer, prep), [])),
            "run_key": record_run_key(recs[0]),
            "shots_per_class": recs[0].get("shots_per_class"),
            "shot_method": recs[0].get("shot_method"),
        }
        if adapt == "shots":  # the refitted model's accuracy on the internal test part
            row["internal_accuracy"] = _mean([r.get("internal_accuracy_all") for r in recs])
        for name in ("accuracy", "balanced_accuracy"):
            ext_values, int_values = metric("external_metrics", name), metric("internal_metrics", name)
            row[f"external_{name}"] = _mean(ext_values)
            row[f"internal_shared_{name}"] = _mean(int_values)
            row[f"drop_{name}"] = _mean(metric("drop", name))
            finite = [float(v) for v in ext_values if v is not None]
            row[f"external_{name}_sd"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
            if len(recs) == 1 and recs[0].get("external_ci"):
                row[f"external_{name}_ci_lo"], row[f"external_{name}_ci_hi"] = recs[0]["external_ci"][name]
            else:
                row[f"external_{name}_ci_lo"] = row[f"external_{name}_ci_hi"] = math.nan
        rows.append(row)
    if not rows:
        raise LeukotypeError(f"no external results for task {task!r}")
    frame = pd.DataFrame(rows)
    order = sorted(
        range(len(frame)),
        key=lambda i: (
            *_sort_key(frame["strategy"][i], frame["backbone"][i], frame["layer"][i]),
            frame["prep"][i], frame["external"][i], _adapt_order(frame["adapt"][i]),
        ),
    )
    return frame.iloc[order].reset_index(drop=True)


def external_table(
    records: Sequence[Mapping[str, Any]],
    internal: Sequence[Mapping[str, Any]],
    task: str,
    displays: Mapping[str, str] | None = None,
    dataset: str | None = None,
    comparisons: Mapping[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Paper-style strings: internal (all classes, shared classes) vs external, and the drop
    in points (internal on the shared classes minus external).

    ``comparisons`` (external set name -> its :func:`leukotype.compare.compare_runs` table)
    adds the :data:`~leukotype.comparison_report.STANDING_COLUMN`: per set, the best run and
    each run not significantly worse than it (BatchNorm-adapted rows are runs of their own).
    """
    summary = summarise_external(records, internal, task)
    displays = displays or {}
    standing: dict[tuple[str, str], str] = {}
    for name, pairs in (comparisons or {}).items():
        # few-shot rows are scored on other cells than the rest: not in the paired comparison
        keys = list(summary.loc[(summary["external"] == name) & (summary["adapt"] != "shots"), "run_key"])
        standing.update({(name, k): v for k, v in standing_against_best(pairs, keys).items()})
    out = []
    for _, row in summary.iterrows():
        technique, classifier = technique_and_classifier(row["strategy"])
        n_folds = int(row["n_folds"])
        out.append(
            {
                "Technique": technique,
                "Model": model_display_name(row["backbone"], row["layer"]),
                "Classifier": classifier,
                "Preprocessing": row["prep"] or "none",
                "Adaptation": adaptation_name(row["adapt"], row["shots_per_class"], row["shot_method"]),
                "External set": displays.get(row["external"], row["external"]),
                "Shared classes": f"{row['n_shared']}: {row['shared_classes']}",
                "Internal accuracy": _pct(row["internal_accuracy"]),
                "Internal accuracy (shared)": _pct(row["internal_shared_accuracy"]),
                "External accuracy": _pct(row["external_accuracy"], row["external_accuracy_sd"]),
                "External 95% CI": format_interval(row["external_accuracy_ci_lo"], row["external_accuracy_ci_hi"]),
                "Drop": _pct(row["drop_accuracy"]),
                "Internal balanced accuracy (shared)": _pct(row["internal_shared_balanced_accuracy"]),
                "External balanced accuracy": _pct(row["external_balanced_accuracy"], row["external_balanced_accuracy_sd"]),
                "External balanced 95% CI": format_interval(row["external_balanced_accuracy_ci_lo"], row["external_balanced_accuracy_ci_hi"]),
                "Balanced drop": _pct(row["drop_balanced_accuracy"]),
                "External n": str(row["n_external"]),
                "Folds": "hold-out" if n_folds == 1 else str(n_folds),
            }
        )
    table = pd.DataFrame(out, columns=list(EXTERNAL_COLUMNS))
    if comparisons is not None:
        table[STANDING_COLUMN] = [
            NOT_PAIRED if adapt == "shots" else standing.get((str(ext), str(key)), "")
            for ext, key, adapt in zip(summary["external"], summary["run_key"], summary["adapt"])
        ]
    if dataset:
        table["Data"] = dataset
    return table


def plot_external(
    records: Sequence[Mapping[str, Any]],
    internal: Sequence[Mapping[str, Any]],
    task: str,
    path: str | os.PathLike,
    displays: Mapping[str, str] | None = None,
    dataset: str | None = None,
) -> Any:
    """Paired bars per run: internal accuracy on the shared classes and external accuracy
    (95% CI), the drop written next to them."""
    summary = summarise_external(records, internal, task)
    displays = displays or {}
    labels = []
    for _, row in summary.iterrows():
        label = f"{model_display_name(row['backbone'], row['layer'])} — {technique_and_classifier(row['strategy'])[0]}"
        if row["prep"] not in ("", "none"):
            label += f" [{row['prep']}]"
        if row["adapt"] == "bn":
            label += " + BN adapt"
        elif row["adapt"] == "shots":
            label += f" + {sum((row['shots_per_class'] or {}).values())} lab cells"
            label += " (augmented)" if row["shot_method"] == "augment" else ""
        labels.append(f"{label} → {displays.get(row['external'], row['external'])}")
    n = len(summary)
    fig = _new_figure(9.0, 2.0 + 0.55 * n)
    ax = fig.add_subplot()
    y = np.arange(n)
    internal_values = 100 * summary["internal_shared_accuracy"].to_numpy(dtype=float)
    external_values = 100 * summary["external_accuracy"].to_numpy(dtype=float)
    low = 100 * summary["external_accuracy_ci_lo"].to_numpy(dtype=float)
    high = 100 * summary["external_accuracy_ci_hi"].to_numpy(dtype=float)
    errors = np.nan_to_num(np.vstack([external_values - low, high - external_values]), nan=0.0).clip(min=0.0)
    ax.barh(y - 0.2, np.nan_to_num(internal_values), height=0.38, color="#1f77b4", label="internal test (shared classes)")
    ax.barh(y + 0.2, np.nan_to_num(external_values), height=0.38, color="#d62728", xerr=errors, capsize=3, label="external (shared classes), 95% CI")
    for yi, a, b in zip(y, internal_values, external_values):
        if math.isfinite(a) and math.isfinite(b):
            ax.text(min(max(a, b) + 2, 88), yi, f"drop {a - b:+.1f}".replace("+-", "-"), va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("Accuracy (%) on the classes the external set shares with the task")
    suffix = f" ({dataset})" if dataset else ""
    fig.suptitle(f"{task}: internal vs external accuracy{suffix}", fontsize=10)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)

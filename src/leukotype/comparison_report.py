"""Tables and figures of the paired comparisons, the best-run marks, baselines and per-class
tables: the presentation of :mod:`leukotype.compare`'s numbers (the statistics live there)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from leukotype.errors import LeukotypeError
from leukotype.io import atomic_write
from leukotype.report import (
    _new_figure,
    _runs_of_task,
    latex_table,
    markdown_table,
    save_figure,
    technique_and_classifier,
    wrap_title,
)

#: Column added to the main table: where each run stands against the best one.
STANDING_COLUMN = "vs best"
#: Left-aligned columns of the comparison and per-class tables.
_TEXT = frozenset({"Run A", "Run B", "Test", "Significant", "Class"})
#: Column added to the main table when published baselines are shown.
SOURCE_COLUMN = "Source"
THIS_WORKFLOW = "this workflow"


def _key(strategy: Any, model: Any) -> str:
    from leukotype.compare import run_key

    return run_key(str(strategy), str(model))


def run_labels(summary_df: pd.DataFrame, task: str) -> dict[str, str]:
    """``strategy:model`` -> ``VGG16 (fc6) — Feature extraction``, in table order."""
    rows = _runs_of_task(summary_df, task)
    return {
        _key(s, m): f"{name} — {technique_and_classifier(s)[0]}"
        for s, m, name in zip(rows["strategy"], rows["model"], rows["_display"])
    }


def table_run_keys(summary_df: pd.DataFrame, task: str) -> list[str]:
    """The run key of each row of :func:`leukotype.report.paper_table`, in its order."""
    rows = _runs_of_task(summary_df, task)
    return [_key(s, m) for s, m in zip(rows["strategy"], rows["model"])]


# --------------------------------------------------------------------------------------------
# the main table: best run and published baselines


def mark_standing(
    table: pd.DataFrame, keys: Sequence[str], standing: Mapping[str, str]
) -> pd.DataFrame:
    """The paper table with a :data:`STANDING_COLUMN`: ``best``, ``not significantly worse``
    or ``worse`` (``keys`` are the rows' run keys, ``standing`` from
    :func:`leukotype.compare.standing_against_best`)."""
    if len(keys) != len(table):
        raise LeukotypeError(f"{len(keys)} run keys for a table of {len(table)} rows")
    out = table.copy()
    out[STANDING_COLUMN] = [standing.get(key, "") for key in keys]
    return out


def add_baselines(
    table: pd.DataFrame, baselines: Sequence[Mapping[str, Any]]
) -> pd.DataFrame:
    """The table with published rows appended and a :data:`SOURCE_COLUMN` saying which rows
    this workflow computed and which are published (not reproduced here)."""
    from leukotype.baselines import baseline_rows

    if not baselines:
        return table
    ours = table.copy()
    ours[SOURCE_COLUMN] = THIS_WORKFLOW
    published = baseline_rows(baselines, list(ours.columns))
    if "Data" in published.columns:
        published["Data"] = [
            f"the study's own ({b['n_images']} images)" if b.get("n_images") else "the study's own"
            for b in baselines
        ]
    return pd.concat([ours, published], ignore_index=True)


# --------------------------------------------------------------------------------------------
# the comparison tables


def _points(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:+.1f}"


def _interval_points(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    return f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def _p(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def comparison_display(comparisons: pd.DataFrame, labels: Mapping[str, str]) -> pd.DataFrame:
    """The comparisons formatted for reading: differences A - B in percentage points."""
    rows = []
    for row in comparisons.itertuples(index=False):
        rows.append(
            {
                "Run A": labels.get(row.run_a, row.run_a),
                "Run B": labels.get(row.run_b, row.run_b),
                "Δ accuracy (pp)": _points(row.accuracy_diff),
                "Δ accuracy 95% CI": _interval_points(row.accuracy_ci_lo, row.accuracy_ci_hi),
                "Δ balanced acc. (pp)": _points(row.balanced_accuracy_diff),
                "Δ balanced acc. 95% CI": _interval_points(
                    row.balanced_accuracy_ci_lo, row.balanced_accuracy_ci_hi
                ),
                "Test": row.test,
                "p": _p(row.p_value),
                "p (Holm)": _p(row.p_holm),
                "Significant": "yes" if bool(row.significant) else "no",
            }
        )
    columns = [
        "Run A", "Run B", "Δ accuracy (pp)", "Δ accuracy 95% CI", "Δ balanced acc. (pp)",
        "Δ balanced acc. 95% CI", "Test", "p", "p (Holm)", "Significant",
    ]
    return pd.DataFrame(rows, columns=columns)


def write_comparison_tables(
    comparisons: pd.DataFrame,
    labels: Mapping[str, str],
    stem: str | os.PathLike,
    caption: str = "",
) -> dict[str, Path]:
    """``stem.csv`` (every number at full precision, plus the runs' labels), ``stem.md`` and
    ``stem.tex`` (formatted, differences in percentage points)."""
    stem = Path(stem)
    paths = {fmt: stem.with_name(f"{stem.name}.{fmt}") for fmt in ("csv", "md", "tex")}
    numbers = comparisons.copy()
    numbers.insert(3, "label_a", [labels.get(r, r) for r in numbers["run_a"]])
    numbers.insert(5, "label_b", [labels.get(r, r) for r in numbers["run_b"]])
    with atomic_write(paths["csv"], newline="") as handle:
        numbers.to_csv(handle, index=False)
    display = comparison_display(comparisons, labels)
    note = caption or ""
    with atomic_write(paths["md"]) as handle:
        if note:
            handle.write(note + "\n\n")
        handle.write(markdown_table(display, _TEXT) if len(display) else "(fewer than two runs)\n")
    with atomic_write(paths["tex"]) as handle:
        handle.write(latex_table(display, _TEXT))
    return paths


def comparison_caption(comparisons: pd.DataFrame, alpha: float) -> str:
    """One paragraph saying what the comparison table holds."""
    if comparisons.empty:
        return "Fewer than two runs: nothing to compare."
    scheme = str(comparisons["scheme"].iloc[0])
    if scheme == "holdout":
        method = (
            "A minus B on the same test images, with a paired percentile bootstrap 95% interval "
            "(whole groups resampled) and an exact McNemar test on the images exactly one run "
            "classifies correctly"
        )
    else:
        method = (
            "mean over folds of A minus B, with the Nadeau-Bengio corrected resampled t-test "
            "and its 95% interval"
        )
    return (
        f"Paired comparisons ({comparisons['test_set'].iloc[0]} test set): {method}; p-values "
        f"Holm-corrected over {len(comparisons)} pair{'s' if len(comparisons) > 1 else ''}, "
        f"significant at {alpha:g}. Run A is the "
        "higher-ranked run of each pair."
    )


# --------------------------------------------------------------------------------------------
# the comparison figure


def plot_comparison_matrix(
    comparisons: pd.DataFrame,
    labels: Mapping[str, str],
    path: str | os.PathLike,
    title: str,
    metric: str = "accuracy",
) -> Figure:
    """Matrix of differences row run - column run (percentage points), runs in rank order;
    cells whose pair is significant after Holm's correction carry a star and a frame."""
    runs: list[str] = []
    for row in comparisons.sort_values(["rank_a", "rank_b"]).itertuples():
        for run in (row.run_a, row.run_b):
            if run not in runs:
                runs.append(run)
    runs.sort(
        key=lambda r: int(
            comparisons.loc[comparisons["run_a"] == r, "rank_a"].min()
            if (comparisons["run_a"] == r).any()
            else comparisons.loc[comparisons["run_b"] == r, "rank_b"].min()
        )
    )
    n = len(runs)
    index = {run: i for i, run in enumerate(runs)}
    diff = np.full((n, n), np.nan)
    significant = np.zeros((n, n), dtype=bool)
    for row in comparisons.itertuples():
        i, j = index[row.run_a], index[row.run_b]
        value = 100 * float(getattr(row, f"{metric}_diff"))
        diff[i, j], diff[j, i] = value, 0.0 - value  # never a '-0.0' cell
        significant[i, j] = significant[j, i] = bool(row.significant)

    size = max(4.0, 2.5 + 0.55 * n)
    width = size + 3.5
    fig = _new_figure(width, size)
    ax = fig.add_subplot()
    limit = float(np.nanmax(np.abs(diff))) if n > 1 and np.isfinite(diff).any() else 1.0
    limit = max(limit, 1.0)
    image = ax.imshow(diff, cmap="RdBu", vmin=-limit, vmax=limit)
    font = max(5.0, 9.0 - 0.25 * n)
    for i in range(n):
        for j in range(n):
            if i == j or not math.isfinite(diff[i, j]):
                continue
            mark = "*" if significant[i, j] else ""
            ax.text(j, i, f"{diff[i, j]:+.1f}{mark}", ha="center", va="center", fontsize=font,
                    fontweight="bold" if mark else "normal",
                    color="white" if abs(diff[i, j]) > 0.6 * limit else "black")
            if mark:
                ax.add_patch(_frame(i, j))
    ax.set_xticks(range(n), [str(k + 1) for k in range(n)], fontsize=8)
    ax.set_yticks(range(n), [f"{k + 1}. {labels.get(r, r)}" for k, r in enumerate(runs)],
                  fontsize=8)
    ax.set_xlabel("column run (by rank)")
    name = "accuracy" if metric == "accuracy" else metric.replace("_", " ")
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"{name}: row − column (percentage points)")
    fig.suptitle(
        wrap_title(f"{title}\n* significant after Holm's correction", width), fontsize=11
    )
    return save_figure(fig, path)


def _frame(i: int, j: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5)


# --------------------------------------------------------------------------------------------
# per-class tables


def per_class_table(records: Sequence[Mapping[str, Any]], labels: Mapping[str, str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class for every run (k-fold: from the confusion
    matrix summed over folds). Rows in ``labels``' order, then class order."""
    from leukotype.metrics import metrics_from_confusion, model_id

    pooled: dict[str, dict[str, Any]] = {}
    for record in records:
        model = record.get("model") or model_id(record["backbone"], record.get("layer"))
        key = _key(record["strategy"], model)
        entry = pooled.setdefault(
            key, {"classes": [str(c) for c in record["classes"]], "confusion": 0, "folds": 0}
        )
        entry["confusion"] = entry["confusion"] + np.asarray(record["confusion"], dtype=int)
        entry["folds"] += 1
    order = [k for k in labels if k in pooled] + sorted(set(pooled) - set(labels))
    rows = []
    for key in order:
        entry = pooled[key]
        values = metrics_from_confusion(np.asarray(entry["confusion"]))
        for k, cls in enumerate(entry["classes"]):
            rows.append(
                {
                    "run": key,
                    "label": labels.get(key, key),
                    "folds": entry["folds"],
                    "class": cls,
                    "precision": float(values["precision"][k]),
                    "recall": float(values["recall"][k]),
                    "f1": float(values["f1"][k]),
                    "support": int(values["support"][k]),
                }
            )
    return pd.DataFrame(rows, columns=["run", "label", "folds", "class", "precision", "recall",
                                       "f1", "support"])


def write_per_class(table: pd.DataFrame, stem: str | os.PathLike) -> dict[str, Path]:
    """``stem.csv`` (numbers) and ``stem.md`` (one section per run, metrics in percent)."""
    stem = Path(stem)
    paths = {fmt: stem.with_name(f"{stem.name}.{fmt}") for fmt in ("csv", "md")}
    with atomic_write(paths["csv"], newline="") as handle:
        table.to_csv(handle, index=False)
    sections = []
    for label, rows in table.groupby("label", sort=False):
        shown = pd.DataFrame(
            {
                "Class": rows["class"],
                "Precision": [f"{100 * v:.1f}" for v in rows["precision"]],
                "Recall": [f"{100 * v:.1f}" for v in rows["recall"]],
                "F1": [f"{100 * v:.1f}" for v in rows["f1"]],
                "Support": [str(v) for v in rows["support"]],
            }
        )
        folds = int(rows["folds"].iloc[0])
        pooled = f" (confusion summed over {folds} folds)" if folds > 1 else ""
        sections.append(f"### {label}{pooled}\n\n{markdown_table(shown, _TEXT)}")
    with atomic_write(paths["md"]) as handle:
        handle.write("\n".join(sections))
    return paths

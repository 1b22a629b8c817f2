"""Paper-style result tables (CSV / Markdown / LaTeX) and figures.

Figures are drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, never
through ``pyplot``: no global figure registry, no interactive backend, nothing left open. Every
plotting function saves a 150 dpi PNG atomically and returns the (closed) figure so that callers
and tests can inspect it.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from leukotype import catalog
from leukotype.errors import LeukotypeError
from leukotype.io import atomic_path, atomic_write

DPI = 150

#: Strategy -> (technique, classifier) as in the paper's tables; also the row order.
STRATEGIES: dict[str, tuple[str, str]] = {
    "features_svm": ("Feature extraction", "SVM"),
    "finetune": ("Fine tuning", "Softmax (CNN)"),
    "finetune_svm": ("Fine tuning + SVM", "SVM"),
}

#: Backbone -> display name, from the catalogue; also the row order within a technique.
BACKBONE_NAMES: dict[str, str] = {
    name: info.display_name for name, info in catalog.named().items()
}

#: Layers always named in the model column (the paper compares AlexNet/VGG16 fc6 and fc7).
NAMED_LAYERS = ("fc6", "fc7")

#: Columns of :func:`paper_table`.
TABLE_COLUMNS = (
    "Technique",
    "Model",
    "Classifier",
    "Accuracy",
    "Precision",
    "Recall",
    "F1",
    "Balanced accuracy",
    "Kappa",
    "Accuracy 95% CI",
    "Folds",
)

#: Left-aligned (text) columns; all others are right-aligned in Markdown and LaTeX.
TEXT_COLUMNS = frozenset({"Technique", "Model", "Classifier"})

#: Table column -> (summary metric, shown as a percentage).
_TABLE_METRICS = {
    "Accuracy": ("accuracy", True),
    "Precision": ("precision_macro", True),
    "Recall": ("recall_macro", True),
    "F1": ("f1_macro", True),
    "Balanced accuracy": ("balanced_accuracy", True),
    # Kappa is a coefficient in [-1, 1], not a proportion: shown as such, with 3 decimals.
    "Kappa": ("kappa", False),
}
#: Table column -> (summary metric, shown as a percentage), for other table builders.
TABLE_METRICS = _TABLE_METRICS

_STRATEGY_COLOURS = {"features_svm": "#1f77b4", "finetune": "#ff7f0e", "finetune_svm": "#2ca02c"}


# --------------------------------------------------------------------------------------------
# names and ordering


def _normalise(name: str) -> str:
    """'Inception-V3' and 'inception_v3' look the same here."""
    return re.sub(r"[^a-z0-9+]", "", str(name).lower())


_BACKBONE_BY_KEY = {_normalise(key): key for key in BACKBONE_NAMES}


def _text(value: Any) -> str:
    """A table cell as text; missing values (None, NaN from a CSV) become ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def split_model_id(model: str, backbone: Any = "", layer: Any = "") -> tuple[str, str]:
    """(backbone, layer) of a run: the given ones, or parsed from ``backbone-layer``."""
    backbone, layer = _text(backbone), _text(layer)
    if backbone:
        return str(backbone), str(layer or "")
    head, sep, tail = str(model).rpartition("-")
    if sep and _normalise(head) in _BACKBONE_BY_KEY:
        return head, tail
    return str(model), ""


def backbone_display_name(backbone: str) -> str:
    """Display name of a backbone (the id itself if unknown)."""
    key = _BACKBONE_BY_KEY.get(_normalise(backbone))
    return BACKBONE_NAMES[key] if key else catalog.display_name(str(backbone))


def model_display_name(backbone: str, layer: str = "", show_layer: bool | None = None) -> str:
    """``VGG16 (fc6)``; the layer is shown for fc6/fc7, or when ``show_layer`` says so."""
    name = backbone_display_name(backbone)
    if show_layer is None:
        show_layer = str(layer).lower() in NAMED_LAYERS
    return f"{name} ({layer})" if show_layer and layer else name


def technique_and_classifier(strategy: str) -> tuple[str, str]:
    """Technique and classifier labels of a strategy (unknown strategies are shown as given)."""
    return STRATEGIES.get(str(strategy), (str(strategy), ""))


def _sort_key(strategy: str, backbone: str, layer: str) -> tuple[int, int, str, str]:
    strategies = list(STRATEGIES)
    backbones = [_normalise(b) for b in BACKBONE_NAMES]
    s_rank = strategies.index(strategy) if strategy in strategies else len(strategies)
    b_key = _normalise(backbone)
    b_rank = backbones.index(b_key) if b_key in backbones else len(backbones)
    return (s_rank, b_rank, str(backbone), str(layer))


def _runs_of_task(summary_df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows of ``task`` in paper order, with parsed ``_backbone``/``_layer`` and a display name."""
    if "task" not in summary_df.columns:
        raise LeukotypeError(
            "summary table lacks a 'task' column; build it with metrics.fold_summary"
        )
    rows = summary_df[summary_df["task"].astype(str) == str(task)].copy()
    if rows.empty:
        raise LeukotypeError(
            f"no results for task {task!r}; tasks present: {sorted(summary_df['task'].astype(str).unique())}"
        )
    parsed = [
        split_model_id(r["model"], r.get("backbone", ""), r.get("layer", ""))
        for _, r in rows.iterrows()
    ]
    rows["_backbone"] = [b for b, _ in parsed]
    rows["_layer"] = [lyr for _, lyr in parsed]
    # A layer other than fc6/fc7 is named only where it is needed to tell rows apart.
    layers_per = rows.groupby(["strategy", "_backbone"])["_layer"].transform("nunique")
    rows["_display"] = [
        model_display_name(b, lyr, show_layer=(lyr.lower() in NAMED_LAYERS) or n > 1)
        for b, lyr, n in zip(rows["_backbone"], rows["_layer"], layers_per)
    ]
    if "prep" in rows.columns:  # preprocessing variants side by side: "Lite0 [cropstain]"
        rows["_display"] = [
            name if str(prep) in ("", "none", "nan") else f"{name} [{prep}]"
            for name, prep in zip(rows["_display"], rows["prep"])
        ]
    if "scheme" in rows.columns:
        # The same run evaluated by hold-out and by k-fold: say which row is which.
        clash = rows.duplicated(["strategy", "_display"], keep=False)
        rows.loc[clash, "_display"] = [
            f"{name} [{'hold-out' if scheme == 'holdout' else 'k-fold'}]"
            for name, scheme in zip(rows.loc[clash, "_display"], rows.loc[clash, "scheme"])
        ]
    order = sorted(
        range(len(rows)),
        key=lambda i: (
            *_sort_key(rows["strategy"].iloc[i], rows["_backbone"].iloc[i], rows["_layer"].iloc[i]),
            str(rows["scheme"].iloc[i]) if "scheme" in rows.columns else "",
        ),
    )
    return rows.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# tables


def _format_value(value: float, percent: bool) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def format_metric(mean: float, sd: float, n_folds: int, percent: bool = True) -> str:
    """``92.1`` for one fold, ``92.1 ± 1.3`` (mean ± sd) for several."""
    text = _format_value(mean, percent)
    if n_folds > 1 and text != "n/a":
        text = f"{text} ± {_format_value(sd, percent)}"
    return text


def format_interval(low: float, high: float) -> str:
    """``[90.2, 93.9]`` in percent."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def paper_table(summary_df: pd.DataFrame, task: str, dataset: str | None = None) -> pd.DataFrame:
    """One task's results in the shape of the paper's tables (all cells are strings).

    Metrics are percentages with one decimal (kappa: a coefficient with three); k-fold rows
    show ``mean ± sd`` over folds and a t-interval, hold-out rows the point estimate and a
    bootstrap interval. ``Folds`` is ``hold-out`` or the number of folds. With ``dataset`` a
    last ``Data`` column names it, so a copied table still says what it was computed on
    (synthetic demo data, for one).
    """
    rows = _runs_of_task(summary_df, task)
    records = []
    for _, row in rows.iterrows():
        technique, classifier = technique_and_classifier(row["strategy"])
        n_folds = int(row["n_folds"])
        entry = {"Technique": technique, "Model": row["_display"], "Classifier": classifier}
        for column, (metric, percent) in _TABLE_METRICS.items():
            entry[column] = format_metric(
                row[f"{metric}_mean"], row[f"{metric}_sd"], n_folds, percent
            )
        entry["Accuracy 95% CI"] = format_interval(row["accuracy_ci_lo"], row["accuracy_ci_hi"])
        is_holdout = row.get("scheme", "") == "holdout" or (n_folds == 1 and "scheme" not in row)
        entry["Folds"] = "hold-out" if is_holdout else str(n_folds)
        records.append(entry)
    table = pd.DataFrame(records, columns=list(TABLE_COLUMNS))
    if "ece_mean" in rows and rows["ece_mean"].notna().any():
        # Calibration of the probabilities (expected calibration error, lower is better).
        table["ECE"] = [format_metric(r["ece_mean"], r["ece_sd"], int(r["n_folds"]), True) for _, r in rows.iterrows()]
    for column, metric in (("Accuracy (TTA)", "accuracy_tta"), ("Balanced accuracy (TTA)", "balanced_accuracy_tta")):
        if f"{metric}_mean" in rows and rows[f"{metric}_mean"].notna().any():
            # Test-time augmentation (evaluation.tta): the same run, scores averaged over views.
            table[column] = [format_metric(r[f"{metric}_mean"], r[f"{metric}_sd"], int(r["n_folds"]), True) for _, r in rows.iterrows()]
    table = _with_precision_column(table, rows)
    if dataset:
        table["Data"] = dataset
    return table


#: Column added by :func:`_with_precision_column` (``Precision`` is the metric).
PRECISION_COLUMN = "Compute precision"


def _with_precision_column(table: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Add the numeric precision of each run where any run is not plain fp32 (bf16, or bf16
    requested and fp32 substituted on hardware without native bf16: see leukotype.hardware)."""
    values = [str(v) for v in rows.get("precision", pd.Series([""] * len(rows)))]
    if all(v in ("", "fp32") for v in values):
        return table
    return table.assign(**{PRECISION_COLUMN: [v or "fp32" for v in values]})


def _alignments(columns: Sequence[str], text_columns: Any = TEXT_COLUMNS) -> list[str]:
    return ["l" if column in text_columns else "r" for column in columns]


def markdown_table(table: pd.DataFrame, text_columns: Any = TEXT_COLUMNS) -> str:
    """GitHub pipe table (written here: no optional ``tabulate`` dependency, stable output)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = (
        "| " + " | ".join(":---" if a == "l" else "---:" for a in _alignments(table.columns, text_columns)) + " |"
    )
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
}


def latex_escape(text: Any) -> str:
    """Escape LaTeX special characters (one pass, so replacements are never re-escaped)."""
    return "".join(_LATEX_ESCAPES.get(char, char) for char in str(text))


def latex_table(table: pd.DataFrame, text_columns: Any = TEXT_COLUMNS) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    spec = "".join(_alignments(table.columns, text_columns))
    lines = [
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(c) for c in table.columns) + r" \\",
        r"\midrule",
        *(
            " & ".join(latex_escape(v) for v in row) + r" \\"
            for row in table.itertuples(index=False)
        ),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def write_tables(table: pd.DataFrame, stem: str | os.PathLike) -> dict[str, Path]:
    """Write ``stem.csv``, ``stem.md`` and ``stem.tex``; returns the paths by format."""
    stem = Path(stem)
    paths = {fmt: stem.with_name(f"{stem.name}.{fmt}") for fmt in ("csv", "md", "tex")}
    with atomic_write(paths["csv"], newline="") as handle:
        table.to_csv(handle, index=False)
    with atomic_write(paths["md"]) as handle:
        handle.write(markdown_table(table))
    with atomic_write(paths["tex"]) as handle:
        handle.write(latex_table(table))
    return paths


# --------------------------------------------------------------------------------------------
# figures


def _new_figure(width: float, height: float, constrained: bool = True) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def wrap_title(text: str, width_inches: float, fontsize: float = 11.0) -> str:
    """Wrap a title so that it fits a figure ``width_inches`` wide at ``fontsize`` points.

    An average character is about half an em wide; a small margin keeps long dataset names
    inside the image instead of running off its right edge.
    """
    chars = max(20, int(width_inches * 72.0 / (0.55 * fontsize)) - 4)
    return "\n".join(textwrap.fill(line, chars) for line in str(text).splitlines())


def save_figure(fig: Figure, path: str | os.PathLike) -> Figure:
    """Save ``fig`` as a PNG at :data:`DPI`, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return fig


def plot_accuracy(
    summary_df: pd.DataFrame,
    task: str,
    path: str | os.PathLike,
    dataset: str | None = None,
    baselines: Sequence[Mapping[str, Any]] = (),
) -> Figure:
    """Horizontal bars of accuracy per model x strategy with 95% CI error bars and chance level.

    ``baselines`` (published results with an accuracy) follow as hatched grey bars without an
    interval, labelled ``[study, published]``: shown for orientation, not reproduced here.
    """
    rows = _runs_of_task(summary_df, task)
    labels = [
        f"{name} — {technique_and_classifier(s)[0]}"
        for name, s in zip(rows["_display"], rows["strategy"])
    ]
    mean = 100 * rows["accuracy_mean"].to_numpy(dtype=float)
    low = 100 * rows["accuracy_ci_lo"].to_numpy(dtype=float)
    high = 100 * rows["accuracy_ci_hi"].to_numpy(dtype=float)
    errors = np.nan_to_num(np.vstack([mean - low, high - mean]), nan=0.0).clip(min=0.0)
    colours = [_STRATEGY_COLOURS.get(s, "#7f7f7f") for s in rows["strategy"]]
    published = [b for b in baselines if b.get("metrics", {}).get("accuracy") is not None]

    # Long labels (published rows name their study) widen the figure instead of the bars
    # shrinking to a sliver.
    longest = max(
        [len(text) for text in labels]
        + [len(b["model"]) + len(b["study"]) + 36 for b in published]
    )
    width = 8.0 + 0.07 * max(0, longest - 50)
    fig = _new_figure(width, 1.8 + 0.42 * (len(rows) + len(published)))
    ax = fig.add_subplot()
    positions = np.arange(len(rows))
    ax.barh(
        positions,
        np.nan_to_num(mean),
        xerr=errors,
        color=colours,
        capsize=3,
        height=0.7,
        error_kw={"elinewidth": 1.0, "ecolor": "black"},
    )
    handles: list[Any] = [  # one legend entry per strategy shown
        Patch(color=_STRATEGY_COLOURS.get(s, "#7f7f7f"), label=technique_and_classifier(s)[0])
        for s in dict.fromkeys(rows["strategy"])
    ]
    if published:
        from leukotype.baselines import PUBLISHED, published_label

        extra = np.arange(len(rows), len(rows) + len(published))
        values = np.array([100 * float(b["metrics"]["accuracy"]) for b in published])
        ax.barh(extra, values, color="#d9d9d9", edgecolor="#555555", hatch="//", height=0.7)
        for y, value, baseline in zip(extra, values, published):
            approx = "~" if baseline.get("approximate") else ""
            ax.text(value + 1.0, y, f"{approx}{value:.1f}", va="center", ha="left", fontsize=8)
        labels = labels + [
            f"{published_label(b)} — {technique_and_classifier(b['strategy'])[0]}"
            for b in published
        ]
        positions = np.arange(len(labels))
        handles.append(
            Patch(facecolor="#d9d9d9", edgecolor="#555555", hatch="//", label=PUBLISHED)
        )
    for y, value, upper in zip(positions, mean, high):
        if math.isfinite(value):
            inside = value > 8.0  # room for the label inside the bar, else right of the CI
            x = 1.0 if inside else (upper if math.isfinite(upper) else value) + 1.0
            ax.text(
                x,
                y,
                f"{value:.1f}",
                va="center",
                ha="left",
                fontsize=8,
                color="white" if inside else "black",
            )
    ax.set_yticks(positions, labels, fontsize=9)
    ax.invert_yaxis()  # first table row on top
    n_classes = int(rows["n_classes"].max()) if "n_classes" in rows.columns else 0
    if n_classes > 0:
        chance = 100.0 / n_classes
        chance_line = ax.axvline(
            chance,
            color="grey",
            linestyle="--",
            linewidth=1.0,
            label=f"chance (1/{n_classes} = {chance:.1f}%)",
        )
        handles.insert(0, chance_line)
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    ax.set_xlim(0, 100)
    ax.set_xlabel("Test accuracy (%) with 95% CI")
    suffix = f" ({dataset})" if dataset else ""
    # A figure-level title wrapped to the figure's width: a long dataset name stays inside.
    fig.suptitle(wrap_title(f"{task}: accuracy per model and strategy{suffix}", width), fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def _row_normalise(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    out = np.zeros_like(counts, dtype=float)
    np.divide(counts, totals, out=out, where=totals > 0)
    return out


def _draw_confusion(ax: Any, counts: np.ndarray, classes: Sequence[str], title: str) -> Any:
    """Row-normalised matrix with counts and row percentages in the cells; returns the image."""
    k = len(classes)
    fraction = _row_normalise(counts)
    image = ax.imshow(fraction, vmin=0.0, vmax=1.0, cmap="Blues")
    font = max(5.0, 10.0 - 0.5 * k)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{int(counts[i, j])}\n{100 * fraction[i, j]:.0f}%",
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if fraction[i, j] > 0.5 else "black",
                )
    long_labels = max((len(str(c)) for c in classes), default=0) > 4
    ax.set_xticks(
        range(k),
        classes,
        fontsize=font + 1,
        rotation=45 if long_labels else 0,
        ha="right" if long_labels else "center",
    )
    ax.set_yticks(range(k), classes, fontsize=font + 1)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title, fontsize=9)
    return image


def _panel_size(n_classes: int) -> float:
    return max(3.2, 1.6 + 0.55 * n_classes)


def plot_confusion(record: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """The record's confusion matrix (row-normalised colours, counts in the cells)."""
    classes = [str(c) for c in record["classes"]]
    counts = np.asarray(record["confusion"], dtype=int)
    backbone, layer = split_model_id(
        record.get("model", ""), record.get("backbone", ""), record.get("layer", "")
    )
    title = (
        f"{record.get('task', '')}: {model_display_name(backbone, layer)} — "
        f"{technique_and_classifier(record.get('strategy', ''))[0]}\n"
        f"fold {record.get('fold', '')}, n = {int(counts.sum())}"
    )
    size = _panel_size(len(classes))
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = _draw_confusion(ax, counts, classes, title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    return save_figure(fig, path)


def _sum_confusions(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], np.ndarray]:
    classes = [str(c) for c in records[0]["classes"]]
    total = np.zeros((len(classes), len(classes)), dtype=int)
    for record in records:
        if [str(c) for c in record["classes"]] != classes:
            raise LeukotypeError(
                f"cannot sum confusion matrices with different classes: {classes} vs {record['classes']}"
            )
        total += np.asarray(record["confusion"], dtype=int)
    return classes, total


def plot_confusion_grid(
    records: Sequence[Mapping[str, Any]],
    task: str,
    path: str | os.PathLike,
    max_columns: int = 3,
    dataset: str | None = None,
) -> Figure:
    """One row-normalised confusion matrix per model x strategy (k-fold: summed over folds)."""
    mine = [r for r in records if str(r.get("task")) == str(task)]
    if not mine:
        raise LeukotypeError(
            f"no metrics records for task {task!r}; tasks present: {sorted({str(r.get('task')) for r in records})}"
        )
    panels: dict[tuple[str, str, str, bool], list[Mapping[str, Any]]] = {}
    for record in mine:
        backbone, layer = split_model_id(
            record.get("model", ""), record.get("backbone", ""), record.get("layer", "")
        )
        holdout = str(record.get("fold")) == "holdout"
        panels.setdefault((str(record["strategy"]), backbone, layer, holdout), []).append(record)
    keys = sorted(panels, key=lambda key: (*_sort_key(*key[:3]), key[3]))

    n_panels = len(keys)
    n_cols = min(max_columns, n_panels)
    n_rows = math.ceil(n_panels / n_cols)
    n_classes = len(mine[0]["classes"])
    size = _panel_size(n_classes)
    fig = _new_figure(n_cols * size + 1.0, n_rows * (size + 0.3))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    image = None
    for ax, key in zip(axes.flat, keys):
        strategy, backbone, layer, holdout = key
        classes, counts = _sum_confusions(panels[key])
        n_folds = len(panels[key])
        folds = "hold-out" if holdout else f"{n_folds} folds summed"
        title = (
            f"{model_display_name(backbone, layer)} — {technique_and_classifier(strategy)[0]}\n"
            f"{folds}, n = {int(counts.sum())}"
        )
        image = _draw_confusion(ax, counts, classes, title)
    for ax in list(axes.flat)[n_panels:]:
        fig.delaxes(ax)
    fig.colorbar(image, ax=list(axes.flat)[:n_panels], shrink=0.6, label="fraction of true class")
    suffix = f" — {dataset}" if dataset else ""
    fig.suptitle(
        wrap_title(f"{task}: confusion matrices (rows = true class){suffix}", fig.get_figwidth()),
        fontsize=11,
    )
    return save_figure(fig, path)


#: Accepted history column names (first match wins).
_HISTORY_COLUMNS = {
    "train_loss": ("train_loss", "loss"),
    "val_loss": ("val_loss", "valid_loss", "validation_loss"),
    "train_acc": ("train_acc", "train_accuracy", "acc", "accuracy"),
    "val_acc": ("val_acc", "val_accuracy", "valid_acc", "validation_accuracy"),
}


def _history_series(history_df: pd.DataFrame, role: str) -> np.ndarray | None:
    """The values of the first column present for ``role``, as floats; None if absent or empty.

    Values are coerced: a history read back from TSV holds '' where validation was skipped.
    """
    for name in _HISTORY_COLUMNS[role]:
        if name in history_df.columns:
            values = pd.to_numeric(history_df[name], errors="coerce").to_numpy(dtype=float)
            return values if np.isfinite(values).any() else None
    return None


def plot_learning_curve(
    history_df: pd.DataFrame,
    path: str | os.PathLike,
    title: str = "Fine-tuning learning curve",
) -> Figure:
    """Loss (left) and accuracy (right) per epoch, training and validation where present.

    Column names: ``epoch`` (else 1..n), ``train_loss``/``loss``, ``val_loss``,
    ``train_acc``/``train_accuracy``, ``val_acc``/``val_accuracy``. Columns that are missing or
    empty (no validation part) are left out; without accuracy only the loss panel is drawn.
    """
    if history_df.empty:
        raise LeukotypeError("training history is empty; nothing to plot")
    series = {role: _history_series(history_df, role) for role in _HISTORY_COLUMNS}
    if series["train_loss"] is None and series["val_loss"] is None:
        expected = _HISTORY_COLUMNS["train_loss"] + _HISTORY_COLUMNS["val_loss"]
        raise LeukotypeError(
            f"training history has no loss column with values (expected one of {expected}); "
            f"got {list(history_df.columns)}"
        )
    epochs = (
        pd.to_numeric(history_df["epoch"], errors="coerce").to_numpy(dtype=float)
        if "epoch" in history_df.columns
        else np.arange(1, len(history_df) + 1)
    )
    has_accuracy = series["train_acc"] is not None or series["val_acc"] is not None
    fig = _new_figure(9.0 if has_accuracy else 5.0, 3.6)
    axes = fig.subplots(1, 2 if has_accuracy else 1, squeeze=False)[0]
    panels = [(axes[0], "Loss", ("train_loss", "val_loss"))]
    if has_accuracy:
        panels.append((axes[1], "Accuracy", ("train_acc", "val_acc")))
    for ax, label, roles in panels:
        for role, style in zip(roles, ("-o", "-s")):
            if series[role] is not None:
                ax.plot(
                    epochs,
                    series[role],
                    style,
                    markersize=3,
                    label="train" if role.startswith("train") else "validation",
                )
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)

"""Published results shown alongside this workflow's runs (``evaluation.baselines``).

A baseline is a row someone else published, on their own data and split: it is shown in the
tables and the accuracy figure for orientation, always marked as published and never as a
result of this workflow. Nothing here imports pandas or matplotlib at module level, so config
validation (run by Snakemake before any job) stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

#: How a published row is marked wherever it appears.
PUBLISHED = "published, not reproduced here"


def check_baselines(cfg: Mapping[str, Any]) -> list[str]:
    """Problems with ``evaluation.baselines`` that the schema cannot see (unknown tasks).

    Metric names and value ranges are checked by the schema, which lists the valid names.
    """
    tasks = [str(task["name"]) for task in cfg.get("tasks", [])]
    problems = []
    for i, baseline in enumerate(cfg.get("evaluation", {}).get("baselines", [])):
        if str(baseline.get("task")) not in tasks:
            problems.append(
                f"evaluation.baselines[{i}].task: {baseline.get('task')!r} is not a configured "
                f"task; choose one of {tasks}"
            )
    return problems


def baselines_of_task(baselines: Sequence[Mapping[str, Any]], task: str) -> list[dict[str, Any]]:
    """The configured baselines of one task, in config order."""
    return [dict(b) for b in baselines if str(b.get("task")) == str(task)]


def published_label(baseline: Mapping[str, Any]) -> str:
    """``Inception V3 [Khan & Tehsin 2022, published]``: how a baseline is named in a figure."""
    return f"{baseline['model']} [{baseline['study']}, published]"


def format_published(value: Any, approximate: bool, percent: bool = True) -> str:
    """A published value as the tables show it: ``92.1``, ``~95.0``, or ``—`` when not given."""
    if value is None:
        return "—"
    text = f"{100 * float(value):.1f}" if percent else f"{float(value):.3f}"
    return f"~{text}" if approximate else text


def baseline_rows(baselines: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """Rows in the paper table's shape (``columns``) for published results.

    Metric cells hold the published values (``—`` where the study gives none, ``~`` where
    approximate), the CI cell stays empty (not reproduced here), ``Folds`` holds the study's
    split, and a ``Source`` column names the study and says ``published, not reproduced here``.
    """
    import pandas as pd

    from leukotype.report import TABLE_METRICS, technique_and_classifier

    rows = []
    for baseline in baselines:
        technique, classifier = technique_and_classifier(baseline["strategy"])
        approximate = bool(baseline.get("approximate", False))
        row = {column: "" for column in columns}
        row.update(
            {
                "Technique": technique,
                "Model": str(baseline["model"]),
                "Classifier": str(baseline.get("classifier") or classifier),
                "Folds": str(baseline.get("split", "")),
            }
        )
        for column, (metric, percent) in TABLE_METRICS.items():
            if column in row:
                row[column] = format_published(
                    baseline["metrics"].get(metric), approximate, percent
                )
        n_images = baseline.get("n_images")
        source = f"{baseline['study']} ({PUBLISHED}"
        source += f"; {n_images} images)" if n_images else ")"
        row["Source"] = source
        rows.append(row)
    return pd.DataFrame(rows, columns=[*columns, "Source"] if "Source" not in columns else columns)

"""External test sets: another lab's images, scored on the classes they share with a task.

An external set (``evaluation.external`` in the config) is validated like the training data
(:mod:`leukotype.validate`) but read only by the external jobs: it never enters a split, a
training job, a model selection or a calibration. Its labels are mapped onto each task's
classes (``labels: {task: {external label: task class}}``; without a mapping, labels equal to a
task class, or to a source label of a derived task, map onto it). Classes of the task that
the set has fewer than ``min_images_per_class`` images of are left out and listed with the
reason; images whose label maps to no task class are counted, not scored.

The model answers over all of its task's classes (it does not know which ones the lab has),
so a prediction of a class the set lacks counts as wrong. Balanced accuracy averages recall
over the shared classes. Internal accuracy is restricted to the same classes for the drop.

Pure Python and pandas: config checks and Snakemake's DAG building never import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leukotype.errors import LeukotypeError

if TYPE_CHECKING:
    import pandas as pd

    from leukotype.config import Task

#: How an external set is scored: ``none`` (the trained run as it is), ``bn`` (BatchNorm
#: statistics re-estimated on the unlabelled external images) and ``shots`` (few-shot: the
#: run's SVM refitted with ``train_per_class`` labelled cells per class of the set added to its
#: training part, scored on the set's other cells; SVM runs only, see :func:`draw_shots`).
ADAPTATIONS = ("none", "bn", "shots")
#: Strategies whose classifier is an SVM on features: the ones a few-shot run can refit.
SHOT_STRATEGIES = ("features_svm", "finetune_svm")
#: Backbones without BatchNorm layers: re-estimating statistics would change nothing.
NO_BATCHNORM = frozenset({"alexnet", "vgg16", "paper_cnn"})
#: Column of the external sample tables holding the task class.
LABEL = "label"
#: How a lab's labelled cells join a few-shot refit (``shot_method``; :mod:`leukotype.few_shot`):
#: added to the training rows, or feature-augmented.
SHOT_METHODS = ("pooled", "augment")
#: ``shot_weight`` value that gives the lab's labelled cells, together, the weight of the
#: run's training rows (see :meth:`ExternalSet.weight_per_shot`).
BALANCED = "balanced"


@dataclass(frozen=True)
class ExternalSet:
    """One ``evaluation.external`` entry."""

    name: str
    source: str
    labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    column: str | None = None
    tasks: tuple[str, ...] | None = None
    min_images_per_class: int = 5
    display: str = ""
    synthetic: bool = False
    train_per_class: int = 0
    shot_weight: float | str = 1.0
    shot_method: str = "pooled"

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> ExternalSet:
        return cls(
            name=str(entry["name"]),
            source=str(entry["source"]),
            labels={str(t): {str(k): str(v) for k, v in m.items()} for t, m in (entry.get("labels") or {}).items()},
            column=entry.get("column"),
            tasks=tuple(entry["tasks"]) if entry.get("tasks") else None,
            min_images_per_class=int(entry.get("min_images_per_class", 5)),
            display=str(entry.get("display") or entry["name"]),
            synthetic=bool(entry.get("synthetic", False)) or entry["source"] == "demo",
            train_per_class=int(entry.get("train_per_class") or 0),
            shot_weight=_shot_weight(entry.get("shot_weight", 1.0)),
            shot_method=_shot_method(entry.get("shot_method", "pooled")),
        )

    def weight_per_shot(self, n_training_rows: int, n_shots: int) -> float:
        """The SVM weight (a multiplier of ``C``) of each of the lab's labelled cells in a
        few-shot refit; the run's own training rows weigh 1.

        A number is used as it is. ``balanced``: ``n_training_rows / n_shots``, so the lab's
        cells weigh as much as the training part together. With 20 cells per class against
        thousands of training rows that a soft-margin SVM cannot all separate, weight 1 lets
        the training lab's look outvote the new lab's; where the refit separates every row
        (PBC -> JTSC, README), no weight changes it.
        """
        if self.shot_weight == BALANCED:
            return n_training_rows / max(n_shots, 1)
        return float(self.shot_weight)

    @property
    def label_display(self) -> str:
        return f"SYNTHETIC: {self.display}" if self.synthetic else self.display

    def evaluates(self, task_name: str) -> bool:
        return self.tasks is None or task_name in self.tasks

    def column_for(self, task: Task) -> str:
        """The external table's column holding labels for ``task`` (default: the task's own)."""
        return self.column or task.column

    def mapping(self, task: Task) -> dict[str, str]:
        """External label -> task class. Explicit mapping, else identity on the task's classes
        (and a derived task's source labels map onto their class, L1 -> ALL)."""
        if task.name in self.labels:
            return dict(self.labels[task.name])
        identity = {c: c for c in task.classes}
        if task.derive:
            identity.update({label: cls for cls, labels in task.derive.items() for label in labels})
        return identity


#: Keys of an ``evaluation.external`` entry that only the few-shot refits (and their rows'
#: records) read. The other jobs get the entry without them (:func:`zero_shot_entry`), so a
#: change of them reruns the refits, not the set's validation, extraction or zero-shot scores.
FEW_SHOT_KEYS = ("train_per_class", "shot_weight", "shot_method")


def zero_shot_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """``entry`` without :data:`FEW_SHOT_KEYS`: the params of the jobs that never refit."""
    return {key: value for key, value in entry.items() if key not in FEW_SHOT_KEYS}


def _shot_weight(value: Any) -> float | str:
    """``shot_weight`` as given: ``balanced`` or a positive number (checked here, so that a
    bad value fails at config validation, naming the choices)."""
    if value == BALANCED:
        return BALANCED
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = float("nan")
    if not weight > 0:
        raise LeukotypeError(f"shot_weight must be a positive number or {BALANCED!r}, got {value!r}")
    return weight


def _shot_method(value: Any) -> str:
    if value not in SHOT_METHODS:
        raise LeukotypeError(f"shot_method must be one of {list(SHOT_METHODS)}, got {value!r}")
    return str(value)


def external_sets(cfg: Mapping[str, Any]) -> list[ExternalSet]:
    return [ExternalSet.from_dict(e) for e in cfg.get("evaluation", {}).get("external", [])]


def check_external_config(cfg: Mapping[str, Any]) -> list[str]:
    """Problems of ``evaluation.external`` (empty when fine): unknown tasks, mapped classes
    that are not the task's (with the valid choices), duplicate names."""
    from leukotype.config import task_from_dict

    problems: list[str] = []
    tasks = {}
    for entry in cfg["tasks"]:
        try:
            tasks[entry["name"]] = task_from_dict(entry)
        except LeukotypeError:
            pass  # reported by the task checks
    entries = cfg.get("evaluation", {}).get("external", [])
    names = [e["name"] for e in entries]
    for duplicate in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"evaluation.external: name {duplicate!r} is used twice")
    for i, entry in enumerate(entries):
        try:
            ext = ExternalSet.from_dict(entry)
        except LeukotypeError as error:
            problems.append(f"evaluation.external[{i}] ({entry.get('name')}): {error}")
            continue
        where = f"evaluation.external[{i}] ({ext.name})"
        for key in ("shot_weight", "shot_method"):
            if key in entry and ext.train_per_class < 1:
                problems.append(f"{where}: {key} sets how few-shot cells are used, but train_per_class is {ext.train_per_class}; set train_per_class >= 1")
        for task_name in [*ext.labels, *(ext.tasks or ())]:
            if task_name not in tasks:
                problems.append(
                    f"{where}: unknown task {task_name!r}; configured tasks: {sorted(tasks)}"
                )
        for task_name, mapping in ext.labels.items():
            task = tasks.get(task_name)
            if task is None:
                continue
            for label, cls in mapping.items():
                if cls not in task.classes:
                    problems.append(
                        f"{where}.labels.{task_name}: {label!r} maps to unknown class {cls!r}; "
                        f"valid classes of task {task_name!r}: {list(task.classes)}"
                    )
    return problems


# --------------------------------------------------------------------------------------------
# validation and sample tables


def label_columns(validated: pd.DataFrame) -> list[str]:
    from leukotype.validate import COMPUTED_COLUMNS

    return [c for c in validated.columns if c not in (*COMPUTED_COLUMNS, "path", "abspath", "group")]


def validation_tasks(table: pd.DataFrame) -> list[Task]:
    """Pseudo-tasks accepting every label of each label column, so that validation rejects
    unreadable files and conflicting duplicates exactly as for training data, but no label
    (the mapping decides which labels are scored, per task)."""
    from leukotype.config import Task

    columns = [c for c in table.columns if c not in ("path", "abspath", "group")]
    return [
        Task(name=f"external:{column}", column=column, classes=tuple(sorted({str(v) for v in table[column].dropna() if str(v)})))
        for column in columns
    ]


def external_samples(validated: pd.DataFrame, task: Task, ext: ExternalSet) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Scored samples of ``ext`` for ``task``, and a summary of what was (not) scored.

    Samples: ``image_id, abspath, transform (identity), label (task class), group``; only
    ``ok`` images whose label maps onto a class with at least ``min_images_per_class`` images.
    Summary: ``shared_classes``, ``excluded_classes`` ({class: reason}), ``unmapped_labels``
    ({label: count}), ``n_rejected``.
    """
    import pandas as pd

    column = ext.column_for(task)
    if column not in validated.columns:
        raise LeukotypeError(
            f"external set {ext.name!r} has no label column {column!r} for task {task.name!r}; "
            f"columns: {label_columns(validated)} (set 'column' in its evaluation.external entry)"
        )
    ok = validated[validated["status"] == "ok"]
    mapping = ext.mapping(task)
    raw = ok[column].fillna("").astype(str)
    mapped = raw.map(lambda v: mapping.get(v, ""))
    unmapped = raw[(mapped == "") & (raw != "")].value_counts()
    counts = mapped[mapped != ""].value_counts()
    shared, excluded = [], {}
    for cls in task.classes:
        n = int(counts.get(cls, 0))
        if n == 0:
            continue
        if n < ext.min_images_per_class:
            excluded[cls] = f"too_few_images: {n} < min_images_per_class {ext.min_images_per_class}"
        else:
            shared.append(cls)
    keep = mapped.isin(shared)
    samples = pd.DataFrame(
        {
            "image_id": ok["image_id"][keep].to_numpy(),
            "abspath": ok["abspath"][keep].to_numpy(),
            "transform": "identity",
            LABEL: mapped[keep].to_numpy(),
            "group": ok["group"][keep].to_numpy(),
        }
    )
    summary = {
        "external": ext.name,
        "shared_classes": shared,
        "excluded_classes": excluded,
        "unmapped_labels": {str(k): int(v) for k, v in unmapped.items()},
        "n_rejected": int((validated["status"] != "ok").sum()),
        "n_scored": int(keep.sum()),
    }
    return samples.reset_index(drop=True), summary


def draw_shots(samples: pd.DataFrame, k: int, seed: int) -> pd.Series:
    """Which scored external samples a few-shot run trains on (True) instead of scoring.

    Per class, whole groups (exact duplicates stay together) are drawn in a seeded random
    order until ``k`` images are reached, but never more than half of the class's images, so
    every shared class keeps at least half of its cells to be scored on. The same ``seed``
    gives every run the same cells: the few-shot rows of a table are scored on one set.
    """
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    chosen = pd.Series(False, index=samples.index)
    for cls in sorted(samples[LABEL].astype(str).unique()):
        rows = samples[samples[LABEL].astype(str) == cls]
        limit = min(k, len(rows) // 2)
        by_group = rows.groupby(rows["group"].astype(str)).groups  # group -> its rows' index
        taken = 0
        for group in rng.permutation(sorted(by_group)):
            members = by_group[group]
            if taken + len(members) > limit:
                continue
            chosen[members] = True
            taken += len(members)
            if taken == limit:
                break
    return chosen


# --------------------------------------------------------------------------------------------
# evaluation


def restrict_to_classes(predictions: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Identity rows whose true class is one of ``classes`` (predictions stay unrestricted)."""
    rows = predictions[predictions["transform"].astype(str) == "identity"]
    return rows[rows["true"].astype(str).isin(list(classes))].reset_index(drop=True)


def evaluate_external(
    predictions: pd.DataFrame,
    internal_predictions: pd.DataFrame,
    samples: pd.DataFrame,
    internal_groups: Mapping[str, str],
    summary: Mapping[str, Any],
    classes: Sequence[str],
    meta: Mapping[str, Any],
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Metrics of one run on one external set, next to the same run's internal test metrics on
    the shared classes, and the drop (internal - external) of each metric.

    Bootstrap CIs as :func:`leukotype.metrics.evaluate_predictions` (groups resampled).
    """
    from leukotype.io import provenance
    from leukotype.metrics import evaluate_predictions

    shared = list(summary["shared_classes"])
    record: dict[str, Any] = {k: v for k, v in meta.items() if k != "config"}
    record.update({k: summary[k] for k in ("external", "shared_classes", "excluded_classes", "unmapped_labels", "n_rejected")})
    record["classes"] = list(classes)
    record["provenance"] = provenance(config=meta.get("config"), seed=seed)
    ext_rows = restrict_to_classes(predictions, shared)
    int_rows = restrict_to_classes(internal_predictions, shared)
    if ext_rows.empty or int_rows.empty:
        record.update({"n_external": int(len(ext_rows)), "n_internal": int(len(int_rows)), "external_metrics": None, "internal_metrics": None, "drop": None})
        return record
    groups = dict(zip(samples["image_id"].astype(str), samples["group"].astype(str)))
    ext = evaluate_predictions(ext_rows, list(classes), {}, n_boot=n_boot, seed=seed, groups=groups)
    internal = evaluate_predictions(int_rows, list(classes), {}, n_boot=n_boot, seed=seed, groups=dict(internal_groups))
    record.update(
        {
            "n_external": ext["n_test"],
            "n_internal": internal["n_test"],
            "external_metrics": ext["metrics"],
            "external_ci": ext["ci"],
            "external_per_class": {c: ext["per_class"][c] for c in shared},
            "external_confusion": ext["confusion"],
            "internal_metrics": internal["metrics"],
            "internal_ci": internal["ci"],
            "ci_method": ext["ci_method"],
            "drop": {
                name: (None if internal["metrics"][name] is None or ext["metrics"][name] is None else internal["metrics"][name] - ext["metrics"][name])
                for name in ext["metrics"]
            },
        }
    )
    return record

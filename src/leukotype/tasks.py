"""Classification tasks: which labels a task reads, its classes, and derived (coarser) tasks.

Its own module so that configuration (``leukotype.config``) and splitting (``leukotype.split``)
both depend on it without depending on each other. Needs no pandas to import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leukotype.errors import LeukotypeError

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Task:
    """One classification task.

    ``column`` is the manifest column holding the source labels. A derived (coarser) task maps
    source labels to its own classes, e.g. lineage ``{ALL: [L1, L2], AML: [M2, M3, M5]}``.
    An empty label means "not labelled for this task": the image is left out of that task only.
    """

    name: str
    column: str
    classes: tuple[str, ...]
    derive: Mapping[str, tuple[str, ...]] | None = field(default=None)

    @property
    def source_classes(self) -> tuple[str, ...]:
        """Labels allowed in ``column``."""
        if self.derive is None:
            return self.classes
        return tuple(label for cls in self.classes for label in self.derive[cls])

    def to_task_labels(self, source: pd.Series) -> pd.Series:
        """Map source labels to this task's classes (empty stays empty)."""
        source = source.fillna("").astype(str)
        if self.derive is None:
            return source
        lookup = {label: cls for cls, labels in self.derive.items() for label in labels}
        return source.map(lambda value: lookup.get(value, "" if value == "" else value))


def task_from_dict(entry: Mapping[str, Any]) -> Task:
    derive = entry.get("derive")
    classes = tuple(str(c) for c in entry["classes"])
    if derive is not None:
        derive = {str(k): tuple(str(v) for v in vals) for k, vals in derive.items()}
        missing = sorted(set(classes) - set(derive))
        extra = sorted(set(derive) - set(classes))
        if missing or extra:
            raise LeukotypeError(
                f"task {entry['name']!r}: 'derive' must map every class in 'classes' exactly "
                f"once; missing {missing}, unknown {extra}"
            )
    return Task(
        name=str(entry["name"]),
        column=str(entry.get("column", "label")),
        classes=classes,
        derive=derive,
    )


def tasks_from_config(cfg: Mapping[str, Any]) -> list[Task]:
    return [task_from_dict(entry) for entry in cfg["tasks"]]


def task_by_name(tasks: Sequence[Task], name: str) -> Task:
    for task in tasks:
        if task.name == name:
            return task
    raise LeukotypeError(f"unknown task {name!r}; configured tasks: {[t.name for t in tasks]}")

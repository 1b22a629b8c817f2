"""Leakage-safe, stratified splits: hold-out and repeated k-fold over groups (patients).

Every image belongs to a group (a patient, or the image itself when no patient id is known).
Groups are never divided between the parts of a split, and images with identical content
(same md5) are merged into one group first, so that a duplicate can never sit on both sides.

Algorithm (shared by hold-out and k-fold, see :func:`_assign_groups`)
-----------------------------------------------------------------------
Each part ``p`` (train/test, or the k folds) has a target share ``f_p`` of every class, i.e.
a target count ``f_p * n_c`` for class ``c``. Groups are shuffled with
``numpy.random.Generator(PCG64(seed))`` and then stably sorted by size, largest first (big
groups are the hard ones to place; small ones fill the gaps afterwards). Each group goes to
the part where adding it increases the squared deviation ``sum_c (count_pc - target_pc)^2``
least; ties go to the part that is least full relative to its total target, then to the lowest
part index. With singleton groups this is "give the image to the part that lacks its class
most", which ends with every per-class count within one image of its target (hold-out:
within half an image before the repair pass).

A repair pass then makes sure that every class is present in every part that should hold it
(a tiny class in a 10 % test part would otherwise round to zero): it moves a group of the
missing class into the part, or swaps one in and one out when a single move would empty
another class elsewhere. Hold-out raises if a class still sits on one side only (possible only
with mixed-class groups whose structure allows no valid split).

Everything is ordered by sorted names (``numpy.unique``), never by hash order, so a seed gives
the same split on any machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from leukotype.tasks import Task
from leukotype.errors import LeukotypeError

#: Defaults of the ``split`` config section.
DEFAULT_SPLIT = {"method": "holdout", "test_size": 0.25, "n_splits": 5, "n_repeats": 1, "seed": 42}
SPLIT_METHODS = ("holdout", "kfold")
SPLIT_COLUMNS = ["image_id", "group", "label", "fold", "part"]
#: Parts of a split, in the order of the part index used internally by :func:`holdout_split`.
PARTS = ("train", "test")
_TIE_TOLERANCE = 1e-9
#: Groups tried per missing (part, class) pair by the repair pass (bounds its cost).
_REPAIR_CANDIDATES = 50


# --------------------------------------------------------------------------- duplicates


def merge_duplicate_groups(groups: Sequence[str], md5s: Sequence[str]) -> np.ndarray:
    """Merge groups that share an image content hash (union-find over group names).

    Images with identical md5 end up in one group, transitively (group A shares an image with
    B, B with C -> A, B, C are one group). The merged group is named after its
    lexicographically smallest member group. Empty md5 values never merge anything.
    """
    groups = np.asarray(groups, dtype=str)
    md5s = np.asarray(md5s, dtype=str)
    if groups.shape != md5s.shape:
        raise LeukotypeError(f"groups ({groups.shape}) and md5s ({md5s.shape}) differ in length")
    names, group_index = np.unique(groups, return_inverse=True)
    parent = np.arange(len(names))

    def find(node: int) -> int:
        root = node
        while parent[root] != root:
            root = parent[root]
        while parent[node] != root:  # path compression keeps later finds short
            parent[node], node = root, parent[node]
        return root

    # only contents seen more than once can merge anything; skip the rest without a Python loop
    hashed = md5s != ""
    _, content, seen = np.unique(md5s[hashed], return_inverse=True, return_counts=True)
    repeated = seen[content] > 1
    first_group_of_content: dict[int, int] = {}
    for key, group in zip(
        content[repeated].tolist(), group_index[hashed][repeated].tolist(), strict=True
    ):
        other = first_group_of_content.setdefault(key, group)
        root_a, root_b = find(group), find(other)
        if root_a != root_b:
            # names are sorted, so the smaller index is the lexicographically smaller name
            parent[max(root_a, root_b)] = min(root_a, root_b)
    roots = np.array([find(i) for i in range(len(names))], dtype=np.int64)
    return names[roots][group_index] if len(groups) else groups.copy()


# --------------------------------------------------------------------------- core assignment


def _group_class_counts(
    labels: Sequence[str], groups: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (classes, group_names, group index per image, counts[group, class])."""
    labels = np.asarray(labels, dtype=str)
    groups = np.asarray(groups, dtype=str)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise LeukotypeError(
            f"labels ({labels.shape}) and groups ({groups.shape}) must be 1-D of equal length"
        )
    if len(labels) == 0:
        raise LeukotypeError("cannot split an empty set of images")
    classes, class_index = np.unique(labels, return_inverse=True)
    group_names, group_index = np.unique(groups, return_inverse=True)
    n_classes = len(classes)
    flat = np.bincount(
        group_index * n_classes + class_index, minlength=len(group_names) * n_classes
    )
    return classes, group_names, group_index, flat.reshape(len(group_names), n_classes)


def _require_groups_per_class(
    classes: np.ndarray, counts: np.ndarray, needed: int, purpose: str
) -> None:
    groups_per_class = (counts > 0).sum(axis=0)
    short = [
        f"{cls!r} ({n_groups} group(s), {n_images} image(s))"
        for cls, n_groups, n_images in zip(
            classes.tolist(), groups_per_class.tolist(), counts.sum(axis=0).tolist(), strict=True
        )
        if n_groups < needed
    ]
    if short:
        raise LeukotypeError(
            f"{purpose} needs at least {needed} groups (patients/images) per class, but class "
            f"{', '.join(short)} has fewer; add images of that class, drop it from the task, or "
            "choose fewer folds / a hold-out split"
        )


def _choose_part(cost: np.ndarray, fullness: np.ndarray) -> int:
    """Cheapest part; ties -> least full relative to its target, then lowest index."""
    best = int(np.argmin(cost))
    tied = cost <= cost[best] + _TIE_TOLERANCE
    if np.count_nonzero(tied) == 1:
        return best
    return int(np.argmin(np.where(tied, fullness, np.inf)))


def _assign_groups(
    counts: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Assign each group (row of ``counts``) to a part; returns the part index per group."""
    n_groups, _ = counts.shape
    fractions = np.asarray(fractions, dtype=np.float64)
    targets = np.outer(fractions, counts.sum(axis=0).astype(np.float64))
    deviation = -targets  # filled - target, per part and class
    filled_total = np.zeros(len(fractions))
    target_total = np.maximum(targets.sum(axis=1), _TIE_TOLERANCE)
    sizes = counts.sum(axis=1)
    # sparse rows: the classes present in each group (usually one)
    group_of_entry, class_of_entry = np.nonzero(counts)
    entry_start = np.searchsorted(group_of_entry, np.arange(n_groups + 1)).tolist()
    order = rng.permutation(n_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]
    assignment = np.empty(n_groups, dtype=np.int64)
    for group in order.tolist():
        present = class_of_entry[entry_start[group] : entry_start[group + 1]]
        if len(present) == 1:  # fast path for single-class groups
            cls = int(present[0])
            added = counts[group, cls]
            cost = added * (2.0 * deviation[:, cls] + added)
        else:
            added = counts[group, present]
            cost = (added * (2.0 * deviation[:, present] + added)).sum(axis=1)
        # cost = increase of sum_c (filled - target)^2 if the group joins each part
        part = _choose_part(cost, filled_total / target_total)
        assignment[group] = part
        deviation[part, present] += added
        filled_total[part] += sizes[group]
    _ensure_every_class_in_every_part(counts, assignment, targets, order)
    return assignment


def _missing_pairs(has_class: np.ndarray, assignment: np.ndarray, needed: np.ndarray) -> int:
    """Number of (part, class) pairs that should hold the class but have no group of it."""
    present = np.stack([has_class[assignment == p].any(axis=0) for p in range(len(needed))])
    return int((needed & ~present).sum())


def _ensure_every_class_in_every_part(
    counts: np.ndarray, assignment: np.ndarray, targets: np.ndarray, order: np.ndarray
) -> None:
    """Repair pass: a part that should hold a class but got none takes a group of it.

    Tries single moves of a group holding the class into the part first and, only if none
    helps, swaps (that group in, one group of the part out). A change is accepted only if it
    lowers the number of missing (part, class) pairs, so the pass ends; among those the one
    with the smallest total squared deviation from the targets wins, then the earliest group
    in the shuffled order. Modifies ``assignment`` in place.
    """
    n_parts = targets.shape[0]
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    has_class = counts > 0
    needed = targets > 0
    missing = _missing_pairs(has_class, assignment, needed)
    while missing:
        present = np.stack([has_class[assignment == p].any(axis=0) for p in range(n_parts)])
        best: tuple[int, float, int, int] | None = None
        best_assignment = assignment
        for swaps in (False, True):
            for part, cls in np.argwhere(needed & ~present).tolist():
                movers = np.flatnonzero(has_class[:, cls] & (assignment != part))
                for group in movers[np.argsort(rank[movers])][:_REPAIR_CANDIDATES].tolist():
                    trial = assignment.copy()
                    trial[group] = part
                    trials = [(trial, rank[group])]
                    if swaps:
                        back = np.flatnonzero(assignment == part)
                        for other in back[np.argsort(rank[back])][:_REPAIR_CANDIDATES].tolist():
                            swapped = trial.copy()
                            swapped[other] = assignment[group]
                            trials.append((swapped, rank[group] * len(rank) + rank[other]))
                    for candidate, tie in trials:
                        left = _missing_pairs(has_class, candidate, needed)
                        if left >= missing:
                            continue
                        filled = np.stack(
                            [counts[candidate == p].sum(axis=0) for p in range(n_parts)]
                        )
                        score = (left, float(((filled - targets) ** 2).sum()), int(tie))
                        if best is None or score < best[:3]:
                            best, best_assignment = (*score, 0), candidate
            if best is not None:
                break
        if best is None:
            return  # nothing helps: the caller reports the class that is left one-sided
        assignment[:] = best_assignment
        missing = best[0]


def _check_fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise LeukotypeError(f"{name} must be strictly between 0 and 1, got {value}")
    return value


# --------------------------------------------------------------------------- public splits


def holdout_split(
    labels: Sequence[str], groups: Sequence[str], test_size: float = 0.25, seed: int = 0
) -> np.ndarray:
    """Stratified, group-aware hold-out split; returns a boolean mask (True = test).

    No group is in both parts. With singleton groups each class's test count is within one
    image of ``test_size * n_class`` (within half an image unless the class is so small that
    rounding would leave a part without it); with larger groups it is as close as the greedy
    assignment gets (see the module docstring). Every class has at least one group in each
    part. Raises LeukotypeError naming any class with fewer than two groups, or (with
    mixed-class groups) any class that could not be placed in both parts.
    """
    test_size = _check_fraction(test_size, "test_size")
    classes, _, group_index, counts = _group_class_counts(labels, groups)
    _require_groups_per_class(classes, counts, 2, "a hold-out split")
    rng = np.random.Generator(np.random.PCG64(seed))
    assignment = _assign_groups(counts, [1.0 - test_size, test_size], rng)
    is_test_group = assignment == PARTS.index("test")
    in_test, in_train = counts[is_test_group].sum(axis=0), counts[~is_test_group].sum(axis=0)
    one_sided = [str(cls) for cls, a, b in zip(classes, in_test, in_train) if a == 0 or b == 0]
    if one_sided:  # the repair pass failed: mixed-class groups make it impossible
        raise LeukotypeError(
            f"a hold-out split cannot put class(es) {one_sided} in both parts without "
            "splitting a group: their groups also hold other classes (e.g. three patients "
            "sharing three classes pairwise); check the group ids or merge those classes"
        )
    return is_test_group[group_index]


def kfold_split(
    labels: Sequence[str],
    groups: Sequence[str],
    n_splits: int = 5,
    n_repeats: int = 1,
    seed: int = 0,
) -> list[np.ndarray]:
    """Stratified, group-aware (repeated) k-fold; returns one fold-index array per repeat.

    Within a repeat every image is in the test part of exactly one fold, no group spans two
    folds, and with singleton groups each fold holds ``n_class / n_splits`` images of every
    class up to one image. Repeats draw successive shuffles from one seeded generator, so
    repeat 0 does not depend on ``n_repeats``. Raises LeukotypeError naming any class with
    fewer than ``n_splits`` groups.
    """
    n_splits, n_repeats = int(n_splits), int(n_repeats)
    if n_splits < 2:
        raise LeukotypeError(f"n_splits must be at least 2, got {n_splits}")
    if n_repeats < 1:
        raise LeukotypeError(f"n_repeats must be at least 1, got {n_repeats}")
    classes, _, group_index, counts = _group_class_counts(labels, groups)
    _require_groups_per_class(classes, counts, n_splits, f"{n_splits}-fold cross-validation")
    rng = np.random.Generator(np.random.PCG64(seed))
    fractions = [1.0 / n_splits] * n_splits
    return [_assign_groups(counts, fractions, rng)[group_index] for _ in range(n_repeats)]


def split_settings(split_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``split`` config section with defaults filled in and values checked."""
    settings = {**DEFAULT_SPLIT, **dict(split_cfg or {})}
    if settings["method"] not in SPLIT_METHODS:
        raise LeukotypeError(
            f"split.method {settings['method']!r} is not supported; choose one of {SPLIT_METHODS}"
        )
    return settings


def fold_ids(split_cfg: Mapping[str, Any] | None) -> list[str]:
    """Fold identifiers: ``["holdout"]`` or ``r{R}f{K}`` for every repeat and fold."""
    settings = split_settings(split_cfg)
    if settings["method"] == "holdout":
        return ["holdout"]
    return [
        f"r{repeat}f{fold}"
        for repeat in range(int(settings["n_repeats"]))
        for fold in range(int(settings["n_splits"]))
    ]


def _task_rows(validated: pd.DataFrame, task: Task) -> pd.DataFrame:
    """Usable rows of the validation table for a task: image_id, group (merged), label."""
    required = {"image_id", "group", "md5", "status", task.column}
    missing = sorted(required - set(validated.columns))
    if missing:
        raise LeukotypeError(
            f"validation table lacks column(s) {missing} needed to split task {task.name!r}"
        )
    ok = validated[validated["status"].astype(str) == "ok"]
    image_ids = ok["image_id"].astype(str).to_numpy()
    groups = ok["group"].fillna("").astype(str).to_numpy()
    # no group id -> the image is its own group
    groups = np.where(groups == "", image_ids, groups)
    # merge over all ok rows (not only this task's), so a chain of duplicates is never missed
    merged = merge_duplicate_groups(groups, ok["md5"].fillna("").astype(str).to_numpy())
    labels = task.to_task_labels(ok[task.column]).to_numpy(dtype=str)
    rows = pd.DataFrame({"image_id": image_ids, "group": merged, "label": labels})
    rows = rows[rows["label"] != ""].reset_index(drop=True)
    unknown = sorted(set(rows["label"].unique().tolist()) - set(task.classes))
    if unknown:
        raise LeukotypeError(
            f"task {task.name!r}: labels {unknown} in column {task.column!r} are not among its "
            f"classes {list(task.classes)}; fix the labels or the task definition"
        )
    present = set(rows["label"].unique().tolist())
    absent = [cls for cls in task.classes if cls not in present]
    if absent:
        raise LeukotypeError(
            f"task {task.name!r}: class(es) {absent} have no usable (status ok) images"
        )
    return rows


def make_split_table(
    validated: pd.DataFrame, task: Task, split_cfg: Mapping[str, Any] | None
) -> pd.DataFrame:
    """Long split table ``image_id, group, label, fold, part``: one row per image per fold.

    Uses the ok rows with a non-empty task label; ``group`` is the md5-merged group.
    """
    settings = split_settings(split_cfg)
    rows = _task_rows(validated, task)
    labels, groups = rows["label"].to_numpy(), rows["group"].to_numpy()
    seed = int(settings["seed"])
    parts: list[pd.DataFrame] = []
    try:
        if settings["method"] == "holdout":
            is_test = holdout_split(labels, groups, settings["test_size"], seed)
            parts.append(rows.assign(fold="holdout", part=np.where(is_test, "test", "train")))
        else:
            n_splits = int(settings["n_splits"])
            repeats = kfold_split(labels, groups, n_splits, int(settings["n_repeats"]), seed)
            for repeat, fold_of_image in enumerate(repeats):
                for fold in range(n_splits):
                    part = np.where(fold_of_image == fold, "test", "train")
                    parts.append(rows.assign(fold=f"r{repeat}f{fold}", part=part))
    except LeukotypeError as error:
        raise LeukotypeError(f"task {task.name!r}: {error}") from error
    table = pd.concat(parts, ignore_index=True)[SPLIT_COLUMNS]
    check_no_leakage(table)
    return table


def carve_validation(train_rows: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Group-aware stratified validation part inside a training part (True = validation).

    ``train_rows`` needs columns ``label`` and ``group`` (rows of a split table).
    """
    try:
        return holdout_split(train_rows["label"], train_rows["group"], fraction, seed)
    except LeukotypeError as error:
        raise LeukotypeError(f"validation part inside the training part: {error}") from error


def check_no_leakage(split_table: pd.DataFrame) -> None:
    """Raise LeukotypeError if a group (or image) is in train and test of the same fold."""
    problems: list[str] = []
    duplicated = split_table[split_table.duplicated(["fold", "image_id"])]
    for fold, rows in duplicated.groupby("fold", sort=True):
        problems.append(
            f"fold {fold}: image(s) listed twice {rows['image_id'].unique()[:5].tolist()}"
        )
    parts_per_group = split_table.groupby(["fold", "group"], sort=True)["part"].nunique()
    leaked = parts_per_group[parts_per_group > 1].reset_index()
    for fold, rows in leaked.groupby("fold", sort=True):
        shared = rows["group"].tolist()
        problems.append(
            f"fold {fold}: {len(shared)} group(s) in both train and test, e.g. {shared[:5]}"
        )
    if problems:
        raise LeukotypeError("data leakage in split table: " + "; ".join(problems))

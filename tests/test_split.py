"""Leakage-safe splits: stratification, group integrity, duplicates, determinism, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from leukotype.config import Task
from leukotype.errors import LeukotypeError
from leukotype.io import read_tsv, write_tsv
from leukotype.split import (
    carve_validation,
    check_no_leakage,
    fold_ids,
    holdout_split,
    kfold_split,
    make_split_table,
    merge_duplicate_groups,
)

SEEDS = range(8)

# A small fixed problem whose split is hard-coded below: a change of algorithm must be noticed
# (it changes every published number), so it has to be a deliberate edit of these lists.
FIXED_LABELS = ["a"] * 5 + ["b"] * 4 + ["c"] * 3
FIXED_GROUPS = ["g0", "g0", "g1", "g2", "g3", "g4", "g4", "g5", "g6", "g7", "g8", "g9"]


def random_problem(seed: int, singleton: bool) -> tuple[np.ndarray, np.ndarray]:
    """Random labels for 3-5 classes of 30-120 images; singleton or 1-6-image groups."""
    rng = np.random.default_rng(1000 + seed)
    n_classes = int(rng.integers(3, 6))
    sizes = rng.integers(30, 121, size=n_classes)
    labels = np.repeat([f"class{c}" for c in range(n_classes)], sizes)
    if singleton:
        return labels, np.array([f"img{i}" for i in range(len(labels))])
    groups = []
    for cls in np.unique(labels):
        remaining, index = int((labels == cls).sum()), 0
        while remaining:
            size = min(remaining, int(rng.integers(1, 7)))
            groups += [f"{cls}-p{index}"] * size
            remaining, index = remaining - size, index + 1
    # a few mixed-class groups (a patient with cells of two classes)
    groups = np.array(groups)
    groups[rng.choice(len(groups), size=5, replace=False)] = "mixed-patient"
    return labels, groups


def assert_groups_whole(assignment: np.ndarray, groups: np.ndarray) -> None:
    for group in np.unique(groups):
        values = np.unique(assignment[groups == group])
        assert len(values) == 1, f"group {group} split over {values}"


# --------------------------------------------------------------------------- duplicates


def test_merge_duplicate_groups_is_transitive_and_named_after_smallest_group():
    groups = ["p3", "p1", "p2", "p4", "p5", "p6"]
    md5s = ["x", "y", "x", "y", "", ""]  # p3~p2 via x, p1~p4 via y; empty md5 never merges
    merged = merge_duplicate_groups(groups, md5s)
    assert merged.tolist() == ["p2", "p1", "p2", "p1", "p5", "p6"]
    chain = merge_duplicate_groups(["c", "b", "b", "a"], ["m1", "m1", "m2", "m2"])
    assert chain.tolist() == ["a", "a", "a", "a"]


def test_merge_duplicate_groups_rejects_length_mismatch():
    with pytest.raises(LeukotypeError, match="differ in length"):
        merge_duplicate_groups(["a", "b"], ["x"])


# --------------------------------------------------------------------------- hold-out


@pytest.mark.parametrize("test_size", [0.2, 0.25, 1 / 3])
def test_holdout_singleton_groups_hit_class_targets(test_size):
    for seed in SEEDS:
        labels, groups = random_problem(seed, singleton=True)
        is_test = holdout_split(labels, groups, test_size, seed)
        for cls in np.unique(labels):
            in_class = labels == cls
            target = test_size * in_class.sum()
            assert abs(is_test[in_class].sum() - target) <= 0.5 + 1e-9, (seed, cls)


def test_holdout_multi_image_groups_are_never_split_and_close_to_target():
    for seed in SEEDS:
        labels, groups = random_problem(seed, singleton=False)
        is_test = holdout_split(labels, groups, 0.25, seed)
        assert_groups_whole(is_test, groups)
        assert not set(groups[is_test]) & set(groups[~is_test])
        for cls in np.unique(labels):
            in_class = labels == cls
            # groups hold at most 6 images of a class (5 for the mixed patient)
            assert abs(is_test[in_class].sum() - 0.25 * in_class.sum()) <= 6, (seed, cls)
            assert 0 < is_test[in_class].sum() < in_class.sum()
        assert abs(is_test.mean() - 0.25) < 0.05


def test_holdout_small_class_is_present_in_both_parts():
    labels = ["big"] * 40 + ["tiny"] * 3
    groups = [f"i{i}" for i in range(43)]
    for seed in SEEDS:
        is_test = holdout_split(labels, groups, 0.1, seed)
        tiny = np.array(labels) == "tiny"
        # 0.1 * 3 would round to 0 test images; the repair pass puts one there
        assert is_test[tiny].sum() == 1
        assert is_test[~tiny].sum() == 4


def test_holdout_mixed_class_groups_every_class_on_both_sides_or_clear_error():
    # needs a swap: moving either group that holds class "0" alone would empty another class
    labels = ["1", "1", "0", "0", "2", "2"]
    groups = ["g2", "g1", "g2", "g3", "g3", "g0"]
    for seed in SEEDS:
        is_test = holdout_split(labels, groups, 0.25, seed)
        assert_groups_whole(is_test, np.array(groups))
        for cls in "012":
            in_class = np.array(labels) == cls
            assert 0 < is_test[in_class].sum() < in_class.sum(), (seed, cls)
    # three patients sharing three classes pairwise: no two-part split keeps every class on
    # both sides, although each class has two groups
    triangle_labels = ["a", "b", "b", "c", "c", "a"]
    triangle_groups = ["p1", "p1", "p2", "p2", "p3", "p3"]
    with pytest.raises(LeukotypeError, match=r"cannot put class\(es\) \['[abc]'\] in both parts"):
        holdout_split(triangle_labels, triangle_groups, 0.25, 0)


def test_holdout_fixed_expected_result():
    is_test = holdout_split(FIXED_LABELS, FIXED_GROUPS, 0.25, seed=7)
    assert is_test.astype(int).tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1]


def test_holdout_same_seed_same_split_other_seed_other_split():
    labels, groups = random_problem(0, singleton=False)
    first = holdout_split(labels, groups, 0.25, seed=3)
    np.testing.assert_array_equal(first, holdout_split(labels, groups, 0.25, seed=3))
    assert not np.array_equal(first, holdout_split(labels, groups, 0.25, seed=4))


def test_holdout_does_not_depend_on_input_order_of_group_names():
    labels, groups = random_problem(1, singleton=False)
    renamed = np.array([f"zz-{g}" for g in groups])  # same sort order, different names
    np.testing.assert_array_equal(
        holdout_split(labels, groups, 0.25, 5), holdout_split(labels, renamed, 0.25, 5)
    )


def test_holdout_rejects_class_with_one_group_naming_it():
    labels = ["a"] * 6 + ["rare"] * 3
    groups = [f"a{i}" for i in range(6)] + ["patient-x"] * 3
    with pytest.raises(LeukotypeError, match=r"'rare' \(1 group\(s\), 3 image\(s\)\)"):
        holdout_split(labels, groups, 0.25, 0)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_holdout_rejects_bad_test_size(bad):
    with pytest.raises(LeukotypeError, match="test_size"):
        holdout_split(["a", "a", "b", "b"], ["1", "2", "3", "4"], bad, 0)


# --------------------------------------------------------------------------- k-fold


@pytest.mark.parametrize("n_splits", [3, 5])
def test_kfold_singleton_groups_balance_every_class(n_splits):
    for seed in SEEDS:
        labels, groups = random_problem(seed, singleton=True)
        (folds,) = kfold_split(labels, groups, n_splits, 1, seed)
        assert sorted(np.unique(folds)) == list(range(n_splits))
        for cls in np.unique(labels):
            in_class = labels == cls
            per_fold = np.bincount(folds[in_class], minlength=n_splits)
            assert np.all(np.abs(per_fold - in_class.sum() / n_splits) < 1), (seed, cls, per_fold)


def test_kfold_multi_image_groups_stay_in_one_fold():
    for seed in SEEDS:
        labels, groups = random_problem(seed, singleton=False)
        repeats = kfold_split(labels, groups, 5, 2, seed)
        assert len(repeats) == 2
        for folds in repeats:
            assert folds.shape == labels.shape
            assert_groups_whole(folds, groups)
            for cls in np.unique(labels):
                in_class = labels == cls
                per_fold = np.bincount(folds[in_class], minlength=5)
                assert np.all(np.abs(per_fold - in_class.sum() / 5) <= 6), (seed, cls, per_fold)
        assert not np.array_equal(repeats[0], repeats[1])


def test_kfold_fixed_expected_result():
    repeats = kfold_split(FIXED_LABELS, FIXED_GROUPS, n_splits=3, n_repeats=2, seed=7)
    assert [folds.tolist() for folds in repeats] == [
        [0, 0, 2, 1, 1, 1, 1, 0, 2, 0, 2, 1],
        [1, 1, 2, 2, 0, 0, 0, 1, 2, 0, 2, 1],
    ]


def test_kfold_first_repeat_does_not_depend_on_number_of_repeats():
    labels, groups = random_problem(2, singleton=False)
    (single,) = kfold_split(labels, groups, 5, 1, seed=11)
    np.testing.assert_array_equal(single, kfold_split(labels, groups, 5, 3, seed=11)[0])
    assert not np.array_equal(single, kfold_split(labels, groups, 5, 1, seed=12)[0])


def test_kfold_rejects_class_in_fewer_groups_than_folds_naming_it():
    labels = ["a"] * 10 + ["Pro"] * 8
    groups = [f"a{i}" for i in range(10)] + ["p1"] * 4 + ["p2"] * 2 + ["p3"] * 2
    with pytest.raises(LeukotypeError, match=r"at least 5 groups.*'Pro' \(3 group\(s\), 8 image"):
        kfold_split(labels, groups, 5, 1, 0)
    with pytest.raises(LeukotypeError, match="n_splits must be at least 2"):
        kfold_split(labels, groups, 1, 1, 0)


# --------------------------------------------------------------------------- split tables


def validated_table() -> pd.DataFrame:
    """A validation table: 3 subtypes x 10 images, one rejected, one unlabelled, duplicates."""
    rows = []
    for cls_index, cls in enumerate(["L1", "L2", "M3"]):
        for i in range(10):
            image = len(rows)
            rows.append(
                {
                    "image_id": f"img{image:06d}",
                    "path": f"{cls}/{i}.png",
                    "abspath": f"/data/{cls}/{i}.png",
                    "subtype": cls,
                    "group": f"{cls}-patient{i // 2}",  # two cells per patient
                    "md5": f"md5-{image}",
                    "status": "ok",
                    "reason": "",
                }
            )
    frame = pd.DataFrame(rows)
    # an exact duplicate across two patients: identical md5 must merge the patients
    frame.loc[3, "md5"] = frame.loc[12, "md5"] = "same-bytes"
    frame.loc[12, "subtype"] = "L1"  # a copy filed under another patient of the same class
    frame.loc[25, "status"] = "rejected"
    frame.loc[26, "subtype"] = ""  # not labelled for this task
    return frame


SUBTYPE_TASK = Task(name="subtype", column="subtype", classes=("L1", "L2", "M3"))


def test_make_split_table_holdout_uses_ok_labelled_rows_and_merged_groups(tmp_path):
    validated = validated_table()
    table = make_split_table(validated, SUBTYPE_TASK, {"method": "holdout", "seed": 1})
    assert list(table.columns) == ["image_id", "group", "label", "fold", "part"]
    assert len(table) == 28  # 30 - rejected - unlabelled
    assert {"img000025", "img000026"}.isdisjoint(table["image_id"])
    assert set(table["fold"]) == {"holdout"}
    dup = table.set_index("image_id").loc[["img000003", "img000012"]]
    assert dup["group"].nunique() == 1  # merged ...
    assert dup["group"].iloc[0] == "L1-patient1"  # ... under the smaller group name
    assert dup["part"].nunique() == 1
    check_no_leakage(table)
    write_tsv(table, tmp_path / "split.tsv")
    pd.testing.assert_frame_equal(read_tsv(tmp_path / "split.tsv"), table)


def test_make_split_table_kfold_long_format_and_duplicates_together():
    validated = validated_table()
    cfg = {"method": "kfold", "n_splits": 3, "n_repeats": 2, "seed": 5}
    table = make_split_table(validated, SUBTYPE_TASK, cfg)
    assert table["fold"].unique().tolist() == fold_ids(cfg)
    assert len(table) == 28 * 6
    check_no_leakage(table)
    for repeat in range(2):
        folds = table[table["fold"].str.startswith(f"r{repeat}f")]
        tested = folds.loc[folds["part"] == "test", "image_id"]
        assert tested.is_unique and len(tested) == 28  # every image tested exactly once
    duplicates = table[table["image_id"].isin(["img000003", "img000012"])]
    assert duplicates.groupby("fold")["part"].nunique().eq(1).all()
    assert table.equals(make_split_table(validated, SUBTYPE_TASK, cfg))


def test_make_split_table_derived_task_and_unknown_labels():
    validated = validated_table()
    lineage = Task(
        name="lineage",
        column="subtype",
        classes=("ALL", "AML"),
        derive={"ALL": ("L1", "L2"), "AML": ("M3",)},
    )
    table = make_split_table(validated, lineage, {"method": "holdout", "seed": 0})
    assert table["label"].value_counts().to_dict() == {"ALL": 20, "AML": 8}
    only_two = Task(name="two", column="subtype", classes=("L1", "L2"))
    with pytest.raises(LeukotypeError, match=r"task 'two'.*\['M3'\].*not among its classes"):
        make_split_table(validated, only_two, {"method": "holdout"})


def test_make_split_table_names_class_with_too_few_groups():
    validated = validated_table()
    cfg = {"method": "kfold", "n_splits": 5, "seed": 0}
    make_split_table(validated, SUBTYPE_TASK, cfg)  # 5 patients per class: just enough
    validated.loc[[26, 27], "status"] = "rejected"  # M3-patient3 gone: 4 patients, 7 images
    with pytest.raises(LeukotypeError, match=r"task 'subtype'.*'M3' \(4 group\(s\), 7 image"):
        make_split_table(validated, SUBTYPE_TASK, cfg)
    missing_class = Task(name="t", column="subtype", classes=("L1", "L2", "M3", "M5"))
    with pytest.raises(LeukotypeError, match=r"\['M5'\] have no usable"):
        make_split_table(validated, missing_class, {"method": "holdout"})


def test_split_config_errors_and_fold_ids():
    assert fold_ids({"method": "holdout"}) == ["holdout"]
    assert fold_ids({"method": "kfold", "n_splits": 2, "n_repeats": 2}) == [
        "r0f0",
        "r0f1",
        "r1f0",
        "r1f1",
    ]
    with pytest.raises(LeukotypeError, match=r"'loo'.*holdout.*kfold"):
        fold_ids({"method": "loo"})
    with pytest.raises(LeukotypeError, match=r"lacks column\(s\) \['md5'\]"):
        make_split_table(validated_table().drop(columns="md5"), SUBTYPE_TASK, {})


def test_check_no_leakage_detects_group_in_both_parts():
    table = make_split_table(validated_table(), SUBTYPE_TASK, {"method": "holdout", "seed": 2})
    leaky = table.copy()
    test_row = leaky.index[leaky["part"] == "test"][0]
    train_row = leaky.index[leaky["part"] == "train"][0]
    leaky.loc[test_row, "group"] = leaky.loc[train_row, "group"]
    with pytest.raises(LeukotypeError, match="fold holdout: 1 group"):
        check_no_leakage(leaky)
    doubled = pd.concat([table, table.iloc[[0]]], ignore_index=True)
    with pytest.raises(LeukotypeError, match="listed twice"):
        check_no_leakage(doubled)


def test_carve_validation_is_group_aware_and_stratified():
    for seed in SEEDS:
        labels, groups = random_problem(seed, singleton=False)
        train = pd.DataFrame({"label": labels, "group": groups})
        is_val = carve_validation(train, 0.2, seed)
        assert_groups_whole(is_val, groups)
        for cls in np.unique(labels):
            in_class = labels == cls
            assert abs(is_val[in_class].sum() - 0.2 * in_class.sum()) <= 6
    tiny = pd.DataFrame({"label": ["a", "a", "b"], "group": ["1", "2", "3"]})
    with pytest.raises(LeukotypeError, match=r"validation part.*'b'"):
        carve_validation(tiny, 0.2, 0)


@pytest.mark.shared_data
def test_kfold_on_real_pbc_manifest_gives_exact_class_counts(shared_data):
    manifest = pd.read_csv(shared_data / "pbc" / "manifest.csv", keep_default_na=False)
    validated = manifest.assign(
        image_id=[f"img{i:06d}" for i in range(len(manifest))],
        group=manifest["path"],  # no patient ids: every image is its own group
        status="ok",
    )
    task = Task(name="pbc", column="label", classes=tuple(sorted(manifest["label"].unique())))
    table = make_split_table(validated, task, {"method": "kfold", "n_splits": 5, "seed": 42})
    tested = table[table["part"] == "test"]
    counts = tested.groupby(["fold", "label"]).size()
    assert len(counts) == 5 * 8 and counts.eq(20).all()  # 100 per class / 5 folds

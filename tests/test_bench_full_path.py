"""bench/derived_images.py and bench/full_path.py: the derived data set keeps every source image
on one side of the workflow's split, and the timing run reads its numbers from the right files.

Tiny synthetic source images (no shared data, a few seconds); the full Snakemake run itself is
a benchmark, not a test.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import derived_images  # noqa: E402
import full_path  # noqa: E402

from leukotype.config import validate_config  # noqa: E402
from leukotype.dataset import read_dataset  # noqa: E402
from leukotype.split import check_no_leakage, holdout_split, kfold_split  # noqa: E402

CLASSES = ["basophil", "eosinophil", "lymphocyte", "platelet"]
SIZES = {"basophil": (60, 63), "eosinophil": (66, 69), "lymphocyte": (60, 63), "platelet": (66, 69)}


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """4 classes x 4 noise JPEGs (two image sizes, as PBC's) with a manifest."""
    root = tmp_path / "real"
    rng = np.random.default_rng(0)
    rows = []
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for k in range(4):
            width, height = SIZES[label]
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            path = f"{label}/{label[:2].upper()}_{k}.jpg"
            Image.fromarray(pixels).save(root / path, quality=75)
            rows.append({"path": path, "label": label})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def test_derived_images_are_distinct_same_sized_and_grouped_by_source(
    sources: Path, tmp_path: Path
) -> None:
    manifest = derived_images.write_derived(sources, 48, tmp_path / "derived", workers=1)
    table = read_dataset(manifest)  # what the workflow's validation reads
    assert len(table) == 48
    assert table["label"].value_counts().to_dict() == {c: 12 for c in CLASSES}
    # every source image is the group of exactly 3 derived images of its own class
    assert table.groupby("group").size().to_dict() == {
        f"{c}/{c[:2].upper()}_{k}.jpg": 3 for c in CLASSES for k in range(4)}
    assert (table["group"].str.split("/").str[0] == table["label"]).all()
    digests = {hashlib.md5(Path(p).read_bytes()).hexdigest() for p in table["abspath"]}
    originals = {hashlib.md5(p.read_bytes()).hexdigest() for p in sources.rglob("*.jpg")}
    assert len(digests) == 48 and not digests & originals
    for row in table.itertuples():
        with Image.open(row.abspath) as derived, Image.open(sources / row.group) as source:
            assert derived.size == source.size
            assert derived.format == "JPEG"
            # derived, not copied: the pixels differ from the source's
            assert np.abs(np.asarray(derived, float) - np.asarray(source, float)).mean() > 1


def test_derived_groups_keep_each_source_image_on_one_side_of_the_split(
    sources: Path, tmp_path: Path
) -> None:
    manifest = derived_images.write_derived(sources, 48, tmp_path / "derived", workers=1)
    table = read_dataset(manifest)
    labels, groups = table["label"].to_numpy(), table["group"].to_numpy()
    is_test = holdout_split(labels, groups, test_size=0.25, seed=42)
    sides = pd.Series(is_test).groupby(groups).nunique()
    assert (sides == 1).all()  # no source image on both sides
    assert 0 < is_test.sum() < len(table)
    folds = kfold_split(labels, groups, n_splits=2, seed=0)[0]
    assert (pd.Series(folds).groupby(groups).nunique() == 1).all()
    split = pd.DataFrame({"image_id": table["path"], "group": groups, "label": labels,
                          "fold": "holdout", "part": np.where(is_test, "test", "train")})
    check_no_leakage(split)


def test_derived_images_are_reproducible_and_reused(sources: Path, tmp_path: Path) -> None:
    a = derived_images.write_derived(sources, 20, tmp_path / "a", workers=1)
    b = derived_images.write_derived(sources, 20, tmp_path / "b", workers=1)
    assert pd.read_csv(a)["md5"].tolist() == pd.read_csv(b)["md5"].tolist()
    stamp = a.stat().st_mtime_ns
    assert derived_images.write_derived(sources, 20, tmp_path / "a", workers=1) == a
    assert a.stat().st_mtime_ns == stamp  # same settings: nothing rewritten


def test_pbc_class_counts_follow_the_full_data_set() -> None:
    counts = derived_images.class_counts(sorted(derived_images.PBC_CLASS_COUNTS), 17092, "pbc")
    assert counts == derived_images.PBC_CLASS_COUNTS and sum(counts.values()) == 17092
    half = derived_images.class_counts(sorted(derived_images.PBC_CLASS_COUNTS), 8546, "pbc")
    assert sum(half.values()) == 8546
    assert all(abs(half[c] - n / 2) <= 1 for c, n in derived_images.PBC_CLASS_COUNTS.items())
    assert derived_images.class_counts(["a", "b", "c"], 10, "balanced") == {"a": 4, "b": 3, "c": 3}


def test_full_path_config_is_the_default_study_with_one_model(tmp_path: Path) -> None:
    path = full_path.run_config(tmp_path / "m.csv", tmp_path / "results", tmp_path / "c.yaml")
    import yaml

    cfg = validate_config(yaml.safe_load(path.read_text()))
    assert cfg["models"][0]["backbone"] == "efficientnet_lite0"
    assert cfg["models"][0]["strategies"] == ["features_svm"]
    assert cfg["augmentation"]["rotations"] == [90, 180, 270]
    assert cfg["svm"]["C"] == [0.1, 1, 10] and cfg["svm"]["solver"] == "auto"
    assert cfg["tasks"][0]["classes"] == sorted(derived_images.PBC_CLASS_COUNTS)


LOG = """[Tue Dec  1 12:00:00 2026]
rule validate_images:
    jobid: 3
[Tue Dec  1 12:00:40 2026]
Finished jobid: 3 (Rule: validate_images)
[Tue Dec  1 12:00:41 2026]
rule split:
    jobid: 2
[Tue Dec  1 12:00:44 2026]
Finished jobid: 2 (Rule: split)
[Tue Dec  1 12:00:44 2026]
rule train_svm:
    jobid: 1
[Tue Dec  1 12:02:44 2026]
Finished jobid: 1 (Rule: train_svm)
"""


def test_full_path_reads_rules_svm_and_accuracy_from_the_run_files(tmp_path: Path) -> None:
    results = tmp_path / "results"
    bench = results / "benchmarks"
    (bench / "train_svm" / "cell_type").mkdir(parents=True)
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    (bench / "validate_images.tsv").write_text(header + "39.5\t0:00:39\t512.0\t1\t1\t1\t0\t0\t150\t70.0\n")
    (bench / "train_svm" / "cell_type" / "holdout.tsv").write_text(
        header + "118.0\t0:01:58\t2048.5\t1\t1\t1\t0\t0\t99\t116.0\n")
    run = results / "runs" / "cell_type" / "features_svm" / "efficientnet_lite0" / "pool" / "holdout"
    run.mkdir(parents=True)
    pd.DataFrame({"kernel": ["linear", "linear", "rbf", "rbf"], "C": [0.1, 1.0, 0.1, 1.0],
                  "mean_test_score": [0.8, 0.9, 0.7, 0.85], "n_splits": 3,
                  "mean_fit_time": [1.0, 2.0, 3.5, 4.25],
                  "selected": [False, True, False, False], "solver": "scalable",
                  "solver_reason": "auto: above it"}).to_csv(run / "cv_results.tsv", sep="\t", index=False)
    (run / "metrics.json").write_text(json.dumps(
        {"metrics": {"accuracy": 0.875, "balanced_accuracy": 0.86},
         "ci": {"accuracy": [0.85, 0.9]}}))
    rules = full_path.per_rule(LOG, results).set_index("rule")
    assert rules.loc["validate_images", "seconds"] == 39.5  # the benchmark file wins
    assert rules.loc["validate_images", "cpu_seconds"] == 70.0
    assert rules.loc["train_svm", "max_rss_mib"] == 2048.5
    assert rules.loc["split", "seconds"] == 3 and rules.loc["split", "source"] == "log stamps"
    facts = full_path.svm_facts(results)
    assert facts["svm_solver"] == "scalable" and facts["svm_selected"] == "linear/C=1"
    assert facts["svm_grid"] == "linear/C=0.1;linear/C=1;rbf/C=0.1;rbf/C=1"
    assert facts["svm_candidates"] == 4 and facts["svm_inner_folds"] == 3
    assert facts["accuracy"] == 0.875 and facts["accuracy_ci_hi"] == 0.9
    assert facts["svm_fit_seconds_per_fold"] == (
        "linear/C=0.1:1.0;linear/C=1:2.0;rbf/C=0.1:3.5;rbf/C=1:4.2")


def test_full_path_rows_replace_only_the_same_size_and_tag(tmp_path: Path) -> None:
    out = tmp_path / "full_path.csv"
    full_path.append_rows([{"images": 800, "tag": "", "minutes_wall": 2.0}], out, 800, "")
    full_path.append_rows([{"images": 8000, "tag": "", "minutes_wall": 20.0}], out, 8000, "")
    full_path.append_rows([{"images": 800, "tag": "", "minutes_wall": 3.0}], out, 800, "")
    frame = pd.read_csv(out).set_index("images")
    assert frame["minutes_wall"].to_dict() == {8000: 20.0, 800: 3.0}
    assert "cpu_flags" in frame.columns

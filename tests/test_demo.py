"""Synthetic demo data: deterministic, well-formed, valid and learnable."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukotype.config import Task
from leukotype.dataset import read_dataset
from leukotype.demo import ELEMENTS, SUBTYPES, main, make_demo_dataset
from leukotype.errors import LeukotypeError
from leukotype.validate import summarise_validation, validate_images


def _digests(out_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out_dir)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(out_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default demo dataset (5 subtypes x 4 patients x 6 cells x 2 elements): its manifest."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"))


def test_manifest_contents(default_demo: Path) -> None:
    manifest = default_demo
    with open(manifest, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "subtype", "element", "group"]
    assert len(rows) == 5 * 4 * 6 * 2
    assert {r["subtype"] for r in rows} == set(SUBTYPES)
    assert {r["element"] for r in rows} == set(ELEMENTS)
    for subtype in SUBTYPES:
        groups = sorted({r["group"] for r in rows if r["subtype"] == subtype})
        assert groups == [f"synthetic-{subtype}-p{p:02d}" for p in range(4)]
    for row in rows:
        assert row["path"].startswith(f"images/{row['subtype']}/synthetic_")
        assert row["path"].endswith(f"_{row['element']}.png")
        assert (manifest.parent / row["path"]).is_file()
    # the two images of one cell share the group; every cell has both
    cells = {}
    for row in rows:
        cells.setdefault(row["path"].rsplit("_", 1)[0], []).append(row)
    assert len(cells) == 5 * 4 * 6
    for pair in cells.values():
        assert sorted(r["element"] for r in pair) == ["cellula", "nucleus"]
        assert len({r["group"] for r in pair}) == 1
    readme = (manifest.parent / "README.txt").read_text(encoding="utf-8")
    assert readme.startswith("SYNTHETIC DEMO DATA")


def test_demo_reads_and_validates_cleanly(default_demo: Path) -> None:
    manifest = default_demo
    df = read_dataset(manifest)
    assert list(df.columns) == ["path", "abspath", "subtype", "element", "group"]
    tasks = [
        Task("subtype", "subtype", SUBTYPES),
        Task("element", "element", ELEMENTS),
        Task(
            "lineage", "subtype", ("ALL", "AML"), {"ALL": ("L1", "L2"), "AML": ("M2", "M3", "M5")}
        ),
    ]
    validated = validate_images(df, tasks, min_side=32)
    summary = summarise_validation(validated)
    assert summary["n_ok"] == 240 and summary["reasons"] == {}
    assert (validated["width"] == 96).all() and (validated["height"] == 96).all()
    assert summary["modes"] == {"RGB": 240}
    assert validated["md5"].is_unique  # no accidental duplicate images


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    small = dict(n_patients_per_subtype=1, cells_per_patient=2, image_size=64)
    make_demo_dataset(tmp_path / "a", seed=7, **small)
    make_demo_dataset(tmp_path / "b", seed=7, **small)
    make_demo_dataset(tmp_path / "c", seed=8, **small)
    a, b, c = (_digests(tmp_path / name) for name in "abc")
    assert len(a) == 5 * 2 * 2 + 2  # images + manifest + README
    assert a == b
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in images)
    with Image.open(tmp_path / "a" / images[0]) as img:
        assert (img.size, img.mode) == ((64, 64), "RGB")


def test_demo_folder_itself_is_not_a_class_folder_dataset(
    default_demo: Path,
) -> None:
    with pytest.raises(LeukotypeError, match="this folder has manifest.csv: pass"):
        read_dataset(default_demo.parent)


def test_rerun_replaces_manifest_and_keeps_it_consistent(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, n_patients_per_subtype=2, cells_per_patient=1, image_size=48)
    manifest = make_demo_dataset(
        tmp_path, n_patients_per_subtype=1, cells_per_patient=1, image_size=48
    )
    assert len(read_dataset(manifest)) == 5 * 1 * 1 * 2


def test_bad_arguments_are_errors(tmp_path: Path) -> None:
    with pytest.raises(LeukotypeError, match="at least one patient"):
        make_demo_dataset(tmp_path, n_patients_per_subtype=0)
    with pytest.raises(LeukotypeError, match="image_size must be >= 32"):
        make_demo_dataset(tmp_path, image_size=16)
    with pytest.raises(LeukotypeError, match="seed must be a non-negative"):
        make_demo_dataset(tmp_path, seed=-1)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [str(tmp_path / "out"), "--seed", "3", "--patients", "1", "--cells", "1", "--size", "40"]
    )
    assert code == 0
    assert "wrote 10 synthetic images" in capsys.readouterr().out
    assert len(read_dataset(tmp_path / "out" / "manifest.csv")) == 10
    assert main([str(tmp_path / "bad"), "--size", "8"]) == 2
    assert "image_size must be >= 32" in capsys.readouterr().err


def _colour_histograms(paths: list[str]) -> np.ndarray:
    features = []
    for path in paths:
        arr = np.asarray(Image.open(path).convert("RGB"))
        features.append(
            np.concatenate(
                [np.histogram(arr[..., c], bins=16, range=(0, 256))[0] for c in range(3)]
            )
            / arr[..., 0].size
        )
    return np.stack(features)


def test_demo_is_learnable_but_not_trivial(default_demo: Path) -> None:
    """Colour histograms + logistic regression, patient-grouped CV (numbers in the report)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    df = read_dataset(default_demo)
    features = _colour_histograms(df["abspath"].tolist())
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    cv = GroupKFold(n_splits=4)

    element = cross_val_score(model, features, df["element"], groups=df["group"], cv=cv).mean()
    assert element > 0.95

    cellula = (df["element"] == "cellula").to_numpy()
    subtype = cross_val_score(
        model, features[cellula], df["subtype"][cellula], groups=df["group"][cellula], cv=cv
    ).mean()
    assert subtype > 0.45  # chance is 0.20

    # no single global pixel statistic gives the subtype away
    mean_intensity = features[cellula] @ np.tile(np.arange(16), 3)[:, None]
    single = cross_val_score(
        model, mean_intensity, df["subtype"][cellula], groups=df["group"][cellula], cv=cv
    ).mean()
    assert single < 0.6

"""Reading datasets: folder of class sub-folders, CSV/TSV manifests, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

from leukotype.config import SCHEMA_DIR
from leukotype.dataset import dataset_root, manifest_schema, read_dataset
from leukotype.errors import LeukotypeError


def _png(path: Path, size: tuple[int, int] = (40, 40), colour=(200, 100, 150)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- folder


def test_folder_lists_class_subfolders_and_ignores_hidden_and_manifest(tmp_path: Path) -> None:
    _png(tmp_path / "M3" / "b.png")
    _png(tmp_path / "M3" / "a.png")
    _png(tmp_path / "L1" / "cell 1 ñ.png")  # space and non-ASCII in the name
    _png(tmp_path / "L1" / ".hidden.png")
    _png(tmp_path / ".cache" / "x.png")
    _png(tmp_path / "L1" / "deeper" / "ignored.png")
    _write(tmp_path / "manifest.csv", "path,label\n")
    _write(tmp_path / "README.md", "not an image\n")

    df = read_dataset(tmp_path)

    assert list(df.columns) == ["path", "abspath", "label", "group"]
    assert df["path"].tolist() == ["L1/cell 1 ñ.png", "M3/a.png", "M3/b.png"]
    assert df["label"].tolist() == ["L1", "M3", "M3"]
    assert df["group"].tolist() == df["path"].tolist()  # no group: each image its own
    for path, abspath in zip(df["path"], df["abspath"]):
        assert Path(abspath).is_absolute()
        assert Path(abspath) == (tmp_path / path).resolve()
        assert Path(abspath).is_file()
    assert dataset_root(tmp_path) == tmp_path


def test_folder_without_class_subfolders_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "loose.png")
    with pytest.raises(LeukotypeError, match="no images found"):
        read_dataset(tmp_path)


def test_missing_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LeukotypeError, match="does not exist"):
        read_dataset(tmp_path / "nope")


# -------------------------------------------------------------------------------- manifest


def test_manifest_with_groups_extra_labels_and_absolute_paths(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "à b.png")
    _png(tmp_path / "imgs" / "c.png")
    elsewhere = _png(tmp_path / "other" / "d.png")
    manifest = _write(
        tmp_path / "data" / "manifest.csv",
        "path,subtype,element,group,md5\n"
        "../imgs/à b.png,M3,nucleus,patient-1,abc\n"
        "../imgs/c.png,L1,cellula,,def\n"
        f"{elsewhere},,cellula,patient-2,\n",
    )

    df = read_dataset(manifest)

    # md5 is dropped (validation recomputes it); label columns keep their order.
    assert list(df.columns) == ["path", "abspath", "subtype", "element", "group"]
    assert df["path"].tolist() == ["../imgs/à b.png", "../imgs/c.png", str(elsewhere)]
    assert [Path(p) for p in df["abspath"]] == [
        (tmp_path / "imgs" / "à b.png").resolve(),
        (tmp_path / "imgs" / "c.png").resolve(),
        elsewhere,
    ]
    assert df["subtype"].tolist() == ["M3", "L1", ""]  # empty label stays empty
    # an empty group falls back to the path: the image is its own group
    assert df["group"].tolist() == ["patient-1", "../imgs/c.png", "patient-2"]
    assert dataset_root(manifest) == manifest.parent


def test_tsv_manifest_and_bom_and_blank_lines(tmp_path: Path) -> None:
    manifest = tmp_path / "list.tsv"
    manifest.write_text("\ufeffpath\tlabel\n\na,b.png\tM2\n\n", encoding="utf-8")
    df = read_dataset(manifest)
    assert df["path"].tolist() == ["a,b.png"]
    assert df["label"].tolist() == ["M2"]


def test_folder_and_manifest_forms_agree(tmp_path: Path) -> None:
    for name in ("L1/x.png", "L2/y.png"):
        _png(tmp_path / name)
    _write(tmp_path / "manifest.csv", "path,label\nL2/y.png,L2\nL1/x.png,L1\n")
    from_folder = read_dataset(tmp_path).sort_values("path").reset_index(drop=True)
    from_manifest = read_dataset(tmp_path / "manifest.csv").sort_values("path")
    assert from_folder.equals(from_manifest.reset_index(drop=True))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty manifest"),
        ("path,label\n", r"empty manifest \(a header but no rows\)"),
        ("file,label\na.png,M3\n", r"line 1: no 'path' column"),
        ("path,group\na.png,p1\n", r"line 1: no label column"),
        ("path,label,label\na.png,M3,M3\n", r"duplicate header columns \['label'\]"),
        ("path,,label\na.png,x,M3\n", r"header column 2 has no name"),
        ("path,label\na.png,M3\n,M2\n", r"line 3: column 'path' is empty"),
        ("path,label\na.png,M3\n  ,M2\n", r"line 3: column 'path' is empty"),
        ("path,label\na.png,M3\nb.png\n", r"line 3: 1 fields but the header has 2"),
        ("path,label,status\na.png,M3,x\n", r"line 2: column 'status' is reserved"),
        ("path,label\na.png,M3\nb.png,M2\n./a.png,M2\n", r"line 4: duplicate path .* line 2"),
    ],
)
def test_manifest_errors_name_file_line_and_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    manifest = _write(tmp_path / "manifest.csv", text)
    with pytest.raises(LeukotypeError, match=message) as info:
        read_dataset(manifest)
    assert str(manifest) in str(info.value)


def test_manifest_schema_file_is_a_valid_schema_for_one_row() -> None:
    schema = json.loads((SCHEMA_DIR / "manifest.schema.json").read_text(encoding="utf-8"))
    assert schema == manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"path": "a.png", "label": "M3", "group": "p1"})
    assert validator.is_valid({"path": "a.png", "subtype": "", "element": "nucleus"})
    assert not validator.is_valid({"label": "M3"})  # path required
    assert not validator.is_valid({"path": ""})
    assert not validator.is_valid({"path": "a.png", "group": 3})
    assert not validator.is_valid({"path": "a.png", "label": None})
    assert not validator.is_valid({"path": "a.png", "image_id": "img000000"})


# ------------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_real_pbc_folder_has_800_images_8_classes_of_100(shared_data: Path) -> None:
    df = read_dataset(shared_data / "pbc")
    assert len(df) == 800
    assert df["label"].value_counts().to_dict() == {
        label: 100
        for label in (
            "basophil",
            "eosinophil",
            "erythroblast",
            "ig",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        )
    }
    assert df["path"].is_unique and df["group"].is_unique
    # the folder form agrees with the shipped manifest (md5/bytes columns dropped)
    from_manifest = read_dataset(shared_data / "pbc" / "manifest.csv")
    assert sorted(from_manifest["path"]) == sorted(df["path"])
    assert list(from_manifest.columns) == ["path", "abspath", "label", "group"]

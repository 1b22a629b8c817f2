"""Read a dataset: a folder of class sub-folders or a CSV/TSV manifest.

Both forms give the same table: ``path`` (as given: relative to the dataset root, or absolute),
``abspath`` (absolute, normalised), one column per label, and ``group`` (images of one group,
e.g. one patient, must never straddle a train/test split; without a group column every image is
its own group). All columns are strings. Nothing is decoded here: that is validation's job.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd

from leukotype.config import SCHEMA_DIR
from leukotype.errors import LeukotypeError

#: File names skipped when scanning a folder of class sub-folders.
MANIFEST_NAMES = frozenset({"manifest.csv", "manifest.tsv"})
#: Suffixes read as tab-separated manifests (anything else: comma, unless the header has tabs).
TSV_SUFFIXES = frozenset({".tsv", ".tab"})
#: Manifest columns that validation recomputes from the file itself; dropped on reading so the
#: validated table has exactly one (trusted) md5/bytes.
RECOMPUTED_COLUMNS = ("md5", "bytes")
#: Label column of the folder form.
FOLDER_LABEL_COLUMN = "label"


def dataset_root(source: str | os.PathLike) -> Path:
    """Folder that relative paths of ``source`` are relative to (the folder, or the manifest's)."""
    source = _existing_source(source)
    return source if source.is_dir() else source.parent


def read_dataset(source: str | os.PathLike, labelled: bool = True) -> pd.DataFrame:
    """Table ``path, abspath, <label columns>, group`` of every image listed by ``source``.

    ``source`` is either
    - a folder ``<root>/<class>/<file>``: label column ``label`` = the sub-folder name; hidden
      files/folders, files directly in ``<root>`` (e.g. ``manifest.csv``, a README) and deeper
      sub-folders are ignored; every other entry is listed, broken symlinks and FIFOs included
      (validation rejects non-images and non-regular files with a reason), or
    - a CSV/TSV manifest ``path,label[,group][,more label columns]`` with paths relative to
      the manifest's folder (absolute paths allowed). Columns ``md5``/``bytes`` are dropped
      because validation recomputes them.

    Raises LeukotypeError (naming the file, the line and the problem) for a missing source, an
    empty dataset, a missing ``path`` column, no label column (unless ``labelled`` is False: a
    manifest of new images to predict), schema violations and duplicate paths.
    """
    source = _existing_source(source)
    if source.is_dir():
        table = _read_folder(source)
    else:
        table = _read_manifest(source, labelled)
    return table.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# folder form


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _is_real_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _read_folder(root: Path) -> pd.DataFrame:
    root = root.resolve()
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p))
    rows: list[dict[str, str]] = []
    for class_dir in class_dirs:
        for file in sorted(class_dir.iterdir()):
            # Deeper real folders are ignored; anything else (a dangling or looping symlink, a
            # FIFO, a link to a folder) is listed so that validation rejects it with a reason.
            if _is_hidden(file) or file.name in MANIFEST_NAMES or _is_real_folder(file):
                continue
            rel = f"{class_dir.name}/{file.name}"
            rows.append(
                {
                    "path": rel,
                    "abspath": _absolute(root, rel),
                    FOLDER_LABEL_COLUMN: class_dir.name,
                    "group": rel,
                }
            )
    if not rows:
        manifests = sorted(p.name for p in root.iterdir() if p.name in MANIFEST_NAMES)
        hint = (
            f"; this folder has {manifests[0]}: pass {root / manifests[0]} as the source"
            if manifests
            else ", or pass a manifest CSV/TSV file instead of the folder"
        )
        raise LeukotypeError(
            f"{root}: no images found; expected class sub-folders '<root>/<class>/<image>' "
            f"(found sub-folders: {[p.name for p in class_dirs] or 'none'}){hint}"
        )
    return pd.DataFrame(rows, columns=["path", "abspath", FOLDER_LABEL_COLUMN, "group"])


# --------------------------------------------------------------------------------------------
# manifest form


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of one manifest row (``workflow/schemas/manifest.schema.json``)."""
    with open(SCHEMA_DIR / "manifest.schema.json", encoding="utf-8") as handle:
        return json.load(handle)


def _delimiter(path: Path, header_line: str) -> str:
    if path.suffix.lower() in TSV_SUFFIXES:
        return "\t"
    if path.suffix.lower() == ".csv":
        return ","
    return "\t" if "\t" in header_line else ","


def _read_manifest(path: Path, labelled: bool = True) -> pd.DataFrame:
    path = path.resolve()
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM Excel writes
    except UnicodeDecodeError as exc:
        raise LeukotypeError(f"{path}: not UTF-8 text ({exc}); save the manifest as UTF-8") from exc
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if not first:
        raise LeukotypeError(f"{path}: empty manifest; expected a header 'path,label[,group]'")
    reader = csv.reader(text.splitlines(keepends=True), delimiter=_delimiter(path, first))
    header: list[str] | None = None
    records: list[tuple[int, dict[str, str]]] = []
    for fields in reader:
        if not any(field.strip() for field in fields):
            continue  # blank line
        if header is None:
            header = _check_header(path, fields, reader.line_num, labelled)
            continue
        if len(fields) != len(header):
            raise LeukotypeError(
                f"{path} line {reader.line_num}: {len(fields)} fields but the header has "
                f"{len(header)} ({', '.join(header)}); quote fields that contain the delimiter"
            )
        records.append((reader.line_num, dict(zip(header, fields, strict=True))))
    assert header is not None
    if not records:
        raise LeukotypeError(f"{path}: empty manifest (a header but no rows)")
    _validate_records(path, records)

    root = path.parent
    columns = [c for c in header if c not in RECOMPUTED_COLUMNS]
    label_columns = [c for c in columns if c not in ("path", "group")]
    rows = []
    for _, record in records:
        row = {"path": record["path"], "abspath": _absolute(root, record["path"])}
        row.update({c: record[c] for c in label_columns})
        # An empty group means "no group known": the image is its own group.
        row["group"] = record.get("group") or record["path"]
        rows.append(row)
    _check_duplicates(path, [line for line, _ in records], [r["abspath"] for r in rows])
    return pd.DataFrame(rows, columns=["path", "abspath", *label_columns, "group"], dtype=str)


def _check_header(path: Path, fields: list[str], line: int, labelled: bool = True) -> list[str]:
    header = [field.strip() for field in fields]
    if "" in header:
        raise LeukotypeError(
            f"{path} line {line}: header column {header.index('') + 1} has no name; "
            f"header: {header}"
        )
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise LeukotypeError(f"{path} line {line}: duplicate header columns {duplicated}")
    if "path" not in header:
        raise LeukotypeError(
            f"{path} line {line}: no 'path' column (header: {header}); a manifest needs "
            "'path,label[,group]' with image paths relative to the manifest's folder"
        )
    labels = [c for c in header if c not in ("path", "group", *RECOMPUTED_COLUMNS)]
    if not labels and labelled:
        raise LeukotypeError(
            f"{path} line {line}: no label column (header: {header}); add e.g. a 'label' "
            "column and name it as a task's 'column' in the config"
        )
    return header


def _validate_records(path: Path, records: Iterable[tuple[int, Mapping[str, str]]]) -> None:
    """Check every row against the manifest schema; report the first bad row in words."""
    validator = jsonschema.Draft202012Validator(manifest_schema())
    for line, record in records:
        if validator.is_valid(record):  # fast path; errors are only collected for a bad row
            continue
        error = jsonschema.exceptions.best_match(validator.iter_errors(dict(record)))
        if error is not None:
            raise LeukotypeError(f"{path} line {line}: {_describe(error, record)}")


def _describe(error: jsonschema.ValidationError, record: Mapping[str, str]) -> str:
    """A schema violation in the words of a manifest (column and value, not JSON pointers)."""
    if error.validator == "required":
        return f"{error.message}; the manifest needs a 'path' column"
    if error.validator == "not" and "propertyNames" in error.schema_path:
        return (
            f"column {error.instance!r} is reserved (computed by validation); rename it. "
            f"Columns: {list(record)}"
        )
    column = error.path[0] if error.path else None
    if column == "path":
        return f"column 'path' is empty ({record.get('path')!r}); every row needs an image path"
    if column is not None:
        return f"column {column!r} has value {error.instance!r}: {error.message}"
    return error.message


def _check_duplicates(path: Path, lines: list[int], abspaths: list[str]) -> None:
    first_line: dict[str, int] = {}
    for line, abspath in zip(lines, abspaths, strict=True):
        if abspath in first_line:
            raise LeukotypeError(
                f"{path} line {line}: duplicate path {abspath!r} (already listed on line "
                f"{first_line[abspath]}); list each image once"
            )
        first_line[abspath] = line


# --------------------------------------------------------------------------------------------
# helpers


def _existing_source(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise LeukotypeError(
            f"dataset source {str(source)!r} does not exist; give a folder of class "
            "sub-folders or a manifest CSV/TSV"
        )
    return path


def _absolute(root: Path, path: str) -> str:
    """``path`` made absolute against ``root`` and normalised (file symlinks are kept as is)."""
    return os.path.normpath(os.path.join(root, path))

"""Validate every image once: readable, big enough, not a bomb, labelled consistently.

Each row of the dataset table becomes one row of the validated table with ``status`` ``ok`` or
``rejected`` and a ``reason`` (``code: detail``). Rejections are reported, never silently
dropped, so the user sees exactly which files were left out and why.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageFile, UnidentifiedImageError

from leukotype.tasks import Task
from leukotype.errors import LeukotypeError
from leukotype.images import NATIVE_MODES, exif_orientation, to_rgb, upright

#: Reason codes, in the order the checks run (the first failing check names the reason).
REASONS = (
    "outside_dataset",
    "missing_file",
    "broken_link",
    "not_a_regular_file",
    "zero_bytes",
    "not_an_image",
    "too_large",
    "truncated",
    "too_small",
    "extreme_aspect_ratio",
    "label_not_in_classes",
    "conflicting_duplicate",
)
#: Columns computed here; dataset columns other than these and path/abspath/group are labels.
COMPUTED_COLUMNS = (
    "image_id",
    "md5",
    "bytes",
    "width",
    "height",
    "mode",
    "converted",
    "orientation",
    "status",
    "reason",
)


@dataclass(frozen=True)
class FileCheck:
    """What was learnt about one file by reading and decoding it once."""

    md5: str | None = None
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    mode: str = ""
    orientation: int | None = None
    reason: str = ""


#: What a path that is not a regular file is, in words (``stat`` mode test -> description).
_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_regular_file(path: str | os.PathLike) -> bytes | str:
    """The bytes of ``path`` if it is a regular file, else the rejection reason (a str).

    The file is opened non-blocking and checked with ``fstat`` on that very descriptor before
    any byte is read, so a FIFO, ``/dev/zero`` or a folder is rejected at once (never read
    forever), and a dangling or looping symlink gets its own reason.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        if path.is_symlink():
            return f"broken_link: {path} -> {os.readlink(path)} (the link's target does not exist)"
        return f"missing_file: {path}"
    except IsADirectoryError:
        return f"not_a_regular_file: {path} is a folder; only regular files are read"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"broken_link: {path} is a symlink loop"
        return f"missing_file: cannot read {path}: {exc.strerror or exc}"
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((words for test, words in _FILE_KINDS if test(mode)), "not a regular file")
        return f"not_a_regular_file: {path} is {kind}; only regular files are read"
    with os.fdopen(fd, "rb") as handle:
        try:
            return handle.read()
        except OSError as exc:
            return f"missing_file: cannot read {path}: {exc.strerror or exc}"


def check_file(
    path: str | os.PathLike,
    min_side: int,
    max_pixels: int,
    max_aspect_ratio: float | None = None,
) -> FileCheck:
    """Read ``path`` once, hash it, and decode it once (unless the header already rejects it).

    Only regular files are read (:func:`read_regular_file`). The header is checked against
    ``max_pixels`` before any pixel is decoded, so a decompression bomb costs nothing. The
    decode goes through ``images.upright`` and ``images.to_rgb`` (the EXIF orientation is
    applied and recorded) so that a file that passes here is one that extraction can load.
    ``max_aspect_ratio`` rejects strips (long side / short side above it) that a cell-sized
    input would squash.
    """
    path = Path(path)
    data = read_regular_file(path)
    if isinstance(data, str):
        return FileCheck(reason=data)
    md5, size = hashlib.md5(data).hexdigest(), len(data)
    if size == 0:
        return FileCheck(md5=md5, bytes=0, reason="zero_bytes: empty file")
    partial = FileCheck(md5=md5, bytes=size)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # PIL's own guard (header far beyond Image.MAX_IMAGE_PIXELS); nothing was decoded.
        return _with(partial, reason=f"too_large: {exc}")
    except UnidentifiedImageError:
        # (PIL's message names a BytesIO object: useless and different on every run)
        return _with(partial, reason="not_an_image: no image format recognised")
    except (OSError, SyntaxError, ValueError) as exc:
        return _with(partial, reason=f"not_an_image: {type(exc).__name__}: {exc}")
    with img:
        width, height = img.size
        header = _with(partial, width=width, height=height, mode=img.mode)
        if width * height > max_pixels:
            return _with(header, reason=f"too_large: {width}x{height} > {max_pixels} pixels")
        try:
            img.load()
            header = _with(header, orientation=exif_orientation(img))
            to_rgb(upright(img))
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "cannot be read"
            return _with(header, reason=f"truncated: {type(exc).__name__}: {exc}")
    if min(width, height) < min_side:
        return _with(header, reason=f"too_small: {width}x{height} < {min_side}")
    ratio = max(width, height) / max(1, min(width, height))
    if max_aspect_ratio is not None and ratio > max_aspect_ratio:
        return _with(
            header,
            reason=f"extreme_aspect_ratio: {width}x{height} is {ratio:.1f}:1 > {max_aspect_ratio:g}:1 "
            "(not a single-cell crop; raise validation.max_aspect_ratio if it is one)",
        )
    return header


#: What a training run's user can do about an image outside the manifest's folder.
OUTSIDE_HINT = "set validation.allow_outside_paths: true to read it"


def outside_reason(abspath: str, root: str | os.PathLike, hint: str = OUTSIDE_HINT) -> str:
    """``outside_dataset`` reason when ``abspath`` does not lie under ``root``, else ''."""
    root = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.abspath(abspath))
    if os.path.commonpath([root, path]) == root:
        return ""
    return f"outside_dataset: {path} is outside the dataset folder {root}; {hint}"


def validate_images(
    df: pd.DataFrame,
    tasks: Sequence[Task],
    min_side: int = 32,
    max_pixels: int = 50_000_000,
    threads: int = 1,
    max_aspect_ratio: float | None = None,
    inside: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Validated table of ``df`` (from ``dataset.read_dataset``), one row per input row.

    ``inside``: the dataset folder; a row whose path lies outside it (``../..``, an absolute
    path elsewhere) is rejected as ``outside_dataset`` without being opened. None allows any
    path. ``orientation`` is the EXIF orientation applied when decoding (1 = as stored).

    Columns: ``image_id, path, abspath, <label columns>, group, md5, bytes, width, height,
    mode, converted, status, reason``, rows in sorted-``path`` order; ``image_id`` is ``img``
    plus the 6-digit index in that order over ALL rows (stable whatever gets rejected).
    ``mode`` is the file's PIL mode; ``converted`` is True when it was not RGB (``to_rgb``
    converts deliberately). Identical bytes under the same labels stay ``ok`` (the split
    stage groups them); identical bytes under different non-empty labels in any task column
    are all rejected as ``conflicting_duplicate``.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone switched PIL to pad truncated files silently; validation would then pass
        # broken images. Refuse rather than flip the global back behind their back.
        raise LeukotypeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; validation needs "
            "it False to detect truncated images"
        )
    table = _prepare(df, tasks)
    with warnings.catch_warnings():
        # Headers above max_pixels are rejected before decoding; PIL's bomb warning is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        checks = _check_all(table["abspath"].tolist(), min_side, max_pixels, threads, max_aspect_ratio, inside)

    table["md5"] = pd.array([c.md5 for c in checks], dtype="str")
    table["bytes"] = pd.array([c.bytes for c in checks], dtype="Int64")
    table["width"] = pd.array([c.width for c in checks], dtype="Int64")
    table["height"] = pd.array([c.height for c in checks], dtype="Int64")
    table["mode"] = [c.mode for c in checks]
    table["converted"] = [bool(c.mode) and c.mode not in NATIVE_MODES for c in checks]
    table["orientation"] = pd.array([c.orientation for c in checks], dtype="Int64")
    reasons = pd.Series([c.reason for c in checks], index=table.index, dtype=object)
    reasons = _label_reasons(table, tasks, reasons)
    reasons = _duplicate_reasons(table, tasks, reasons)
    table["status"] = ["rejected" if r else "ok" for r in reasons]
    table["reason"] = reasons.astype(str)
    return table


def _prepare(df: pd.DataFrame, tasks: Sequence[Task]) -> pd.DataFrame:
    """Copy of ``df`` sorted by path with ``image_id`` first and ``group`` after the labels."""
    if "path" not in df.columns:
        raise LeukotypeError(f"dataset table has no 'path' column (columns: {list(df.columns)})")
    clashes = [c for c in COMPUTED_COLUMNS if c in df.columns]
    if clashes:
        raise LeukotypeError(f"dataset table already has computed column(s) {clashes}")
    missing = [(t.name, t.column) for t in tasks if t.column not in df.columns]
    if missing:
        raise LeukotypeError(
            "task label column(s) missing from the dataset: "
            + ", ".join(f"task {name!r} needs column {column!r}" for name, column in missing)
            + f"; dataset columns: {list(df.columns)}"
        )
    duplicated = df["path"][df["path"].duplicated()].tolist()
    if duplicated:
        raise LeukotypeError(f"duplicate paths in the dataset table: {duplicated[:5]}")

    table = df.copy()
    table["path"] = table["path"].astype(str)
    if "abspath" not in table.columns:
        table["abspath"] = [os.path.abspath(p) for p in table["path"]]
    if "group" not in table.columns:
        table["group"] = table["path"]
    table["group"] = table["group"].fillna("").astype(str)
    table["group"] = table["group"].where(table["group"] != "", table["path"])
    labels = [c for c in table.columns if c not in ("path", "abspath", "group")]
    for column in labels:
        table[column] = table[column].fillna("").astype(str)
    # Sorting by code point (Python's str order), not locale: ids must not depend on the machine.
    order = sorted(range(len(table)), key=lambda i: table["path"].iat[i])
    table = table.iloc[order].reset_index(drop=True)
    table.insert(0, "image_id", [f"img{i:06d}" for i in range(len(table))])
    return table[["image_id", "path", "abspath", *labels, "group"]]


def _check_all(
    paths: list[str],
    min_side: int,
    max_pixels: int,
    threads: int,
    max_aspect_ratio: float | None = None,
    inside: str | os.PathLike | None = None,
) -> list[FileCheck]:
    def check(path: str) -> FileCheck:
        outside = outside_reason(path, inside) if inside is not None else ""
        return FileCheck(reason=outside) if outside else check_file(path, min_side, max_pixels, max_aspect_ratio)

    if threads <= 1 or len(paths) < 2:
        return [check(p) for p in paths]
    # PIL releases the GIL while decoding, so threads overlap file reads and decodes.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(check, paths))


def _label_reasons(table: pd.DataFrame, tasks: Sequence[Task], reasons: pd.Series) -> pd.Series:
    """Reject (still-ok) rows whose non-empty label is not a source class of some task."""
    reasons = reasons.copy()
    for task in tasks:
        valid = task.source_classes
        labels = table[task.column]
        bad = (reasons == "") & (labels != "") & ~labels.isin(valid)
        for i in bad[bad].index:
            reasons.at[i] = (
                f"label_not_in_classes: task {task.name!r} column {task.column!r} has "
                f"{labels.at[i]!r}; valid: {list(valid)}"
            )
    return reasons


def _duplicate_reasons(table: pd.DataFrame, tasks: Sequence[Task], reasons: pd.Series) -> pd.Series:
    """Reject every copy of identical bytes carrying different non-empty labels in a column."""
    reasons = reasons.copy()
    columns = list(dict.fromkeys(t.column for t in tasks))
    candidates = table[(reasons == "") & table["md5"].notna()]
    for md5, copies in candidates.groupby("md5", sort=False):
        if len(copies) < 2:
            continue
        for column in columns:
            labels = sorted({v for v in copies[column] if v != ""})
            if len(labels) > 1:
                detail = (
                    f"conflicting_duplicate: identical bytes (md5 {md5}) labelled {labels} "
                    f"in column {column!r}: {sorted(copies['path'])}"
                )
                reasons.loc[copies.index] = detail
                break
    return reasons


def check_class_counts(validated: pd.DataFrame, tasks: Sequence[Task], min_per_class: int) -> None:
    """Raise LeukotypeError if any class of any task has fewer than ``min_per_class`` ok images.

    Counts use ``task.to_task_labels`` on the ``ok`` rows (a derived task counts its merged
    classes). All shortfalls are listed in one message.
    """
    ok = validated[validated["status"] == "ok"]
    problems = []
    for task in tasks:
        counts = class_counts(ok, task)
        for cls, count in counts.items():
            if count < min_per_class:
                problems.append(
                    f"task {task.name!r} class {cls!r}: {count} image(s) < minimum {min_per_class}"
                )
    if problems:
        raise LeukotypeError(
            "too few valid images per class: "
            + "; ".join(problems)
            + " (add images, fix rejected ones, or lower 'min_per_class' in the config)"
        )


def class_counts(validated_ok: pd.DataFrame, task: Task) -> dict[str, int]:
    """Number of rows per class of ``task`` (all classes listed, zero included)."""
    labels = task.to_task_labels(validated_ok[task.column])
    counts = labels.value_counts()
    return {cls: int(counts.get(cls, 0)) for cls in task.classes}


def study_copies(md5s: pd.Series, study: pd.DataFrame) -> pd.Series:
    """For each md5 the ``path`` of the validated ``study`` image with those bytes, "" for
    none: images from outside the study (external sets, stain references) must not be copies
    of its images."""
    path_of = dict(zip(study["md5"].astype(str), study["path"].astype(str)))
    return md5s.astype(str).map(path_of).fillna("")


def summarise_validation(validated: pd.DataFrame) -> dict[str, Any]:
    """Counts per status, per reason code, and of converted (non-RGB) images."""
    codes = validated["reason"].fillna("").astype(str).str.split(":", n=1).str[0]
    rejected = codes[validated["status"] == "rejected"]
    ok = validated["status"] == "ok"
    return {
        "n_images": int(len(validated)),
        "n_ok": int(ok.sum()),
        "n_rejected": int((~ok).sum()),
        "status": {str(k): int(v) for k, v in validated["status"].value_counts().items()},
        "reasons": {str(k): int(v) for k, v in rejected.value_counts().sort_index().items()},
        # (a table read back from TSV may hold "True"/"False" strings: compare, don't cast)
        "converted": int(validated.loc[ok, "converted"].astype(str).str.lower().eq("true").sum()),
        "modes": {str(k): int(v) for k, v in validated.loc[ok, "mode"].value_counts().items()},
    }


def _with(check: FileCheck, **changes: Any) -> FileCheck:
    return FileCheck(**{**check.__dict__, **changes})

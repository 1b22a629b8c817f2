"""Image validation: every rejection reason, mode conversions, ids, counts and summaries."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from leukotype.config import Task
from leukotype.dataset import read_dataset
from leukotype.errors import LeukotypeError
from leukotype.images import load_rgb
from leukotype.io import read_tsv, write_tsv
from leukotype.validate import check_class_counts, summarise_validation, validate_images

SUBTYPE = Task(name="subtype", column="label", classes=("L1", "L2", "M3"))
LINEAGE = Task(
    name="lineage",
    column="label",
    classes=("ALL", "AML"),
    derive={"ALL": ("L1", "L2"), "AML": ("M3",)},
)


def _noise_image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, mode="RGB").convert(mode)


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` but whose pixel data is tiny."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _table(root: Path, rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [p for p, _ in rows],
            "abspath": [str(root / p) for p, _ in rows],
            "label": [label for _, label in rows],
            "group": [p for p, _ in rows],
        }
    )


def _by_path(validated: pd.DataFrame) -> dict[str, pd.Series]:
    return {row["path"]: row for _, row in validated.iterrows()}


@pytest.fixture()
def zoo(tmp_path: Path) -> pd.DataFrame:
    """One file per outcome, in a dataset table as read_dataset would give it."""
    full = _noise_image(1, (64, 64))
    _save(full, tmp_path / "L1" / "good.png")
    _save(_noise_image(2), tmp_path / "L1" / "name with spaces ü.jpg", quality=90)
    (tmp_path / "L1" / "zero.png").write_bytes(b"")
    (tmp_path / "L1" / "text.png").write_text("this is not an image\n", encoding="utf-8")
    jpeg = _save(_noise_image(3, (64, 64)), tmp_path / "L1" / "cut.jpg", quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    png = _save(_noise_image(4, (64, 64)), tmp_path / "L1" / "cut.png")
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    _save(_noise_image(5, (20, 18)), tmp_path / "L1" / "tiny.png")
    _png_with_header(tmp_path / "L1" / "bomb.png", 100_000, 100_000)  # PIL's own guard
    _png_with_header(tmp_path / "L1" / "large.png", 9_000, 9_000)  # above max_pixels only
    _save(_noise_image(6, (64, 64)), tmp_path / "L1" / "badlabel.png")
    # identical bytes under two labels: all copies rejected
    _save(_noise_image(7, (64, 64)), tmp_path / "L1" / "dup_a.png")
    (tmp_path / "M3").mkdir(exist_ok=True)
    (tmp_path / "M3" / "dup_b.png").write_bytes((tmp_path / "L1" / "dup_a.png").read_bytes())
    # identical bytes under the same label: kept
    (tmp_path / "L1" / "same_copy.png").write_bytes((tmp_path / "L1" / "good.png").read_bytes())
    rows = [
        ("L1/good.png", "L1"),
        ("L1/name with spaces ü.jpg", "L1"),
        ("L1/zero.png", "L1"),
        ("L1/text.png", "L1"),
        ("L1/cut.jpg", "L1"),
        ("L1/cut.png", "L1"),
        ("L1/tiny.png", "L1"),
        ("L1/bomb.png", "L1"),
        ("L1/large.png", "L1"),
        ("L1/missing.png", "L1"),
        ("L1/badlabel.png", "M9"),
        ("L1/dup_a.png", "L1"),
        ("M3/dup_b.png", "M3"),
        ("L1/same_copy.png", "L1"),
    ]
    return _table(tmp_path, rows)


def test_every_rejection_reason(zoo: pd.DataFrame) -> None:
    validated = validate_images(zoo, [SUBTYPE, LINEAGE], min_side=32, max_pixels=50_000_000)
    rows = _by_path(validated)
    expected = {
        "L1/good.png": "",
        "L1/name with spaces ü.jpg": "",
        "L1/same_copy.png": "",
        "L1/zero.png": "zero_bytes",
        "L1/text.png": "not_an_image",
        "L1/cut.jpg": "truncated",
        "L1/cut.png": "truncated",
        "L1/tiny.png": "too_small",
        "L1/bomb.png": "too_large",
        "L1/large.png": "too_large",
        "L1/missing.png": "missing_file",
        "L1/badlabel.png": "label_not_in_classes",
        "L1/dup_a.png": "conflicting_duplicate",
        "M3/dup_b.png": "conflicting_duplicate",
    }
    codes = {path: row["reason"].split(":")[0] for path, row in rows.items()}
    assert codes == expected
    for path, row in rows.items():
        assert row["status"] == ("ok" if expected[path] == "" else "rejected"), path

    assert rows["L1/tiny.png"]["reason"] == "too_small: 20x18 < 32"
    assert (rows["L1/tiny.png"]["width"], rows["L1/tiny.png"]["height"]) == (20, 18)
    # 9000x9000 is refused from the header: recorded size, never decoded (the pixel data is
    # a few bytes, so decoding would have failed as 'truncated')
    assert rows["L1/large.png"]["reason"] == "too_large: 9000x9000 > 50000000 pixels"
    assert (rows["L1/large.png"]["width"], rows["L1/large.png"]["height"]) == (9000, 9000)
    bad = rows["L1/badlabel.png"]["reason"]
    assert "task 'subtype'" in bad and "'M9'" in bad and "['L1', 'L2', 'M3']" in bad
    dup = rows["L1/dup_a.png"]["reason"]
    assert "['L1', 'M3']" in dup and "M3/dup_b.png" in dup
    assert rows["L1/zero.png"]["bytes"] == 0
    assert pd.isna(rows["L1/missing.png"]["md5"]) and pd.isna(rows["L1/missing.png"]["bytes"])
    # same bytes, same label: both ok with the same md5 (the split stage groups them)
    assert rows["L1/same_copy.png"]["md5"] == rows["L1/good.png"]["md5"]


def test_columns_ids_and_order(zoo: pd.DataFrame) -> None:
    shuffled = zoo.sample(frac=1.0, random_state=3).reset_index(drop=True)
    validated = validate_images(shuffled, [SUBTYPE])
    assert list(validated.columns) == [
        "image_id",
        "path",
        "abspath",
        "label",
        "group",
        "md5",
        "bytes",
        "width",
        "height",
        "mode",
        "converted",
        "orientation",
        "status",
        "reason",
    ]
    assert validated["path"].tolist() == sorted(zoo["path"])
    assert validated["image_id"].tolist() == [f"img{i:06d}" for i in range(len(zoo))]
    # ids do not depend on the input order, nor on the thread count
    again = validate_images(zoo, [SUBTYPE], threads=3)
    pd.testing.assert_frame_equal(validated, again)
    ok = validated[validated["status"] == "ok"]
    assert (ok["reason"] == "").all()
    good = validated.set_index("path").loc["L1/good.png"]
    assert (good["width"], good["height"], good["mode"], good["converted"]) == (
        64,
        64,
        "RGB",
        False,
    )
    assert good["bytes"] == Path(good["abspath"]).stat().st_size


def _i16_image() -> Image.Image:
    arr = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 20 + 1000).astype(np.uint16)
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    ("name", "make", "expected_mode"),
    [
        ("rgba.png", lambda: _noise_image(8, (40, 40), "RGBA"), "RGBA"),
        ("palette.png", lambda: _noise_image(9, (40, 40), "P"), "P"),
        ("gray.png", lambda: _noise_image(10, (40, 40), "L"), "L"),
        ("gray16.png", _i16_image, "I;16"),
        ("cmyk.jpg", lambda: _noise_image(11, (40, 40), "CMYK"), "CMYK"),
    ],
)
def test_modes_are_recorded_and_decode_to_rgb(
    tmp_path: Path, name: str, make, expected_mode: str
) -> None:
    path = _save(make(), tmp_path / "L2" / name)
    validated = validate_images(_table(tmp_path, [(f"L2/{name}", "L2")]), [SUBTYPE])
    row = validated.iloc[0]
    assert (row["status"], row["mode"], bool(row["converted"])) == ("ok", expected_mode, True)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (40, 40)
    if expected_mode == "I;16":
        arr = np.asarray(rgb)
        assert arr.min() == 0 and arr.max() == 255  # rescaled by its range, not clipped


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    clear = Image.new("RGBA", (40, 40), (10, 20, 30, 0))
    _save(clear, tmp_path / "L1" / "clear.png")
    validated = validate_images(_table(tmp_path, [("L1/clear.png", "L1")]), [SUBTYPE])
    assert validated.loc[0, "status"] == "ok"
    assert np.asarray(load_rgb(validated.loc[0, "abspath"])).min() == 255


def test_low_max_pixels_rejects_a_normal_image(tmp_path: Path) -> None:
    _save(_noise_image(12, (64, 64)), tmp_path / "L1" / "a.png")
    validated = validate_images(_table(tmp_path, [("L1/a.png", "L1")]), [SUBTYPE], max_pixels=4000)
    assert validated.loc[0, "reason"] == "too_large: 64x64 > 4000 pixels"


def test_empty_labels_are_not_rejected_nor_conflicting(tmp_path: Path) -> None:
    img = _save(_noise_image(13, (64, 64)), tmp_path / "x" / "a.png")
    (tmp_path / "x" / "b.png").write_bytes(img.read_bytes())
    validated = validate_images(_table(tmp_path, [("x/a.png", "L1"), ("x/b.png", "")]), [SUBTYPE])
    assert validated["status"].tolist() == ["ok", "ok"]


def test_truncated_images_are_not_silently_padded(
    zoo: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    # if some library flipped PIL to pad truncated files, validation refuses to run
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(LeukotypeError, match="LOAD_TRUNCATED_IMAGES"):
        validate_images(zoo, [SUBTYPE])


def test_missing_task_column_is_an_error(zoo: pd.DataFrame) -> None:
    task = Task(name="element", column="element", classes=("nucleus", "cellula"))
    with pytest.raises(LeukotypeError, match="task 'element' needs column 'element'"):
        validate_images(zoo, [task])


def test_summary_counts_statuses_and_reasons(zoo: pd.DataFrame) -> None:
    summary = summarise_validation(validate_images(zoo, [SUBTYPE]))
    assert summary["n_images"] == 14 and summary["n_ok"] == 3 and summary["n_rejected"] == 11
    assert summary["status"] == {"ok": 3, "rejected": 11}
    assert summary["reasons"] == {
        "conflicting_duplicate": 2,
        "label_not_in_classes": 1,
        "missing_file": 1,
        "not_an_image": 1,
        "too_large": 2,
        "too_small": 1,
        "truncated": 2,
        "zero_bytes": 1,
    }
    assert summary["converted"] == 0 and summary["modes"] == {"RGB": 3}


def test_summary_of_a_table_read_back_from_tsv(tmp_path: Path) -> None:
    _save(_noise_image(14, (40, 40), "L"), tmp_path / "L1" / "gray.png")
    _save(_noise_image(15, (40, 40)), tmp_path / "L1" / "rgb.png")
    table = _table(tmp_path, [("L1/gray.png", "L1"), ("L1/rgb.png", "L1")])
    write_tsv(validate_images(table, [SUBTYPE]), tmp_path / "validated.tsv")
    back = read_tsv(tmp_path / "validated.tsv")
    summary = summarise_validation(back)
    assert summary["converted"] == 1 and summary["modes"] == {"L": 1, "RGB": 1}
    assert back["image_id"].tolist() == ["img000000", "img000001"]


def test_class_counts_error_names_task_class_count_and_minimum(zoo: pd.DataFrame) -> None:
    validated = validate_images(zoo, [SUBTYPE, LINEAGE])
    check_class_counts(validated[validated["label"] == "L1"], [], 5)  # no tasks: nothing to check
    with pytest.raises(LeukotypeError) as info:
        check_class_counts(validated, [SUBTYPE, LINEAGE], min_per_class=2)
    message = str(info.value)
    # ok rows: 3 x L1 -> subtype L2 and M3 have 0, lineage AML has 0 (its source M3 is empty)
    assert "task 'subtype' class 'L2': 0 image(s) < minimum 2" in message
    assert "task 'subtype' class 'M3': 0 image(s) < minimum 2" in message
    assert "task 'lineage' class 'AML': 0 image(s) < minimum 2" in message
    assert "class 'L1'" not in message  # 3 ok L1 images >= 2
    assert "class 'ALL'" not in message  # derived class counted through to_task_labels: 3 >= 2
    check_class_counts(validated, [Task("subtype", "label", ("L1",))], min_per_class=3)


@pytest.mark.shared_data
def test_real_pbc_subset_is_all_ok_rgb(shared_data: Path) -> None:
    df = read_dataset(shared_data / "pbc")
    subset = df.groupby("label", group_keys=False).head(5)  # 8 classes x 5 = 40 images
    task = Task("cell", "label", tuple(sorted(df["label"].unique())))
    validated = validate_images(subset, [task], threads=2)
    assert len(validated) == 40
    assert (validated["status"] == "ok").all()
    assert (validated["mode"] == "RGB").all() and not validated["converted"].any()
    assert validated["md5"].is_unique
    assert validated["width"].between(360, 366).all()
    check_class_counts(validated, [task], min_per_class=5)


# ------------------------------------------------------------------ not regular files, paths


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if validation blocks on a FIFO or /dev/zero."""
    import signal

    def timeout(signum, frame):
        raise TimeoutError("validation blocked reading a non-regular file")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _codes(validated: pd.DataFrame) -> dict[str, str]:
    return dict(zip(validated["path"], validated["reason"].str.split(":").str[0]))


def test_only_regular_files_are_read_others_get_a_reason(tmp_path, no_hang):
    import os

    _save(_noise_image(0), tmp_path / "L1" / "good.png")
    os.mkfifo(tmp_path / "L1" / "pipe.png")
    (tmp_path / "L1" / "folder.png").mkdir()
    (tmp_path / "L1" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "L1" / "loop.png").symlink_to(tmp_path / "L1" / "loop.png")
    names = ["good.png", "pipe.png", "folder.png", "dangling.png", "loop.png"]
    df = _table(tmp_path, [(f"L1/{n}", "L1") for n in names] + [("/dev/zero", "L1")])
    df.loc[df["path"] == "/dev/zero", "abspath"] = "/dev/zero"
    validated = validate_images(df, [SUBTYPE])
    assert _codes(validated) == {
        "L1/good.png": "",
        "L1/pipe.png": "not_a_regular_file",
        "L1/folder.png": "not_a_regular_file",
        "L1/dangling.png": "broken_link",
        "L1/loop.png": "broken_link",
        "/dev/zero": "not_a_regular_file",
    }
    reasons = dict(zip(validated["path"], validated["reason"]))
    assert "is a FIFO" in reasons["L1/pipe.png"] and "is a character device" in reasons["/dev/zero"]
    assert "is a folder" in reasons["L1/folder.png"] and "symlink loop" in reasons["L1/loop.png"]
    assert "nowhere.png" in reasons["L1/dangling.png"]


def test_class_folder_dataset_lists_broken_symlinks_with_a_reason(tmp_path, no_hang):
    _save(_noise_image(0), tmp_path / "L1" / "good.png")
    (tmp_path / "L1" / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "L1" / "loop.png").symlink_to(tmp_path / "L1" / "loop.png")
    (tmp_path / "L1" / "deeper").mkdir()  # a real sub-folder stays ignored
    validated = validate_images(read_dataset(tmp_path), [SUBTYPE])
    assert _codes(validated) == {"L1/dangling.png": "broken_link", "L1/good.png": "", "L1/loop.png": "broken_link"}


def test_manifest_rows_outside_its_folder_need_the_config_switch(tmp_path):
    from leukotype.stages import run_validation

    data = tmp_path / "data"
    _save(_noise_image(1), tmp_path / "elsewhere" / "far.png")
    elsewhere = _save(_noise_image(2), tmp_path / "elsewhere" / "absolute.png")
    for i in range(2):
        _save(_noise_image(10 + i), data / "L1" / f"c{i}.png")
    manifest = data / "manifest.csv"
    manifest.write_text(
        f"path,label\nL1/c0.png,L1\n{data / 'L1' / 'c1.png'},L1\n../elsewhere/far.png,L1\n{elsewhere},L1\n"
    )
    tasks = [{"name": "subtype", "column": "label", "classes": ["L1"]}]
    cfg = {"min_side": 32, "max_pixels": 10**7, "min_images_per_class": 1, "max_aspect_ratio": 5}
    table = run_validation(manifest, tasks, {**cfg, "allow_outside_paths": False}, tmp_path / "v.tsv", tmp_path / "v.json")
    codes = _codes(table)
    assert codes["../elsewhere/far.png"] == "outside_dataset" and codes[str(elsewhere)] == "outside_dataset"
    assert codes["L1/c0.png"] == codes[str(data / "L1" / "c1.png")] == ""  # absolute but inside
    assert "validation.allow_outside_paths: true" in table.set_index("path").at[str(elsewhere), "reason"]
    table = run_validation(manifest, tasks, {**cfg, "allow_outside_paths": True}, tmp_path / "v.tsv", tmp_path / "v.json")
    assert (table["status"] == "ok").all()


# ------------------------------------------------------------------ images that are not cells


def test_extreme_aspect_ratio_is_rejected_with_a_reason(tmp_path):
    _save(_noise_image(0, size=(1200, 40)), tmp_path / "L1" / "strip.png")
    _save(_noise_image(1, size=(60, 40)), tmp_path / "L1" / "cell.png")
    df = _table(tmp_path, [("L1/strip.png", "L1"), ("L1/cell.png", "L1")])
    validated = validate_images(df, [SUBTYPE], max_aspect_ratio=5)
    reasons = dict(zip(validated["path"], validated["reason"]))
    assert reasons["L1/cell.png"] == ""
    assert reasons["L1/strip.png"].startswith("extreme_aspect_ratio: 1200x40 is 30.0:1 > 5:1")
    assert "validation.max_aspect_ratio" in reasons["L1/strip.png"]


def test_exif_orientation_is_applied_on_decoding_and_recorded(tmp_path):
    from PIL import ImageOps

    stored = _noise_image(3, size=(60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    _save(stored, tmp_path / "L1" / "turned.jpg", exif=exif.tobytes(), quality=95)
    _save(stored, tmp_path / "L1" / "plain.jpg", quality=95)
    decoded = load_rgb(tmp_path / "L1" / "turned.jpg")
    assert decoded.size == (40, 60)  # upright: the camera's orientation applied
    with Image.open(tmp_path / "L1" / "turned.jpg") as raw:
        expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decoded), expected)
    df = _table(tmp_path, [("L1/turned.jpg", "L1"), ("L1/plain.jpg", "L1")])
    validated = validate_images(df, [SUBTYPE])
    assert dict(zip(validated["path"], validated["orientation"])) == {"L1/plain.jpg": 1, "L1/turned.jpg": 6}
    write_tsv(validated, tmp_path / "validated.tsv")
    assert read_tsv(tmp_path / "validated.tsv")["orientation"].astype(int).tolist() == [1, 6]

"""N distinct images derived from the real PBC images, for workflow runs at dataset size.

The shared PBC subset has 800 real images (8 classes x 100); the scaling targets are about
8,000 and 17,092 (the full PBC size). This script writes ``N`` distinct JPEGs derived from the
real ones into a folder OUTSIDE the repository, with a manifest the workflow reads
(``path,label,group``). Each derived image's ``group`` is its source image, so the
workflow's group-aware split (``leukotype.split``) keeps every source image, and all images
derived from it, on one side of the hold-out split and of the SVM's inner folds: no source
image is on both sides.

Derivation of image ``i`` (generator ``numpy.random.default_rng([seed, i])``, so every image
is reproducible on its own): source = the ``i``-th pick of a seeded round robin over the
class's real images; then a random resized crop (75-100 % of the area, aspect 0.9-1.1)
resized back to the source's size (360x363 or 366x369, so the backbones' resizing work is
the real one), a translation of up to 12 px (border filled with the image's median border
colour), a reflection (none, horizontal, vertical or both), mild colour changes (brightness,
contrast, saturation each x0.92-1.08) and a JPEG quality of 70-90 (the originals: 75). The
md5 of every written file is checked to be unique, also against the sources (the workflow
would merge identical files into one group).

Class counts: ``balanced`` (N / 8 per class; the issue's 8,000 = 1,000 per class) or
``pbc`` (proportional to the full PBC data set's 17,092 images, Acevedo et al. 2020).

    python bench/derived_images.py --n 8000          # -> $TMPDIR/leukotype_bench/derived_8000
    python bench/derived_images.py --n 17092 --class-counts pbc
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

#: Images per class of the full PBC data set (Acevedo et al. 2020, 17,092 in all).
PBC_CLASS_COUNTS = {
    "basophil": 1218, "eosinophil": 3117, "erythroblast": 1551, "ig": 2895,
    "lymphocyte": 1214, "monocyte": 1420, "neutrophil": 3329, "platelet": 2348,
}
CROP_AREA = (0.75, 1.0)
CROP_ASPECT = (0.9, 1.1)
MAX_SHIFT_PX = 12
COLOUR_RANGE = (0.92, 1.08)
JPEG_QUALITY = (70, 90)  # the PBC originals are quality 75


def class_counts(classes: list[str], n: int, mode: str) -> dict[str, int]:
    """Derived images per class summing to ``n`` (largest-remainder rounding)."""
    if mode == "balanced":
        weights = {c: 1.0 for c in classes}
    elif mode == "pbc":
        missing = sorted(set(classes) - set(PBC_CLASS_COUNTS))
        if missing:
            raise SystemExit(f"--class-counts pbc: classes {missing} are not PBC classes")
        weights = {c: float(PBC_CLASS_COUNTS[c]) for c in classes}
    else:
        raise SystemExit(f"unknown --class-counts {mode!r}")
    total = sum(weights.values())
    exact = {c: n * w / total for c, w in weights.items()}
    counts = {c: int(math.floor(v)) for c, v in exact.items()}
    for c in sorted(classes, key=lambda c: counts[c] - exact[c])[: n - sum(counts.values())]:
        counts[c] += 1
    return counts


def plan(sources: pd.DataFrame, n: int, mode: str = "balanced", seed: int = 0) -> pd.DataFrame:
    """``index, source, label, path`` of the ``n`` images to derive (``sources``: the real
    images' ``path, label``): each class's sources are used in a seeded round robin, so every
    real image is the source of n_class / n_sources images (within one)."""
    rng = np.random.default_rng(seed)
    rows = []
    counts = class_counts(sorted(sources["label"].unique()), n, mode)
    for label, count in counts.items():
        members = sorted(sources.loc[sources["label"] == label, "path"])
        order = [members[j] for j in rng.permutation(len(members))]
        for k in range(count):
            source = order[k % len(order)]
            stem = Path(source).stem
            rows.append({"source": source, "label": label,
                         "path": f"{label}/{stem}_d{k // len(order):03d}.jpg"})
    table = pd.DataFrame(rows)
    table.insert(0, "index", np.arange(len(table)))
    return table


def derive(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """One derived image (same size as ``image``) and the JPEG quality to save it with."""
    image = image.convert("RGB")
    width, height = image.size
    area = rng.uniform(*CROP_AREA)
    aspect = rng.uniform(*CROP_ASPECT)
    crop_w = min(width, int(round(width * math.sqrt(area * aspect))))
    crop_h = min(height, int(round(height * math.sqrt(area / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    out = image.resize((width, height), Image.Resampling.BICUBIC,
                       box=(left, top, left + crop_w, top + crop_h))
    pixels = np.asarray(out)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    dx, dy = (int(v) for v in rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1, size=2))
    out = out.transform((width, height), Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy),
                        resample=Image.Resampling.NEAREST, fillcolor=fill)
    reflection = int(rng.integers(0, 4))
    if reflection & 1:
        out = ImageOps.mirror(out)
    if reflection & 2:
        out = ImageOps.flip(out)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(float(rng.uniform(*COLOUR_RANGE)))
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    return out, quality


def _write_one(job: tuple[int, str, str, int]) -> tuple[int, str, int]:
    """Derive image ``index`` from ``source`` into ``target``; returns (index, md5, bytes)."""
    index, source, target, seed = job
    with Image.open(source) as image:
        derived, quality = derive(image, np.random.default_rng([seed, index]))
    buffer = io.BytesIO()
    derived.save(buffer, format="JPEG", quality=quality)
    data = buffer.getvalue()
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(target).with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return index, hashlib.md5(data).hexdigest(), len(data)


def write_derived(data: Path, n: int, out: Path, mode: str = "balanced", seed: int = 0,
                  workers: int = 2) -> Path:
    """Write the ``n`` derived images and ``out/manifest.csv`` (``path,label,group``, group =
    the source image); returns the manifest. Reuses a complete folder made with the same
    settings (``out/derived.json``)."""
    from leukotype.io import atomic_path

    sources = common.pbc_table(Path(data))
    if sources is None:
        raise SystemExit(f"{data} has no manifest.csv: derived images need the real images")
    out = Path(out)
    settings = {"n": n, "class_counts": mode, "seed": seed, "n_sources": len(sources),
                "data": Path(data).name}
    manifest = out / "manifest.csv"
    meta = out / "derived.json"
    if manifest.is_file() and meta.is_file() and json.loads(meta.read_text()) == settings:
        return manifest
    table = plan(sources, n, mode, seed)
    abspath = dict(zip(sources["path"], sources["abspath"]))
    jobs = [(int(r.index), abspath[r.source], str(out / r.path), seed)
            for r in table.itertuples()]
    out.mkdir(parents=True, exist_ok=True)
    digests: dict[int, tuple[str, int]] = {}
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for index, digest, size in pool.map(_write_one, jobs, chunksize=64):
                digests[index] = (digest, size)
    else:
        for job in jobs:
            index, digest, size = _write_one(job)
            digests[index] = (digest, size)
    table["md5"] = [digests[i][0] for i in table["index"]]
    table["bytes"] = [digests[i][1] for i in table["index"]]
    clashes = table["md5"].duplicated().sum() + table["md5"].isin(
        _source_md5s(sources)).sum()
    if clashes:
        raise SystemExit(f"{clashes} derived images are not distinct (md5); change --seed")
    table["group"] = table["source"]
    with atomic_path(manifest) as tmp:
        table[["path", "label", "group", "md5", "bytes"]].to_csv(tmp, index=False)
    meta.write_text(json.dumps(settings, indent=1))
    return manifest


def _source_md5s(sources: pd.DataFrame) -> set[str]:
    return {hashlib.md5(Path(p).read_bytes()).hexdigest() for p in sources["abspath"]}


def default_out(n: int) -> Path:
    """``$TMPDIR/leukotype_bench/derived_<n>`` (outside the repository: never commit images)."""
    base = Path(os.environ.get("TMPDIR") or "/tmp")
    return base / "leukotype_bench" / f"derived_{n}"


def summary(manifest: Path) -> Mapping[str, object]:
    table = pd.read_csv(manifest, dtype=str)
    return {"n_images": len(table), "n_sources": table["group"].nunique(),
            "per_class": table["label"].value_counts().sort_index().to_dict()}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8000, help="derived images to write")
    parser.add_argument("--data", type=Path, default=common.DEFAULT_DATA,
                        help="the real images (class folders with manifest.csv)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the images (default $TMPDIR/leukotype_bench/derived_N)")
    parser.add_argument("--class-counts", choices=["balanced", "pbc"], default="balanced")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    out = args.out or default_out(args.n)
    if common.REPO_ROOT.resolve() in [out.resolve(), *out.resolve().parents]:
        raise SystemExit(f"{out} is inside the repository: derived images must not be committed")
    manifest = write_derived(args.data, args.n, out, args.class_counts, args.seed, args.workers)
    print(f"wrote {manifest}: {dict(summary(manifest))}")
    return manifest


if __name__ == "__main__":
    main()

"""How much fine detail each lab's cells carry, measured without labels: the number behind the
``resample`` step's side. For every image of PBC's and JTSC's shared white-cell classes: the
cell-centred crop (margin 0.15, the bench recipes' box from the cell mask), its
:func:`leukotype.preprocessing.detail_level`, and the same after :func:`limit_detail` at each
side. One row per set and side in ``bench/results/external_detail.csv`` (mean, median crop side,
cells), with the machine.

    .venv/bin/python bench/external_detail.py          # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR, machine_info  # noqa: E402
from external_recipes import EXTERNAL_CLASSES  # noqa: E402

from leukotype import preprocessing as pp  # noqa: E402
from leukotype.io import atomic_path  # noqa: E402

SIDES = (None, 96, 64, 48, 32, 24)


def crops(root: Path) -> tuple[list[np.ndarray], list[int]]:
    table = pd.read_csv(root / "manifest.csv")
    images, sides = [], []
    for path in table.loc[table["label"].isin(EXTERNAL_CLASSES), "path"]:
        rgb = np.asarray(Image.open(root / path).convert("RGB"))
        mask, _ = pp.cell_mask(rgb)
        if mask is None:
            continue  # no cell: no crop to measure (none on these two sets)
        box = pp.box_from_mask(mask, 0.15)
        images.append(np.asarray(pp.crop_box(Image.fromarray(rgb), box.left, box.top, box.side)))
        sides.append(box.side)
    return images, sides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "external_detail.csv")
    args = parser.parse_args(argv)
    rows = []
    for name in ("pbc", "jtsc"):
        images, sides = crops(args.data / name)
        for side in SIDES:
            level = [pp.detail_level(img if side is None else pp.limit_detail(img, side)) for img in images]
            rows.append({"set": name, "side": side or "native", "detail_mean": round(float(np.mean(level)), 4),
                         "detail_sd": round(float(np.std(level)), 4), "crop_side_median": float(np.median(sides)),
                         "cells": len(images), **machine_info()})
            print(f"{name:5s} side {str(side or 'native'):6s} detail {rows[-1]['detail_mean']:.4f}", flush=True)
    with atomic_path(args.out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does the cell locator keep a nucleus's lobes? Segmentation 1 (one nucleus region) against 2 (lobes joined).

The cell locator (:func:`leukotype.preprocessing._segment_cell`) takes the hematoxylin region
nearest the centre as the nucleus and grows the cell within 1.5 nucleus radii of it. A
threshold often splits a neutrophil's or eosinophil's nucleus into lobes; before segmentation
version 2 only one lobe was the nucleus, so the cell (and its crop box) could lose the others.
For every image of PBC's five white-cell classes and of JTSC's four shared ones, this script
segments the cell both ways (``join_lobes`` False / True) and writes, per lab and class:

- ``lobe_cut``: images in which a hematoxylin region of at least 10 % of the nucleus region's
  area, within one nucleus radius of it, lies more than 20 % outside the cell mask (a lobe the
  cell lost), for each version;
- ``cell_area_ratio_median``: the cell mask's area with version 2 over version 1;
- ``box_shift_max`` / ``boxes_moved``: how far the crop box's centre moves (in cell sizes of
  version 2) and in how many images by more than 5 % of the cell size.

    .venv/bin/python bench/cell_lobes.py              # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import external_recipes as er  # noqa: E402
from common import REPO_ROOT, RESULTS_DIR, machine_info  # noqa: E402

from leukotype import preprocessing as pp  # noqa: E402
from leukotype.images import load_rgb  # noqa: E402
from leukotype.io import atomic_path  # noqa: E402


def lobes_cut(rgb: np.ndarray, cell: np.ndarray) -> int:
    """Regions of the nucleus (see the module doc) that lie more than 20 % outside ``cell``."""
    from scipy import ndimage

    small, _ = pp._working_copy(rgb)  # the locator's working copy, on which ``cell`` lies
    labels, areas = pp._hematoxylin_regions(small)
    inside = [int(i) for i in np.unique(labels[cell]) if i]
    if not inside:
        return 0
    main = max(inside, key=lambda i: areas[i - 1])
    distance = ndimage.distance_transform_edt(labels != main)
    radius = math.sqrt(areas[main - 1] / math.pi)
    cut = 0
    for label in range(1, len(areas) + 1):
        region = labels == label
        if label == main or areas[label - 1] < 0.1 * areas[main - 1] or distance[region].min() > radius:
            continue
        cut += int(1.0 - cell[region].mean() > 0.2)
    return cut


def compare(rgb: np.ndarray) -> dict[str, Any] | None:
    old, scale, _ = pp._segment_cell(rgb, join_lobes=False)
    new, _, _ = pp._segment_cell(rgb, join_lobes=True)
    if old is None or new is None:
        return None
    box_old, box_new = pp.box_from_mask(old, 0.15, scale), pp.box_from_mask(new, 0.15, scale)
    shift = math.dist(box_old.centre, box_new.centre) / max(box_new.cell_size, 1)
    return {"lobe_cut_v1": int(lobes_cut(rgb, old) > 0), "lobe_cut_v2": int(lobes_cut(rgb, new) > 0),
            "cell_area_ratio": float(new.sum() / old.sum()), "box_shift": shift}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "cell_lobes.csv")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for lab, folder, classes in (("pbc", "pbc", er.CLASSES), ("jtsc", "jtsc", er.EXTERNAL_CLASSES)):
        table = er.read_set(args.data / folder, classes)
        per_image = [compare(np.asarray(load_rgb(p))) for p in table["abspath"]]
        frame = pd.DataFrame([r for r in per_image if r], index=[i for i, r in enumerate(per_image) if r])
        frame["label"] = table["label"].iloc[frame.index].to_numpy()
        for label, group in frame.groupby("label"):
            rows.append({"lab": lab, "label": label, "images": int((table["label"] == label).sum()),
                         "cells_found": len(group), "lobe_cut_v1": int(group["lobe_cut_v1"].sum()),
                         "lobe_cut_v2": int(group["lobe_cut_v2"].sum()),
                         "cell_area_ratio_median": round(float(group["cell_area_ratio"].median()), 4),
                         "boxes_moved": int((group["box_shift"] > 0.05).sum()),
                         "box_shift_max": round(float(group["box_shift"].max()), 4)})
            print(rows[-1], flush=True)
    result = pd.DataFrame(rows).assign(segmentation_version=pp.SEGMENTATION_VERSION, **machine_info())
    with atomic_path(args.out) as tmp:
        result.to_csv(tmp, index=False)
    print(f"written {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

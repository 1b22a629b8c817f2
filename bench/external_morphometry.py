"""Does what a hematologist measures hold across labs? Cell morphometry -> classifier, PBC -> JTSC.

A diagnostic for issue 10's "what limits it", never a recipe. The CNN features of
``bench/external_recipes.py`` lose 30-60 points from PBC to JTSC. If the cue that fails to
transfer were the network's (ImageNet texture statistics), measurements a hematologist reads
off the cell should hold better: the nucleus's share of the cell, its lobes and shape, the
cytoplasm's colour relative to the nucleus of the same image, and granularity. This script
measures them on each cell (the workflow's own segmentation,
:func:`leukotype.preprocessing.cell_mask`; the nucleus is the hematoxylin channel above its
Otsu threshold inside the cell), with the same images, split and classes as
``external_recipes.py``.

Feature sets (rows ``features``): ``shape`` (14 size-free shape measurements of nucleus and
cell), ``shape_colour`` (+ 4 colour measurements in optical density, each relative to the same
image's nucleus, so a lab's stain strength cancels), ``all`` (+ 6 texture measurements: grey
variation and difference-of-Gaussians energy in cytoplasm and nucleus). Every cell is cropped
to its bounding square and resized to 128 px first, so size is measured relative to the cell.

Experiments per feature set and classifier (``svm``: the workflow's grouped grid search over
linear/rbf and C, with standardised features; ``forest``: 500 trees, seed 0):
- ``pbc_to_jtsc``: trained on the PBC training part; internal accuracy on PBC's test part (five
  classes) and external accuracy on JTSC's four shared classes (the model answers over five).
- ``jtsc_cv``: JTSC alone, 5-fold grouped stratified cross-validation (seed 0): how much the same
  measurements tell JTSC's classes apart when JTSC's own labels train.

A second table (``--features-out``) gives each feature's median per class in each lab: it shows
which measurements move between the labs.

    .venv/bin/python bench/external_morphometry.py        # ~2 min on 2 cores (masks cached)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import StratifiedGroupKFold

sys.path.insert(0, str(Path(__file__).resolve().parent))
import external_adaptation as ea  # noqa: E402
import external_recipes as er  # noqa: E402
from common import RESULTS_DIR, machine_info  # noqa: E402

from leukotype import preprocessing as pp  # noqa: E402
from leukotype.io import atomic_path  # noqa: E402
from leukotype.split import merge_duplicate_groups  # noqa: E402

SIDE = 128  # every cell's bounding square is resized to this before it is measured
SHAPE = ("nc_ratio", "n_lobes", "largest_lobe_share", "nucleus_solidity", "nucleus_eccentricity",
         "nucleus_extent", "nucleus_circularity", "lobes_solidity", "nucleus_max_thickness",
         "nucleus_mean_thickness", "nucleus_skeleton", "cell_solidity", "cell_eccentricity",
         "nucleus_offset")
COLOUR = ("cytoplasm_chroma_r", "cytoplasm_chroma_g", "cytoplasm_chroma_b", "cytoplasm_density")
TEXTURE = ("cytoplasm_cv", "cytoplasm_dog1", "cytoplasm_dog2", "nucleus_cv", "nucleus_dog1", "nucleus_dog2")
FEATURE_SETS = {"shape": SHAPE, "shape_colour": SHAPE + COLOUR, "all": SHAPE + COLOUR + TEXTURE}


def _square_of_cell(rgb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cell's bounding square of image and mask, resized to SIDE x SIDE."""
    box = pp.box_from_mask(mask, margin=0.0)
    image = pp.crop_box(Image.fromarray(rgb), box.left, box.top, box.side).resize((SIDE, SIDE), Image.BILINEAR)
    cell = pp.crop_mask(mask, box.left, box.top, box.side)
    cell = np.asarray(Image.fromarray(cell.astype(np.uint8) * 255).resize((SIDE, SIDE), Image.NEAREST)) > 127
    return np.asarray(image), cell


def _region_texture(grey: np.ndarray, region: np.ndarray, prefix: str) -> dict[str, float]:
    from skimage.filters import gaussian

    if region.sum() <= 10:
        return {f"{prefix}_cv": 0.0, f"{prefix}_dog1": 0.0, f"{prefix}_dog2": 0.0}
    values = grey[region]
    mean = values.mean() + 1e-3
    out = {f"{prefix}_cv": float(values.std() / mean)}
    for name, sigma in (("dog1", 1.0), ("dog2", 2.0)):
        dog = gaussian(grey, sigma / 2) - gaussian(grey, sigma)
        out[f"{prefix}_{name}"] = float(np.abs(dog[region]).mean() / mean)
    return out


def morphometry(rgb: np.ndarray, mask: np.ndarray | None) -> dict[str, float] | None:
    """The cell's measurements (names in FEATURE_SETS), or None where no cell was found."""
    from scipy import ndimage
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label, regionprops
    from skimage.morphology import skeletonize

    if mask is None or mask.sum() < 50:
        return None
    image, cell = _square_of_cell(rgb, mask)
    od = pp._optical_density(image)
    hema = gaussian(rgb2hed(image)[..., 0], 1.0)
    nucleus = ndimage.binary_opening((hema > threshold_otsu(hema[cell])) & cell, iterations=1)
    cytoplasm = cell & ~nucleus
    area, nucleus_area = float(cell.sum()), float(max(nucleus.sum(), 1))
    lobes = [p for p in sorted(regionprops(label(nucleus)), key=lambda p: -p.area) if p.area > 0.05 * nucleus_area]
    f: dict[str, float] = {"nc_ratio": nucleus_area / area, "n_lobes": float(len(lobes)),
                           "largest_lobe_share": lobes[0].area / nucleus_area if lobes else 0.0}
    if lobes:
        p = lobes[0]
        f.update(nucleus_solidity=p.solidity, nucleus_eccentricity=p.eccentricity, nucleus_extent=p.extent,
                 nucleus_circularity=4 * np.pi * p.area / max(p.perimeter, 1.0) ** 2)
    else:
        f.update(nucleus_solidity=0.0, nucleus_eccentricity=0.0, nucleus_extent=0.0, nucleus_circularity=0.0)
    whole = regionprops(nucleus.astype(int))
    f["lobes_solidity"] = whole[0].solidity if whole else 0.0  # all lobes in one convex hull
    distance = ndimage.distance_transform_edt(nucleus)
    f["nucleus_max_thickness"] = distance.max() / np.sqrt(nucleus_area)
    f["nucleus_mean_thickness"] = distance[nucleus].mean() / np.sqrt(nucleus_area) if nucleus.any() else 0.0
    f["nucleus_skeleton"] = skeletonize(nucleus).sum() / np.sqrt(nucleus_area)
    outline = regionprops(cell.astype(int))[0]
    f["cell_solidity"], f["cell_eccentricity"] = outline.solidity, outline.eccentricity
    centre_n = np.array(ndimage.center_of_mass(nucleus)) if nucleus.any() else np.array([SIDE / 2] * 2)
    f["nucleus_offset"] = float(np.linalg.norm(centre_n - np.array(ndimage.center_of_mass(cell))) / np.sqrt(area))
    # colour in optical density, relative to the same image's nucleus: a lab's stain strength cancels
    od_n = od[nucleus].mean(0) + 1e-3 if nucleus.any() else np.ones(3)
    od_c = od[cytoplasm].mean(0) + 1e-3 if cytoplasm.any() else np.full(3, 1e-3)
    for i, channel in enumerate("rgb"):
        f[f"cytoplasm_chroma_{channel}"] = od_c[i] / od_c.sum() - od_n[i] / od_n.sum()
    f["cytoplasm_density"] = od_c.sum() / od_n.sum()
    grey = od.sum(axis=2)
    f.update(_region_texture(grey, cytoplasm, "cytoplasm"))
    f.update(_region_texture(grey, nucleus, "nucleus"))
    return {k: float(v) for k, v in f.items()}


def measure(images: list[np.ndarray], masks: list[np.ndarray | None]) -> pd.DataFrame:
    """One row per image; a cell not found gives NaN (then 0: such an image still gets an answer)."""
    names = FEATURE_SETS["all"]
    rows = [morphometry(img, mask) or dict.fromkeys(names, np.nan) for img, mask in zip(images, masks)]
    return pd.DataFrame(rows, columns=list(names))


def classify(kind: str, X_train: np.ndarray, y_train: np.ndarray, g_train: np.ndarray) -> tuple[Any, str]:
    if kind == "svm":
        return er.fit_search_svm(X_train, y_train, g_train)  # standardises, then the grid search
    return RandomForestClassifier(n_estimators=500, random_state=0, n_jobs=1).fit(X_train, y_train), "500 trees"


def main(argv: list[str] | None = None) -> int:
    args, names = er.parse_choices(
        __doc__, argv, "external_morphometry.csv", "features", list(FEATURE_SETS),
        extra=[("--features-out", {"type": Path, "default": RESULTS_DIR / "external_morphometry_features.csv"})])
    start = time.perf_counter()
    data = er.load_data(args.data, args.cache)
    pbc, ext = data["pbc"], data["ext"]
    measured_pbc, measured_ext = measure(data["pbc_images"], data["pbc_masks"]), measure(data["ext_images"], data["ext_masks"])
    not_found = {"pbc": int(measured_pbc.isna().any(axis=1).sum()), "jtsc": int(measured_ext.isna().any(axis=1).sum())}
    y_pbc, y_ext = pbc["label"].to_numpy(), ext["label"].to_numpy()
    g_ext = np.asarray([f"ext:{g}" for g in merge_duplicate_groups(ext["image_id"].tolist(), ext["md5"].tolist())])
    tr, te = ~data["is_test"], data["is_test"]
    info = machine_info()
    rows: list[dict[str, Any]] = []
    for feature_set in names:
        columns = list(FEATURE_SETS[feature_set])
        X_pbc, X_ext = measured_pbc[columns].fillna(0.0).to_numpy(), measured_ext[columns].fillna(0.0).to_numpy()
        for kind in ("svm", "forest"):
            model, setting = classify(kind, X_pbc[tr], y_pbc[tr], data["groups"][tr])
            internal = float(np.mean(model.predict(X_pbc[te]) == y_pbc[te]))
            p_ext = model.predict(X_ext).astype(str)
            rows.append({"experiment": "pbc_to_jtsc", "features": feature_set, "n_features": len(columns),
                         "classifier": kind, "setting": setting, "internal_accuracy": internal,
                         "n_internal": int(te.sum()), "n_test": len(y_ext), **ea.scores(y_ext, p_ext, args.n_boot),
                         "predicted_neutrophil_share": float(np.mean(p_ext == "neutrophil"))})
            pred = np.empty(len(y_ext), dtype=object)
            folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0)
            for train, test in folds.split(X_ext, y_ext, g_ext):
                pred[test] = classify(kind, X_ext[train], y_ext[train], g_ext[train])[0].predict(X_ext[test])
            rows.append({"experiment": "jtsc_cv", "features": feature_set, "n_features": len(columns),
                         "classifier": kind, "setting": "5-fold grouped stratified, seed 0", "n_test": len(y_ext),
                         **ea.scores(y_ext, pred.astype(str), args.n_boot)})
            for r in rows[-2:]:
                print(f"{feature_set:13s} {kind:6s} {r['experiment']:12s} internal {r.get('internal_accuracy', float('nan')):.3f} "
                      f"JTSC {r['accuracy']:.3f} ({r['accuracy_ci_low']:.3f}-{r['accuracy_ci_high']:.3f}) "
                      f"bal {r['balanced_accuracy']:.3f}", flush=True)
    table = pd.DataFrame([{**r, "cells_not_found": str(not_found), **info} for r in rows])
    medians = pd.concat([measured_pbc.assign(lab="pbc", label=y_pbc), measured_ext.assign(lab="jtsc", label=y_ext)])
    medians = medians.groupby(["lab", "label"]).median().round(4).reset_index().assign(**info)
    for frame, path in ((table, args.out), (medians, args.features_out)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    print(f"written {args.out} and {args.features_out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A bundle trained on real PBC cells, applied to images of another kind (../shared/data).

The workflow's stages run in-process on 40 PBC images (EfficientNet-Lite0 ImageNet features,
linear SVM), the run is exported, and `leukotype predict` is given PBC test cells and B-ALL
peripheral-blood fields (several cells per image, another lab): the out-of-distribution flag
must rise for the latter.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from leukotype import paths
from leukotype.config import Run, validate_config
from leukotype.io import read_tsv

pytestmark = [pytest.mark.shared_data]

CLASSES = ["eosinophil", "lymphocyte", "monocyte", "neutrophil", "platelet"]


@pytest.fixture(scope="module")
def pbc_bundle(tmp_path_factory, shared_data) -> tuple[Path, list[str]]:
    from leukotype import stages
    from leukotype.export import export_run

    tmp = tmp_path_factory.mktemp("pbc_bundle")
    manifest = pd.read_csv(shared_data / "pbc" / "manifest.csv")
    chosen = manifest[manifest["label"].isin(CLASSES)].groupby("label").head(8)
    rows = pd.DataFrame({"path": [str(shared_data / "pbc" / p) for p in chosen["path"]], "label": chosen["label"]})
    rows.to_csv(tmp / "manifest.csv", index=False)
    results = tmp / "results"
    cfg = validate_config(
        {
            "results": str(results),
            "dataset": {"source": str(tmp / "manifest.csv"), "name": "PBC subset"},
            # the manifest names the shared images where they lie, outside its own folder
            "validation": {"allow_outside_paths": True},
            "tasks": [{"name": "cell_type", "column": "label", "classes": CLASSES}],
            "split": {"method": "holdout", "test_size": 0.25, "seed": 0},
            "augmentation": {"rotations": []},
            "models": [{"backbone": "efficientnet_lite0", "weights": "imagenet", "strategies": ["features_svm"]}],
            "svm": {"C": [1], "kernel": ["linear"], "cv_folds": 2},
            "features": {"batch_size": 16, "num_workers": 0},
            "evaluation": {"n_bootstrap": 50},
        }
    )
    task = cfg["tasks"][0]
    data = results / "data"
    stages.run_validation(tmp / "manifest.csv", cfg["tasks"], cfg["validation"], data / "validated.tsv", data / "validation.json")
    stages.run_split(data / "validated.tsv", task, cfg["split"], data / "splits/cell_type.tsv")
    stages.run_augment(data / "splits/cell_type.tsv", cfg["augmentation"], data / "samples/cell_type.tsv")
    features = Path(paths.features_dir(str(results), "efficientnet_lite0"))
    stages.run_extract(data / "validated.tsv", "efficientnet_lite0", ["pool"], "imagenet", None, None,
                       cfg["augmentation"], cfg["features"], features, threads=2)
    run = Run("cell_type", "features_svm", "efficientnet_lite0", "pool", "holdout")
    run_dir = results / run.path
    stages.run_svm(data / "samples/cell_type.tsv", task, "holdout", [features], "pool", cfg["svm"],
                   run_dir / paths.SVM_MODEL, run_dir / paths.PREDICTIONS, run_dir / paths.CV_RESULTS)
    stages.run_evaluate(run_dir / paths.PREDICTIONS, data / "samples/cell_type.tsv", task,
                        {**run.__dict__, "config": cfg}, cfg["evaluation"], run_dir / paths.METRICS,
                        run_dir / paths.CONFUSION, run_dir / paths.CONFUSION_PNG)
    bundle = export_run(results, run, tmp / "bundle", config=cfg)
    samples = read_tsv(data / "samples/cell_type.tsv")
    validated = read_tsv(data / "validated.tsv")
    test_ids = samples[samples["part"] == "test"]["image_id"]
    test_paths = validated[validated["image_id"].isin(test_ids)]["abspath"].tolist()
    return bundle, test_paths


def test_ood_flag_rises_on_images_of_another_kind(pbc_bundle, shared_data, tmp_path):
    from leukotype.cli import main

    bundle, pbc_test = pbc_bundle
    fields = sorted((shared_data / "all_subtypes").glob("*/*.jpg"))[::40][:10]  # every subtype
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", str(bundle), *pbc_test, *map(str, fields), "--out", str(out), "--device", "cpu"]) == 0
    table = pd.read_csv(out)
    assert (table["status"] == "ok").all() and len(table) == len(pbc_test) + len(fields)
    kind = table["path"].map(lambda p: "ball" if "all_subtypes" in p else "pbc")
    flagged = table.groupby(kind)["ood"].mean()
    distance = table.groupby(kind)["ood_distance"].median()
    assert flagged["ball"] >= 0.8, table
    assert flagged["pbc"] <= 0.3, table
    assert distance["ball"] > 1.5 * distance["pbc"]
    # the PBC test cells are mostly right (the classifier works where it should)
    truth = table.loc[kind == "pbc", "path"].map(lambda p: Path(p).parent.name)
    assert (table.loc[kind == "pbc", "pred"] == truth).mean() >= 0.6

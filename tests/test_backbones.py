"""Backbone registry: dims, one-pass extraction equal to the models' own forward, stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from leukotype.backbones import (
    BACKBONES,
    FeatureExtractor,
    build_model,
    combined_parts,
    get_spec,
    named_stages,
    preprocess,
    stages,
)
from leukotype.errors import LeukotypeError

SINGLE = [name for name, spec in BACKBONES.items() if not spec.is_combined]


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    """Each big model is built at most once per module (vgg16/inception take seconds)."""
    return {}


def _model(built: dict[str, nn.Module], name: str) -> nn.Module:
    if name not in built:
        built[name] = build_model(get_spec(name), None, seed=0)
    return built[name]


def _reference_layers(name: str, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Feature layers captured with hooks during the model's *own* forward()."""
    captured: dict[str, torch.Tensor] = {}

    def keep(layer):
        def hook(module, args, output):
            captured[layer] = output.detach().flatten(1).clone()

        return hook

    if name == "alexnet":  # classifier: Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear
        targets = {"fc6": model.classifier[2], "fc7": model.classifier[5]}
    elif name == "vgg16":  # classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
        targets = {"fc6": model.classifier[1], "fc7": model.classifier[4]}
    elif name in {"inception_v3", "resnet101"}:
        targets = {"pool": model.avgpool}
    elif name.startswith("efficientnet_lite"):
        targets = {"pool": model._avg_pooling}
    else:  # paper_cnn
        targets = {"flatten": model.features}
    handles = [module.register_forward_hook(keep(layer)) for layer, module in targets.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


#: Small inputs for the equivalence checks (full-size forwards are slow on 2 shared cores);
#: every architecture ends in adaptive pooling, inception needs at least 75 px.
SMALL_SIZE = {"inception_v3": 80}


@pytest.mark.parametrize("name", SINGLE)
def test_layers_have_documented_dims_at_input_size(built, name):
    spec = get_spec(name)
    x = torch.randn(
        1, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        features = FeatureExtractor(spec, _model(built, name), list(spec.layers))(x)
    assert {layer: tuple(t.shape) for layer, t in features.items()} == {
        layer: (1, dim) for layer, dim in spec.layers.items()
    }
    assert all(bool(torch.isfinite(t).all()) for t in features.values())


@pytest.mark.parametrize("name", SINGLE)
def test_extractor_and_stages_equal_the_models_own_forward(built, name):
    spec = get_spec(name)
    model = _model(built, name)
    size = SMALL_SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = FeatureExtractor(spec, model, list(spec.layers))(x)
        penultimate = nn.Sequential(*stages(spec, model))(x)
    reference = _reference_layers(name, model, x)
    for layer in spec.layers:
        torch.testing.assert_close(features[layer], reference[layer], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(penultimate, features[spec.penultimate_layer], rtol=0, atol=0)
    assert float(features[spec.penultimate_layer].abs().sum()) > 0
    assert not torch.equal(features[spec.penultimate_layer][0], features[spec.penultimate_layer][1])


@pytest.mark.parametrize("name", SINGLE)
def test_stage_names_cover_layers_and_end_with_penultimate(built, name):
    spec = get_spec(name)
    names = [stage for stage, _ in named_stages(spec, _model(built, name))]
    assert names[-1] == spec.penultimate_layer
    assert set(spec.layers) <= set(names)
    assert spec.default_layer in spec.layers


def test_vgg_fc_stages_and_single_pass(built):
    spec = get_spec("vgg16")
    model = _model(built, "vgg16")
    named = dict(named_stages(spec, model))
    assert list(named) == ["conv", "fc6", "fc7"]
    assert [type(m) for m in named["fc6"]] == [nn.Linear, nn.ReLU]
    assert [type(m) for m in named["fc7"]] == [nn.Dropout, nn.Linear, nn.ReLU]
    # Stages share the model's parameters (fine-tuning a stage trains the model).
    assert named["fc7"][1].weight is model.classifier[3].weight
    only_fc6 = FeatureExtractor(spec, model, ["fc6"])
    assert only_fc6.stage_names == ["conv", "fc6"]  # fc7 is not computed when not asked for


def test_last_stages_are_the_documented_blocks(built):
    resnet = _model(built, "resnet101")
    last = stages(get_spec("resnet101"), resnet)[-1]
    assert last[0] is resnet.layer4[-1] and last[1] is resnet.avgpool
    inception = _model(built, "inception_v3")
    last = stages(get_spec("inception_v3"), inception)[-1]
    assert last[0] is inception.Mixed_7c and last[1] is inception.avgpool
    # torchvision's pretrained InceptionV3 re-normalises ImageNet input (transform_input=True);
    # the aux head is not built.
    assert inception.transform_input is True and inception.AuxLogits is None
    paper = build_model(get_spec("paper_cnn"), None)
    first, second = stages(get_spec("paper_cnn"), paper)
    assert [type(m) for m in first] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    assert type(second[-1]) is nn.Flatten


def test_inception_stem_replicates_torchvision_transform_input(built):
    model = _model(built, "inception_v3")
    stem = stages(get_spec("inception_v3"), model)[0]
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = stem.layers(model._transform_input(x))
        torch.testing.assert_close(stem(x), expected, rtol=0, atol=0)
    # ImageNet-normalised input becomes (x - 0.5) / 0.5: mid-grey 0.5 maps to 0.
    grey = (
        torch.full((1, 3, 1, 1), 0.5) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    ) / (torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    torch.testing.assert_close(
        model._transform_input(grey), torch.zeros(1, 3, 1, 1), atol=1e-6, rtol=0
    )


def test_efficientnet_stages_keep_drop_connect_rates_in_training_mode():
    spec = get_spec("efficientnet_lite0")
    model = build_model(spec, None, seed=0).train()  # a fresh model: training updates BN stats
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        expected = torch.flatten(model._avg_pooling(model.extract_features(x)), 1)
        torch.manual_seed(11)
        actual = nn.Sequential(*stages(spec, model))(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    rates = [r for stage in stages(spec, model)[:-1] for r in stage.rates]
    rates += stages(spec, model)[-1].last_block.rates
    assert rates == pytest.approx([0.2 * i / 16 for i in range(16)])


def test_preprocess_equals_torchvision_reference_transforms():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (363, 360, 3), dtype=np.uint8))
    for name in ("alexnet", "inception_v3", "resnet101"):
        spec = get_spec(name)
        ours = preprocess(spec)(image)
        theirs = spec.weights_enum.transforms()(image)
        assert ours.shape == (3, spec.input_size, spec.input_size)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_preprocess_resizes_shorter_side_and_centre_crops_without_squashing():
    # 400x200 white image with a centred 100x100 black square.
    pixels = np.full((200, 400, 3), 255, dtype=np.uint8)
    pixels[50:150, 150:250] = 0
    spec = get_spec("resnet101")  # resize 256, crop 224
    tensor = preprocess(spec)(Image.fromarray(pixels))
    dark = tensor.mean(0) < 0  # black is far below the mean after normalisation
    rows, cols = torch.nonzero(dark, as_tuple=True)
    height = int(rows.max() - rows.min() + 1)
    width = int(cols.max() - cols.min() + 1)
    assert abs(height - 128) <= 2 and abs(width - 128) <= 2  # 100 * 256/200, still square
    assert (
        abs(float(rows.float().mean()) - 111.5) < 1.5
        and abs(float(cols.float().mean()) - 111.5) < 1.5
    )


def test_efficientnet_uses_tflite_normalisation():
    spec = get_spec("efficientnet_lite0")
    for value in (0, 127, 255):
        image = Image.new("RGB", (240, 260), (value, value, value))
        tensor = preprocess(spec)(image)
        assert tensor.shape == (3, 224, 224)
        torch.testing.assert_close(
            tensor, torch.full_like(tensor, (value - 127) / 128), atol=1e-5, rtol=0
        )


def test_paper_cnn_dim_matches_its_module():
    from leukotype.paper_cnn import paper_cnn_feature_dim

    assert get_spec("paper_cnn").layers == {"flatten": paper_cnn_feature_dim(64)}


def test_build_model_seed_is_reproducible_and_leaves_global_rng_alone():
    spec = get_spec("paper_cnn")
    state = torch.random.get_rng_state()
    a = build_model(spec, None, seed=0)
    b = build_model(spec, None, seed=0)
    c = build_model(spec, None, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    assert not a.training


def test_registry_lookup_errors_and_combined_backbone():
    with pytest.raises(LeukotypeError, match="valid backbones: .*alexnet.*vgg16"):
        get_spec("vgg19")
    assert combined_parts("inception_v3+resnet101") == ["inception_v3", "resnet101"]
    assert combined_parts("resnet101") == []
    combined = get_spec("inception_v3+resnet101")
    assert combined.layers["pool"] == sum(get_spec(p).layers["pool"] for p in combined.parts)
    with pytest.raises(LeukotypeError, match="concatenation of its parts"):
        build_model(combined, None)
    with pytest.raises(LeukotypeError, match="concatenation of its parts"):
        preprocess(combined)
    paper = build_model(get_spec("paper_cnn"), None)
    with pytest.raises(LeukotypeError, match="valid layers: flatten"):
        FeatureExtractor(get_spec("paper_cnn"), paper, ["fc6"])


def test_registry_matches_config_mirror():
    from leukotype.config import BACKBONE_LAYERS

    assert BACKBONE_LAYERS == {name: tuple(spec.layers) for name, spec in BACKBONES.items()}

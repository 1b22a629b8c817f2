"""timm backbones, DinoBloom's checkpoint layout, EfficientNet-Lite1/2, staged weight formats."""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from dinov2_reference import dinov2_forward, random_dinov2_state
from leukotype import catalog
from leukotype.backbones import FeatureExtractor, build_model, get_spec, preprocess, stages
from leukotype.config import validate_config
from leukotype.errors import LeukotypeError
from leukotype.timm_backbones import dinov2_to_timm
from leukotype.weights import load_state_dict, resolve_weights

MINIMAL = {
    "dataset": {"source": "demo"},
    "tasks": [{"name": "subtype", "column": "subtype", "classes": ["L1", "L2"]}],
}


def _image(seed: int, size=(90, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------- DinoBloom


def _published_layout(state: dict[str, torch.Tensor]) -> dict:
    """How DinoBloom's .pth files hold a DINOv2 backbone: {'teacher': {'backbone.<key>': ...,
    'dino_head.<...>': ...}}, as torch.save writes it."""
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher["dino_head.mlp.0.weight"] = torch.zeros(8, state["norm.weight"].shape[0])
    return {"teacher": teacher}


def test_dinobloom_s_loads_a_published_layout_checkpoint_and_matches_the_original_forward(tmp_path):
    spec = get_spec("dinobloom_s")
    assert (spec.input_size, spec.layers, spec.default_layer) == (224, {"pool": 384, "cls": 384}, "cls")
    state = random_dinov2_state(embed_dim=384, depth=12, patch=14, grid=16, seed=3)
    path = tmp_path / "dinobloom-s.pth"
    torch.save(_published_layout(state), path)
    model = build_model(spec, resolve_weights("dinobloom_s", str(path)), seed=0)  # strict load
    # every tensor of the file's backbone is placed, and nothing of the model is left out
    placed = dinov2_to_timm(load_state_dict(path), model)
    assert set(placed) == set(model.state_dict())
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = FeatureExtractor(spec, model, ["cls", "pool"])(x)
        reference = dinov2_forward(state, x, num_heads=6)
    torch.testing.assert_close(ours["cls"], reference["cls"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours["pool"], reference["patch_mean"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("variant", "options", "timm_args"),
    [
        ("registers", {"registers": 4}, {"reg_tokens": 4, "no_embed_class": True}),
        ("swiglu", {"swiglu": True}, {"mlp_ratio": 8.0, "mlp_layer": timm.layers.SwiGLUPacked,
                                      "act_layer": torch.nn.SiLU}),
        ("chunked", {}, {}),
    ],
)
def test_dinov2_layout_variants_convert_exactly(variant, options, timm_args):
    """Registers (ViT-*-reg), SwiGLU MLPs (ViT-g) and chunked blocks of training checkpoints."""
    state = random_dinov2_state(embed_dim=32, depth=3, patch=14, grid=2, seed=5, **options)
    published = {f"teacher.backbone.{k}": v for k, v in state.items()}
    published.update({f"student.backbone.{k}": v + 1 for k, v in state.items()})  # never used
    if variant == "chunked":  # BlockChunk: blocks.<chunk>.<global index>., 2 blocks per chunk
        published = {re.sub(r"\.blocks\.(\d+)\.", lambda m: f".blocks.{int(m[1]) // 2}.{m[1]}.", k): v
                     for k, v in published.items()}
        assert "teacher.backbone.blocks.1.2.norm1.weight" in published
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                              img_size=28, embed_dim=32, depth=3, num_heads=2, **timm_args).eval()
    converted = dinov2_to_timm(published, model)
    missing, unexpected = model.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        tokens = model.forward_features(x)
        reference = dinov2_forward(state, x, num_heads=2)
    torch.testing.assert_close(tokens[:, 0], reference["cls"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, model.num_prefix_tokens:].mean(1), reference["patch_mean"],
                               rtol=1e-5, atol=1e-5)


def test_dinobloom_entries_map_to_timm_dinov2_vits_with_patch_14():
    for size, arch, dim in [("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536)]:
        info = catalog.get(f"dinobloom_{size}")
        assert info.timm_model == f"vit_{arch}_patch14_dinov2" and info.input_size == 224
        assert info.layers == {"pool": dim, "cls": dim} and "Koch" in info.citation
    spec = get_spec("dinobloom_g")  # built on the meta device: shapes only
    assert spec.layers == {"pool": 1536, "cls": 1536}


# ------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("name", ["timm:test_vit", "timm:test_resnet", "dinobloom_b"])
def test_preprocessing_is_the_models_pretrained_config(name):
    spec = get_spec(name)
    info = catalog.get(name)
    with torch.device("meta"):
        model = timm.create_model(info.timm_model, pretrained=False, **dict(info.timm_kwargs))
    pretrained = model.pretrained_cfg
    size = info.input_size or pretrained["input_size"][-1]
    assert spec.input_size == size and spec.resize_size == int(size // pretrained["crop_pct"])
    assert spec.mean == tuple(pretrained["mean"]) and spec.std == tuple(pretrained["std"])
    assert spec.interpolation.value == pretrained["interpolation"]
    args = {"input_size": (3, size, size)} if info.input_size else {}
    reference = create_transform(**resolve_data_config(args, model=model), is_training=False)
    ours = preprocess(spec)
    for seed, shape in [(0, (90, 70)), (1, (200, 240))]:
        image = _image(seed, shape)
        torch.testing.assert_close(ours(image), reference(image), rtol=0, atol=0)


# ------------------------------------------------------------------------------ weights


class _RunsCode:
    """Unpickling this would call ``Path.touch`` on a marker file (arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_bearing_weight_file_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    bad = tmp_path / "weights.pth"
    with open(bad, "wb") as handle:
        pickle.dump({"fc.weight": torch.zeros(2, 2), "payload": _RunsCode(marker)}, handle)
    with pytest.raises(LeukotypeError, match="refused weights file .*unpickle Python objects"):
        load_state_dict(bad)
    assert not marker.exists()
    torch.save({"fc.weight": torch.zeros(2, 2), "note": _RunsCode(marker)}, tmp_path / "obj.pth")
    with pytest.raises(LeukotypeError, match="not a tensors-only state dict"):
        resolve_weights("timm:test_resnet", str(tmp_path / "obj.pth")) and load_state_dict(tmp_path / "obj.pth")
    assert not marker.exists()


def test_safetensors_and_tensor_only_pth_load_into_a_timm_model(tmp_path):
    from safetensors.torch import save_file

    reference = timm.create_model("test_resnet", pretrained=False)  # with its classifier 'fc'
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    spec = get_spec("timm:test_resnet")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.forward_head(reference.eval().forward_features(x), pre_logits=True)
        for name in ("w.safetensors", "w.pth"):
            model = build_model(spec, tmp_path / name)  # strict, the classifier keys skipped
            torch.testing.assert_close(torch.nn.Sequential(*stages(spec, model))(x), expected)


# ------------------------------------------------------------------- stages and policies


def _trainable(backbone: str, policy: str) -> int:
    from leukotype.finetune import build_finetune_model

    model, _ = build_finetune_model(backbone, 3, policy, weights=None, seed=0)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_timm_policies_train_head_last_block_or_all():
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0)
    head = 64 * 3 + 3
    last_block = sum(p.numel() for p in [*vit.blocks[-1].parameters(), *vit.norm.parameters()])
    assert _trainable("timm:test_vit", "head") == head
    assert _trainable("timm:test_vit", "last_block") == head + last_block
    assert _trainable("timm:test_vit", "all") == head + sum(p.numel() for p in vit.parameters())
    resnet = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    head = 96 * 3 + 3
    assert _trainable("timm:test_resnet", "head") == head
    assert _trainable("timm:test_resnet", "last_block") == head + sum(p.numel() for p in resnet.layer4.parameters())


def test_efficientnet_lite1_and_lite2_load_their_packaged_imagenet_weights():
    for k, size in [(1, 240), (2, 260)]:
        name = f"efficientnet_lite{k}"
        spec = get_spec(name)
        assert (spec.input_size, spec.resize_size, spec.layers) == (size, size + 32, {"pool": 1280})
        path = resolve_weights(name, "imagenet")  # sha256 of the packaged file checked
        assert path.name.startswith(f"efficientnet-lite{k}-")
        model = build_model(spec, path)  # strict: every tensor of the file placed
        assert model._fc.weight.shape == (1000, 1280) and float(model._bn0.running_var.std()) > 0
        x = preprocess(spec)(_image(k, (64, 64))).unsqueeze(0)
        with torch.no_grad():
            pooled = FeatureExtractor(spec, model, ["pool"])(x)["pool"]
        assert pooled.shape == (1, 1280) and bool(torch.isfinite(pooled).all())


# ------------------------------------------------------------------------- configuration


def _config(models):
    cfg = copy.deepcopy(MINIMAL)
    cfg["models"] = models
    return cfg


def test_config_lists_families_and_named_entries_on_a_typo():
    with pytest.raises(LeukotypeError) as excinfo:
        validate_config(_config([{"backbone": "dinobloom_x"}]))
    message = str(excinfo.value)
    for expected in ("dinobloom_s", "efficientnet_lite2", "timm:<model name>", "A+B"):
        assert expected in message
    with pytest.raises(LeukotypeError, match=r"timm .* has no model 'test_vitt'; close matches: \['test_vit'"):
        validate_config(_config([{"backbone": "timm:test_vitt", "weights": "none"}]))


def test_config_requires_staged_weights_for_timm_backbones():
    with pytest.raises(LeukotypeError, match="dinobloom_s has no ImageNet weights here; set weights to a staged"):
        validate_config(_config([{"backbone": "dinobloom_s"}]))
    cfg = validate_config(_config([
        {"backbone": "timm:test_vit", "weights": "none", "layers": ["cls", "pool"]},
        {"backbone": "efficientnet_lite1"},
        {"backbone": "timm:test_vit+efficientnet_lite1", "strategies": ["features_svm", "finetune"]},
    ]))
    from leukotype.config import extraction_backbones, weights_setting

    # a part of a combination takes its own entry's weights
    assert weights_setting(cfg, "timm:test_vit") == ("none", None)
    assert weights_setting(cfg, "efficientnet_lite1") == ("imagenet", None)
    assert extraction_backbones(cfg) == {"timm:test_vit": ["cls", "pool"], "efficientnet_lite1": ["pool"]}

"""fetch_weights for timm:<model> (weights: hub) and DinoBloom; the download is mocked (no network)."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from leukotype import bundle, hub_weights, weights
from leukotype.backbones import build_model, get_spec
from leukotype.config import staged_weight_files, staged_weights, validate_config, weight_files
from leukotype.errors import LeukotypeError
from test_timm_backbones import MINIMAL

BACKBONE = "timm:test_vit"


def _published_file(folder, *, pickled=False):
    """What the hub serves for test_vit: timm's state dict with its 1000-class head."""
    torch.manual_seed(3)
    state = timm.create_model("test_vit").state_dict()
    if pickled:
        path = folder / "pytorch_model.bin"
        torch.save({"state_dict": state, "opt": torch.optim.SGD}, path)
        return path, state
    path = folder / "model.safetensors"
    save_file(state, str(path))
    return path, state


def test_fetch_stages_timm_hub_weights_where_extraction_reads_them(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))  # the config's torch_home wins
    calls = []

    def fake_download(source, folder):
        calls.append(source)
        path, _ = _published_file(folder)
        return path, weights.file_sha256(path)

    monkeypatch.setattr(hub_weights, "download", fake_download)
    cfg = validate_config({**copy.deepcopy(MINIMAL), "torch_home": str(home),
                           "models": [{"backbone": BACKBONE, "weights": "hub", "layers": ["cls"]}]})
    assert staged_weights(cfg) == [(BACKBONE, "hub")]
    expected = home / "hub" / "checkpoints" / "timm" / "test_vit.safetensors"
    assert staged_weight_files(cfg) == weight_files(cfg, BACKBONE) == [str(expected)]
    with pytest.raises(LeukotypeError, match="not staged.*fetch_weights"):
        weights.resolve_weights(BACKBONE, "hub", torch_home=cfg["torch_home"])

    staged = weights.stage(BACKBONE, "hub", cfg["torch_home"])  # what the fetch_weights rule runs
    assert staged == expected and staged.suffix == ".safetensors"
    assert calls[0].repo_id == timm.models.get_pretrained_cfg("test_vit").hf_hub_id.split("@")[0]
    record = json.loads((expected.parent / "test_vit.safetensors.json").read_text())
    assert record["sha256"] == weights.file_sha256(expected)
    assert record["source_sha256"] == record["published_sha256"]
    assert weights.stage(BACKBONE, "hub", cfg["torch_home"]) == expected and len(calls) == 1  # kept

    # extraction resolves the same file (record checked) and every tensor lands in the model
    path = weights.resolve_weights(BACKBONE, "hub", torch_home=cfg["torch_home"])
    assert path == expected.resolve()
    model = build_model(get_spec(BACKBONE), path)
    _, published = _published_file(tmp_path)
    assert torch.equal(model.blocks[0].attn.qkv.weight, published["blocks.0.attn.qkv.weight"])

    expected.write_bytes(expected.read_bytes()[:-8] + b"\0" * 8)  # tampered after staging
    with pytest.raises(LeukotypeError, match="sha256 mismatch"):
        weights.resolve_weights(BACKBONE, "hub", torch_home=cfg["torch_home"])


def test_a_bad_download_stages_nothing(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setattr(hub_weights, "download", lambda s, f: (_published_file(f)[0], "0" * 64))
    with pytest.raises(LeukotypeError, match="failed its sha256 check: published 0000"):
        weights.stage(BACKBONE, "hub", home)
    monkeypatch.setattr(hub_weights, "download", lambda s, f: (_published_file(f, pickled=True)[0], None))
    with pytest.raises(LeukotypeError, match="refused weights file"):
        weights.stage(BACKBONE, "hub", home)
    assert not any(p.is_file() for p in home.rglob("*"))  # no file reached the staged location


def test_dinobloom_fetch_says_what_to_download_and_how_to_configure_it():
    with pytest.raises(LeukotypeError) as excinfo:
        weights.stage("dinobloom_b", "imagenet")
    message = str(excinfo.value)
    for expected in ("DinoBloom-B.pth", "Zenodo", "weights: /path/to/DinoBloom-B.pth", "sha256"):
        assert expected in message
    assert weights.stage("dinobloom_b", "/data/DinoBloom-B.pth") is None  # a user file: nothing to fetch
    with pytest.raises(LeukotypeError, match=r"'hub' .* timm:<model> backbones only\. dinobloom_s: .*Zenodo"):
        validate_config({**copy.deepcopy(MINIMAL), "models": [{"backbone": "dinobloom_s", "weights": "hub"}]})


def test_model_card_cites_the_backbone_source():
    lines = bundle._backbone_sources([{"name": "dinobloom_s"}, {"name": "timm:convnext_tiny"}, {"name": "resnet101"}])
    assert "Koch V" in lines[0] and "DinoBloom" in lines[0] and "vit_small_patch14_dinov2" in lines[0]
    assert lines[1].startswith("- Backbone `timm:convnext_tiny`: timm model `convnext_tiny`")
    assert lines[2] == "- Backbone `resnet101`: torchvision ImageNet weights."

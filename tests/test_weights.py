"""Weights: offline staging through the real torch-hub path, sha256 checks, safe loading."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from torchvision import models as tvm

from leukotype import weights
from leukotype.backbones import BACKBONES, FeatureExtractor, build_model, get_spec
from leukotype.errors import LeukotypeError

BACKBONE = "inception_v3"  # smallest torchvision file here; its file also carries the aux head


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A torchvision-style weights file: the state dict of a torchvision InceptionV3 (aux head
    included, exactly the key set of the published file) named ``<stem>-<sha256[:8]>.pth``."""
    source = tvm.inception_v3(
        weights=None, aux_logits=True, transform_input=True, init_weights=False
    )
    folder = tmp_path_factory.mktemp("mirror")
    tmp = folder / "inception.pth"
    torch.save(source.state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"inception_v3_google-{digest[:8]}.pth"
    tmp.rename(path)
    return path, source.eval()


@pytest.fixture
def mirrored(monkeypatch, inception_file) -> Path:
    """Point the inception URL at the local file (the only thing patched)."""
    path, _ = inception_file
    real_url = weights.weights_url
    monkeypatch.setattr(
        weights, "weights_url", lambda b: path.as_uri() if b == BACKBONE else real_url(b)
    )
    return path


def test_staged_file_loads_through_imagenet_path_like_a_download(
    tmp_path, monkeypatch, mirrored, inception_file
):
    _, source = inception_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    staged = weights.stage_weights(BACKBONE)  # torch_home from $TORCH_HOME, like torchvision
    assert staged == tmp_path / "torch" / "hub" / "checkpoints" / mirrored.name
    assert staged.read_bytes() == mirrored.read_bytes()
    mtime = staged.stat().st_mtime_ns
    assert (
        weights.stage_weights(BACKBONE) == staged and staged.stat().st_mtime_ns == mtime
    )  # idempotent

    resolved = weights.resolve_weights(BACKBONE, "imagenet")
    assert resolved == staged.resolve()
    assert weights.expected_weights_path(BACKBONE, "imagenet") == staged
    spec = get_spec(BACKBONE)
    model = build_model(spec, resolved)
    assert not model.training and model.AuxLogits is None
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = FeatureExtractor(spec, model, ["pool"])(x)["pool"]
        hooked = {}
        handle = source.avgpool.register_forward_hook(
            lambda m, a, out: hooked.update(pool=out.flatten(1))
        )
        source(x)
        handle.remove()
    torch.testing.assert_close(ours, hooked["pool"], rtol=0, atol=0)


def test_stage_replaces_a_corrupt_file_and_resolve_rejects_one(tmp_path, mirrored):
    home = tmp_path / "home"
    target = weights.expected_weights_path(BACKBONE, "imagenet", home)
    target.parent.mkdir(parents=True)
    data = bytearray(mirrored.read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(LeukotypeError) as error:
        weights.resolve_weights(BACKBONE, "imagenet", torch_home=home)
    message = str(error.value)
    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert "sha256 mismatch" in message and str(target) in message
    assert mirrored.name.split("-")[-1].split(".")[0] in message and actual in message
    assert "stage it again" in message
    assert weights.stage_weights(BACKBONE, home) == target
    assert target.read_bytes() == mirrored.read_bytes()


def test_missing_imagenet_file_names_path_url_and_commands(tmp_path):
    home = tmp_path / "empty"
    with pytest.raises(LeukotypeError) as error:
        weights.resolve_weights("resnet101", "imagenet", torch_home=home)
    message = str(error.value)
    expected = home / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    assert str(expected) in message
    assert "https://download.pytorch.org/models/resnet101-63fe2227.pth" in message
    assert "snakemake fetch_weights --cores 1" in message
    assert f"python -m leukotype.weights fetch resnet101 --torch-home {home}" in message


def test_explicit_file_with_sha256_and_none(tmp_path, inception_file):
    path, _ = inception_file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert weights.resolve_weights(BACKBONE, str(path), sha256=digest) == path.resolve()
    assert (
        weights.resolve_weights(BACKBONE, str(path), sha256=digest[:10].upper()) == path.resolve()
    )
    with pytest.raises(LeukotypeError, match="sha256 mismatch"):
        weights.resolve_weights(BACKBONE, str(path), sha256="0" * 64)
    with pytest.raises(LeukotypeError, match="not found"):
        weights.resolve_weights(BACKBONE, str(tmp_path / "nope.pth"))
    assert weights.resolve_weights(BACKBONE, "none") is None
    assert weights.expected_weights_path(BACKBONE, "none") is None


def test_verify_sha256_prefix_rules(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"leukotype")
    digest = hashlib.sha256(b"leukotype").hexdigest()
    assert weights.verify_sha256(path, digest) == digest
    assert weights.verify_sha256(path, digest[:8]) == digest
    with pytest.raises(LeukotypeError, match="hex digest"):
        weights.verify_sha256(path, "not-hex")
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    with pytest.raises(LeukotypeError, match=f"expected {wrong}, actual {digest}"):
        weights.verify_sha256(path, wrong)


def test_hash_prefix_from_filename_agrees_with_torch_hub():
    for spec in BACKBONES.values():
        if spec.weights_enum is None:
            continue
        name = Path(spec.weights_enum.url).name
        prefix = weights.hash_prefix_from_filename(name)
        assert prefix and re.fullmatch(r"[0-9a-f]{8}", prefix)
        assert torch.hub.HASH_REGEX.search(name).group(1) == prefix
    assert weights.hash_prefix_from_filename("efficientnet-lite0-57934424.pth") == "57934424"
    assert weights.hash_prefix_from_filename("finetuned.pth") is None
    assert weights.hash_prefix_from_filename("my-model.pt") is None


def test_efficientnet_imagenet_is_the_packaged_file():
    path = weights.resolve_weights("efficientnet_lite0", "imagenet")
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert weights.file_sha256(path) == weights.EFFICIENTNET_LITE0_SHA256
    assert not weights.downloadable("efficientnet_lite0") and weights.downloadable("vgg16")
    assert weights.stage_weights("efficientnet_lite0") == path  # nothing to download, verified


def test_backbones_without_imagenet_and_combined(tmp_path):
    with pytest.raises(LeukotypeError, match="no ImageNet weights"):
        weights.resolve_weights("paper_cnn", "imagenet")
    with pytest.raises(LeukotypeError, match="each part"):
        weights.resolve_weights("inception_v3+resnet101", "imagenet")


def test_load_state_dict_refuses_pickled_code(tmp_path):
    safe = tmp_path / "safe.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, safe)
    assert torch.equal(weights.load_state_dict(safe)["w"], torch.ones(2))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"w": torch.ones(2), "extra": Path("x")}, unsafe)  # a pickled non-tensor object
    with pytest.raises(LeukotypeError, match="weights_only=True"):
        weights.load_state_dict(unsafe)
    with pytest.raises(LeukotypeError, match="does not fit backbone 'paper_cnn'"):
        build_model(get_spec("paper_cnn"), safe)


def test_cli_path_and_fetch(tmp_path, capsys, mirrored):
    home = tmp_path / "cli"
    assert weights.main(["path", "resnet101", "--torch-home", str(home)]) == 0
    assert capsys.readouterr().out.strip() == str(
        home / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    )
    assert weights.main(["fetch", "inception_v3", "--torch-home", str(home)]) == 0
    staged = home / "hub" / "checkpoints" / mirrored.name
    assert capsys.readouterr().out.strip() == str(staged) and staged.is_file()


def test_cli_fetch_without_network_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        weights, "weights_url", lambda b: (tmp_path / "absent-0123abcd.pth").as_uri()
    )
    assert weights.main(["fetch", "resnet101", "--torch-home", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err
    assert "cannot download" in err and "copy the file to" in err
    assert not list((tmp_path / "h").rglob("*.pth"))


def test_url_mirror_and_hub_dir_match_torchvision_and_torch(monkeypatch, tmp_path):
    """Paths resolve without importing torch; the mirrored facts must equal torch's own."""
    import torch

    from leukotype.backbones import BACKBONES
    from leukotype.weights import IMAGENET_URLS, default_torch_home

    assert IMAGENET_URLS == {
        name: spec.weights_enum.url for name, spec in BACKBONES.items() if spec.weights_enum is not None
    }
    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"TORCH_HOME": "", "XDG_CACHE_HOME": str(tmp_path / "xdg")}):
        for key, value in env.items():
            monkeypatch.setenv(key, value) if value else monkeypatch.delenv(key, raising=False)
        assert default_torch_home() / "hub" == Path(torch.hub.get_dir())


def test_resolving_weight_paths_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, leukotype.weights as w; w.expected_weights_path('resnet101', 'imagenet'); "
        "w.downloadable('vgg16'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_torch_home_wins_over_the_environment(tmp_path, monkeypatch):
    """One rule (weights.torch_home): config key, else $TORCH_HOME, else torch's default."""
    env_home, cfg_home = tmp_path / "exported", tmp_path / "configured"
    monkeypatch.setenv("TORCH_HOME", str(env_home))
    assert weights.torch_home(str(cfg_home)) == cfg_home
    assert weights.torch_home(None) == env_home
    expected = weights.expected_weights_path("resnet101", "imagenet", str(cfg_home))
    assert expected.parent == cfg_home / "hub" / "checkpoints"
    assert "overrides $TORCH_HOME" in weights.torch_home_conflict(str(cfg_home))
    assert weights.torch_home_conflict(str(env_home)) is None


@pytest.mark.e2e
def test_fetch_declared_outputs_and_extraction_use_one_torch_home(tmp_path):
    """$TORCH_HOME exported AND a different config torch_home: the declared weight file, the
    folder fetch_weights stages into and the file extraction would read are all the config's."""
    import yaml

    from workflow_helpers import REPO, snakemake

    cfg = yaml.safe_load((REPO / "configs" / "test.yaml").read_text())
    cfg["models"] = [{"backbone": "alexnet", "weights": "imagenet"}]
    cfg["torch_home"] = str(tmp_path / "configured")
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(cfg))
    staged = tmp_path / "configured" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    env = {"TORCH_HOME": str(tmp_path / "exported")}
    offline = {key: "http://127.0.0.1:9" for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    result = snakemake(tmp_path, "fetch_weights", configfile=path, check=False, env={**env, **offline})
    message = result.stdout + result.stderr
    assert result.returncode != 0  # no internet here: what matters is where it would stage
    assert f"copy the file to {staged}" in message  # fetch_weights stages into the config's folder
    assert "overrides $TORCH_HOME" in message
    dry = snakemake(tmp_path, "-n", "--forceall", configfile=path, env=env)
    assert str(staged) in dry.stdout  # the declared output / extraction input
    assert "exported" not in dry.stdout

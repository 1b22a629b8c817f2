"""Streaming feature extraction, the feature-folder format and feature loading."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from leukotype.augment import apply_transform
from leukotype.backbones import FeatureExtractor, build_model, get_spec, preprocess
from leukotype.errors import LeukotypeError
from leukotype.feature_store import load_features, write_feature_matrix
from leukotype.features import (
    OneDNNConv2d,
    SampleDataset,
    extract_features,
    optimize_for_inference,
    resolve_device,
)
from leukotype.io import read_tsv


def _cell_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A non-symmetric test picture: colour gradients plus a few random blobs."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx / width, yy / height, (xx + 2 * yy) / (width + 2 * height)], axis=-1) * 160
    for _ in range(4):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(6, 18)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.integers(0, 256, 3)
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pd.DataFrame:
    """12 generated, non-square PNG images: image_id, abspath."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        path = folder / f"cell{i:02d}.png"
        Image.fromarray(_cell_like(rng, 70 + i, 90)).save(path)
        rows.append({"image_id": f"img{i:06d}", "abspath": str(path)})
    return pd.DataFrame(rows)


def _samples(images: pd.DataFrame, transforms: list[str]) -> pd.DataFrame:
    return images.merge(pd.DataFrame({"transform": transforms}), how="cross")


def _in_memory(backbone: str, table: pd.DataFrame, layers: list[str]) -> dict[str, np.ndarray]:
    spec = get_spec(backbone)
    model = build_model(spec, None, seed=0)
    pre = preprocess(spec)
    batch = torch.stack(
        [
            pre(apply_transform(Image.open(p).convert("RGB"), t))
            for p, t in zip(table["abspath"], table["transform"])
        ]
    )
    with torch.no_grad():
        return {k: v.numpy() for k, v in FeatureExtractor(spec, model, layers)(batch).items()}


def test_streamed_extraction_matches_in_memory_and_index(tmp_path, images):
    samples = _samples(images, ["identity", "rot90"]).sample(frac=1.0, random_state=3)  # shuffled
    out = tmp_path / "features" / "alexnet"
    extract_features(samples, "alexnet", None, ["fc6", "fc7"], out, batch_size=5, progress=False)

    index = read_tsv(out / "index.tsv")
    canonical = samples.sort_values(["image_id", "transform"]).reset_index(drop=True)
    assert list(index.columns) == ["row", "image_id", "transform"]
    assert index["row"].tolist() == list(range(24))
    assert index[["image_id", "transform"]].equals(canonical[["image_id", "transform"]])
    assert sorted(p.name for p in out.iterdir()) == ["fc6.npy", "fc7.npy", "index.tsv", "meta.json"]

    expected = _in_memory("alexnet", canonical, ["fc6", "fc7"])
    for layer in ("fc6", "fc7"):
        stored = np.load(out / f"{layer}.npy")
        assert stored.dtype == np.float32 and stored.shape == (24, 4096)
        np.testing.assert_allclose(stored, expected[layer], rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.load(out / "fc6.npy")[0], np.load(out / "fc6.npy")[1])

    meta = json.loads((out / "meta.json").read_text())
    assert meta["backbone"] == "alexnet" and meta["layers"] == ["fc6", "fc7"]
    assert meta["dims"] == {"fc6": 4096, "fc7": 4096} and meta["n_rows"] == 24
    assert meta["weights"] == {"path": None, "sha256": None}
    assert meta["precision"] == "fp32" and meta["device"] in {"cpu", "cuda"}
    assert meta["provenance"]["versions"]["torch"]


def test_rotation_transform_equals_a_pre_rotated_file(tmp_path, images):
    source = Path(images.abspath[0])
    rotated = tmp_path / "rotated.png"
    Image.open(source).transpose(Image.Transpose.ROTATE_90).save(rotated)  # counter-clockwise
    samples = pd.DataFrame(
        {
            "image_id": ["a", "a", "b"],
            "transform": ["rot90", "identity", "identity"],
            "abspath": [str(source), str(source), str(rotated)],
        }
    )
    out = tmp_path / "paper"
    extract_features(samples, "paper_cnn", None, ["flatten"], out, batch_size=1, progress=False)
    got = load_features([out], "flatten", samples[["image_id", "transform"]])
    np.testing.assert_allclose(got[0], got[2], rtol=0, atol=1e-6)  # a/rot90 == b/identity
    assert not np.allclose(got[0], got[1], atol=1e-3)  # and rotation does change the features


def test_sample_dataset_transforms_before_resize(images):
    spec = get_spec("efficientnet_lite0")
    dataset = SampleDataset(images.abspath[:2].tolist(), ["identity", "rot270"], preprocess(spec))
    tensor, index = dataset[1]
    assert index == 1 and tensor.shape == (3, 224, 224)
    image = Image.open(images.abspath[1]).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    torch.testing.assert_close(tensor, preprocess(spec)(image), rtol=0, atol=0)
    with pytest.raises(LeukotypeError, match="unknown transform"):
        SampleDataset(images.abspath[:1].tolist(), ["rot45"], preprocess(spec))


def test_load_features_selects_orders_and_concatenates_parts(tmp_path):
    index_a = pd.DataFrame(
        {
            "image_id": ["i0", "i0", "i1", "i2"],
            "transform": ["identity", "rot90", "identity", "identity"],
        }
    )
    array_a = np.arange(8, dtype=np.float32).reshape(4, 2)  # row r = [2r, 2r+1]
    index_b = index_a.iloc[::-1].reset_index(drop=True)  # a second part stored in another order
    array_b = 100 + np.arange(4, dtype=np.float32).reshape(4, 1)[::-1]  # still keyed by sample
    write_feature_matrix(tmp_path / "a", "pool", index_a, array_a)
    write_feature_matrix(tmp_path / "b", "pool", index_b, array_b)

    wanted = pd.DataFrame({"image_id": ["i2", "i0"], "transform": ["identity", "rot90"]})
    np.testing.assert_array_equal(load_features(tmp_path / "a", "pool", wanted), [[6, 7], [2, 3]])
    combined = load_features([tmp_path / "a", tmp_path / "b"], "pool", wanted)
    np.testing.assert_array_equal(combined, [[6, 7, 103], [2, 3, 101]])
    assert combined.dtype == np.float32

    missing = pd.DataFrame({"image_id": ["i1", "i9"], "transform": ["rot90", "identity"]})
    with pytest.raises(LeukotypeError, match=r"2 of 2 samples.*'i1', 'rot90'.*'i9', 'identity'"):
        load_features([tmp_path / "a"], "pool", missing)
    with pytest.raises(LeukotypeError, match=r"available layers: \['pool'\]"):
        load_features([tmp_path / "a"], "fc6", wanted)
    with pytest.raises(LeukotypeError, match="lists different samples"):
        write_feature_matrix(tmp_path / "a", "other", index_b, array_a)
    with pytest.raises(LeukotypeError, match="one row per index row"):
        write_feature_matrix(tmp_path / "c", "pool", index_a, array_a[:3])


def test_bf16_precision_is_close_to_fp32(tmp_path, images, monkeypatch):
    from leukotype import hardware

    # bf16 runs only where native (leukotype.hardware); this test is about bf16's numbers.
    monkeypatch.setattr(hardware, "_this_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    samples = _samples(images.head(4), ["identity"])
    extract_features(samples, "paper_cnn", None, ["flatten"], tmp_path / "fp32", progress=False)
    extract_features(
        samples, "paper_cnn", None, ["flatten"], tmp_path / "bf16", precision="bf16", progress=False
    )
    full = np.load(tmp_path / "fp32" / "flatten.npy")
    half = np.load(tmp_path / "bf16" / "flatten.npy")
    assert half.dtype == np.float32
    relative = np.linalg.norm(half - full) / np.linalg.norm(full)
    assert 0 < relative < 0.02
    assert json.loads((tmp_path / "bf16" / "meta.json").read_text())["precision"] == "bf16"


class _TinyResidualNet(nn.Module):
    """Every pattern the inference optimisation handles or must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)  # + add + relu
        self.conv3 = nn.Conv2d(8, 8, 1)  # two users: must not be fused with anything
        self.shared = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # called twice
        self.bn3 = nn.BatchNorm2d(8)  # after the shared conv: must not be folded
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        y += x
        x = torch.relu(y)
        z = self.conv3(x)
        x = torch.nn.functional.relu(z) + z
        x = self.bn3(self.shared(x))
        x = self.shared(x).relu()
        return {"mean": x.mean((2, 3)), "flat": x.flatten(1)}


def _randomise_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so folding BN is really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def eager_references() -> list[tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]]:
    """(eager model, input, its outputs): a tiny net with every pattern, and two real backbones
    (multi-layer alexnet fc6+fc7; efficientnet_lite0 with its conv subclass) at small sizes."""
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    models = [(_TinyResidualNet(), torch.randn(3, 3, 16, 16, generator=generator))]
    for name, layers, size in [("efficientnet_lite0", ["pool"], 32), ("alexnet", ["fc6", "fc7"], 64)]:
        spec = get_spec(name)
        models.append((
            FeatureExtractor(spec, build_model(spec, None, seed=0), layers),
            torch.randn(2, 3, size, size, generator=generator),
        ))
    references = []
    for model, x in models:
        _randomise_batchnorms(model)
        with torch.no_grad():
            references.append((model.eval(), x, model(x)))
    return references


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_optimized_extractor_matches_eager(precision, eager_references):
    """BN folding + oneDNN conv fusion: the eager model's features up to float rounding."""
    import copy

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # bf16 features carry ~8 mantissa bits; fp32 only reassociation noise.
    tolerance = 5e-2 if precision == "bf16" else 1e-4
    for index, (eager, x, expected) in enumerate(eager_references):
        optimized = optimize_for_inference(copy.deepcopy(eager), "cpu", dtype)
        with torch.inference_mode():
            got = optimized(x.to(dtype).contiguous(memory_format=torch.channels_last))
            # The tiny net again with another batch size and the plain memory format.
            again = optimized(x[:1].to(dtype)) if index == 0 else None
        assert set(got) == set(expected)
        for key in expected:
            assert got[key].shape == expected[key].shape
            assert _relative_error(got[key], expected[key]) < tolerance, key
            if again is not None:
                assert _relative_error(again[key], expected[key][:1]) < tolerance, key
        kinds = [type(m).__name__ for m in optimized.modules()]
        if index > 0:
            assert "BatchNorm2d" not in kinds
            continue
        # The tiny net: only the BN after the conv that is called twice stays.
        assert kinds.count("BatchNorm2d") == 1
        with torch.no_grad():  # folding worked on copies: the eager model is unchanged
            assert torch.equal(eager(x)["flat"], expected["flat"])
        if dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported():
            fused = {
                name: (m.relu, m.add) for name, m in optimized.named_modules()
                if isinstance(m, OneDNNConv2d)
            }
            assert fused == {
                "conv1": (True, False), "conv2": (True, True), "conv3": (False, False)
            }


def test_extraction_optimized_equals_plain_eager(tmp_path, images):
    samples = _samples(images.head(5), ["identity"])
    for optimize in (True, False):
        extract_features(
            samples, "paper_cnn", None, ["flatten"], tmp_path / str(optimize), batch_size=2,
            optimize=optimize, progress=False,
        )
    fast = np.load(tmp_path / "True" / "flatten.npy")
    plain = np.load(tmp_path / "False" / "flatten.npy")
    np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())
    assert json.loads((tmp_path / "True" / "meta.json").read_text())["optimized"] is True


def test_bad_requests_raise_and_leave_no_partial_files(tmp_path, images):
    samples = _samples(images.head(2), ["identity"])
    with pytest.raises(LeukotypeError, match="inception_v3, resnet101"):
        extract_features(
            samples, "inception_v3+resnet101", None, ["pool"], tmp_path / "x", progress=False
        )
    with pytest.raises(LeukotypeError, match="precision"):
        extract_features(
            samples,
            "paper_cnn",
            None,
            ["flatten"],
            tmp_path / "x",
            precision="fp16",
            progress=False,
        )
    with pytest.raises(LeukotypeError, match="duplicated"):
        extract_features(
            pd.concat([samples, samples]),
            "paper_cnn",
            None,
            ["flatten"],
            tmp_path / "x",
            progress=False,
        )
    broken = samples.copy()
    broken.loc[1, "abspath"] = str(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError):
        extract_features(broken, "paper_cnn", None, ["flatten"], tmp_path / "y", progress=False)
    assert list((tmp_path / "y").iterdir()) == []  # temp files removed, nothing half-written


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LeukotypeError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(LeukotypeError, match="unknown device"):
        resolve_device("tpu9")


@pytest.mark.shared_data
def test_pretrained_efficientnet_features_separate_pbc_classes(shared_data, tmp_path):
    """Real check: ImageNet EfficientNet-Lite0 features of 80 PBC images (10 per class)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from leukotype.weights import resolve_weights

    root = shared_data / "pbc"
    manifest = pd.read_csv(root / "manifest.csv").sort_values("path", kind="stable")
    chosen = manifest.groupby("label", group_keys=False).head(10).reset_index(drop=True)
    samples = pd.DataFrame(
        {
            "image_id": [f"img{i:06d}" for i in range(len(chosen))],
            "transform": "identity",
            "abspath": [str(root / p) for p in chosen["path"]],
        }
    )
    started = time.perf_counter()
    weights_path = resolve_weights("efficientnet_lite0", "imagenet")
    extract_features(
        samples,
        "efficientnet_lite0",
        weights_path,
        ["pool"],
        tmp_path,
        batch_size=16,
        progress=False,
    )
    features = load_features([tmp_path], "pool", samples)
    seconds = time.perf_counter() - started
    classifier = make_pipeline(StandardScaler(), SVC(kernel="linear", C=1.0))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    accuracy = cross_val_score(classifier, features, chosen["label"].to_numpy(), cv=folds).mean()
    print(
        f"PBC 80 images, efficientnet_lite0 imagenet pool + linear SVM: "
        f"5-fold accuracy {accuracy:.3f} (chance 0.125); extraction {seconds:.1f} s"
    )
    assert features.shape == (80, 1280)
    assert json.loads((tmp_path / "meta.json").read_text())["weights"]["sha256"].startswith(
        "57934424"
    )
    assert accuracy > 0.45  # measured 0.65; chance is 0.125

